"""Token counts as Iros estimates them: the simulated model's tokenizer, and what Iros counts for an
answer whose model server reported no usage (llama.cpp's streams, for one).

count_tokens("Hello, big world!")                 # 5: words with their leading space, punctuation marks
count_prompt_tokens(request["messages"])          # every message's text and tool calls, plus framing
count_input_tokens(request)                       # a chat, completions or embeddings request's input
count_completion_tokens(parsed_chunks)            # a streamed answer's, from its chunks
counted_usage(request, completion)                # a whole answer's usage, as OpenAI reports it
"""

from __future__ import annotations

import re
from typing import Any

# Words with their leading space, single punctuation marks, and trailing whitespace: lossless, so
# "".join(tokenize(text)) == text, and a stream of pieces re-counts to exactly its chunk count.
_TOKEN = re.compile(r"\s*\w+|\s*[^\w\s]|\s+")


def tokenize(text: str) -> list[str]:
    """tokenize("Hi, there.") == ["Hi", ",", " there", "."]"""
    return _TOKEN.findall(text)


def count_tokens(text: str) -> int:
    return sum(1 for _ in _TOKEN.finditer(text))


def count_message_tokens(message: dict[str, Any]) -> int:
    """Tokens of one message's text (parts included) and tool calls, without its framing."""
    total = 0
    content = message.get("content")
    if isinstance(content, str):
        total += count_tokens(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                total += count_tokens(part["text"])
    for call in message.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            total += count_tokens(str(fn.get("name") or ""))
            total += count_tokens(str(fn.get("arguments") or ""))
    return total


def count_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Tokens of every message's text (and tool calls), plus 3 per message and 3 to prime the reply."""
    return 3 + sum(3 + count_message_tokens(m) for m in messages if isinstance(m, dict))


def count_text_tokens(value: Any) -> int:
    """Tokens of a legacy prompt or an embeddings input: a text, texts, a token list or token lists."""
    if isinstance(value, str):
        return count_tokens(value)
    if isinstance(value, list):
        return sum(1 if isinstance(v, int) else count_text_tokens(v) for v in value)
    return 0


def count_input_tokens(request: dict[str, Any]) -> int:
    """The input tokens of a request: its messages (chat), its prompt (completions) or input (embeddings)."""
    messages = request.get("messages")
    if isinstance(messages, list):
        return count_prompt_tokens(messages)
    return max(count_text_tokens(request.get("prompt", request.get("input"))), 1)


def count_completion_tokens(chunks: list[dict[str, Any]]) -> int:
    """Tokens of a streamed answer, from its parsed chunks: the chunks that carry text or tool-call parts
    (OpenAI-compatible servers, llama.cpp's among them, stream a token a chunk); at least 1."""
    pieces = 0
    for chunk in chunks:
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict) and isinstance(choice.get("text"), str) and choice["text"]:
                pieces += 1  # a legacy text completion's chunk
                continue
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            if isinstance(delta.get("content"), str) and delta["content"]:
                pieces += 1
            for call in delta.get("tool_calls") or ():
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and (fn.get("name") or fn.get("arguments")):
                    pieces += 1
    return max(pieces, 1)


def counted_usage(request: dict[str, Any], completion: dict[str, Any]) -> dict[str, int]:
    """OpenAI usage for a whole answer whose server reported none: its request's tokens and its answer's
    (an embeddings answer has input tokens only)."""
    prompt = count_input_tokens(request)
    if "choices" not in completion:
        return {"prompt_tokens": prompt, "total_tokens": prompt}
    answer = 0
    for choice in completion.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if isinstance(message, dict):
            answer += count_message_tokens(message)
        elif isinstance(choice.get("text"), str):
            answer += count_tokens(choice["text"])
    answer = max(answer, 1)
    return {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer}
