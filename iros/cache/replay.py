"""A cached answer played back: as a JSON body, or as the chunks of a stream; and a streamed answer put
back together for the cache.

body = replay_json(entry, request_id)
chunks = replay_chunks(entry, request_id, include_usage=True)     # the data of server-sent events
completion = assemble(chunks)                                    # None when it cannot be faithfully
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from iros.cache.base import CacheEntry

REPLAY_PIECE = 24  # characters per replayed stream chunk


def replay_json(entry: CacheEntry, request_id: str) -> bytes:
    """The cached answer as a JSON body with this request's id and time (an embeddings list has neither)."""
    completion = orjson.loads(entry.body)
    if completion.get("object") != "list":
        text = completion.get("object") == "text_completion"
        completion["id"] = f"{'cmpl' if text else 'chatcmpl'}-{request_id}"
        completion["created"] = int(time.time())
    return orjson.dumps(completion)


def replay_chunks(entry: CacheEntry, request_id: str, include_usage: bool) -> list[bytes]:
    """The cached answer as the data of server-sent events, ending with the usage chunk if asked."""
    completion = orjson.loads(entry.body)
    if completion.get("object") == "text_completion":
        return _replay_text_chunks(completion, request_id, include_usage)
    base = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": completion.get("model"),
    }
    if completion.get("system_fingerprint") is not None:
        base["system_fingerprint"] = completion["system_fingerprint"]
    chunks: list[bytes] = []

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return orjson.dumps(
            {
                **base,
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
        )

    for choice in completion.get("choices") or []:
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        chunks.append(chunk(index, {"role": message.get("role", "assistant"), "content": ""}))
        content = message.get("content") or ""
        for start in range(0, len(content), REPLAY_PIECE):
            chunks.append(chunk(index, {"content": content[start : start + REPLAY_PIECE]}))
        if message.get("tool_calls"):
            calls = [dict(call, index=i) for i, call in enumerate(message["tool_calls"])]
            chunks.append(chunk(index, {"tool_calls": calls}))
        chunks.append(chunk(index, {}, choice.get("finish_reason")))
    if include_usage and completion.get("usage") is not None:
        chunks.append(orjson.dumps({**base, "choices": [], "usage": completion["usage"]}))
    return chunks


def _replay_text_chunks(completion: dict[str, Any], request_id: str, include_usage: bool) -> list[bytes]:
    """A cached legacy text completion as its stream: the text in pieces, then each choice's finish."""
    base = {
        "id": f"cmpl-{request_id}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": completion.get("model"),
    }
    chunks: list[bytes] = []
    for choice in completion.get("choices") or []:
        index, text = choice.get("index", 0), choice.get("text") or ""

        def chunk(piece: str, finish: str | None = None, index: int = index) -> bytes:
            part = {"text": piece, "index": index, "logprobs": None, "finish_reason": finish}
            return orjson.dumps({**base, "choices": [part]})

        chunks.extend(
            chunk(text[start : start + REPLAY_PIECE]) for start in range(0, len(text), REPLAY_PIECE)
        )
        chunks.append(chunk("", choice.get("finish_reason")))
    if include_usage and completion.get("usage") is not None:
        chunks.append(orjson.dumps({**base, "choices": [], "usage": completion["usage"]}))
    return chunks


def assemble(chunks: list[bytes]) -> dict[str, Any] | None:
    """A streamed answer put back together as a completion, or None if it cannot be faithfully."""
    choices: dict[int, dict[str, Any]] = {}
    first: dict[str, Any] | None = None
    usage = None
    text = False
    for raw in chunks:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict):
            return None
        first = first or data
        if isinstance(data.get("usage"), dict):
            usage = data["usage"]
        for choice in data.get("choices") or []:
            if "text" in choice and "delta" not in choice:
                text = True  # a legacy text completion's chunk
                choice = {**choice, "delta": {"content": choice["text"]}}
            delta = choice.get("delta") or {}
            if "tool_calls" in delta or "function_call" in delta:
                return None  # partial tool calls are not put back together: not cached
            slot = choices.setdefault(
                choice.get("index", 0), {"role": "assistant", "content": [], "finish_reason": None}
            )
            if delta.get("role"):
                slot["role"] = delta["role"]
            if delta.get("content"):
                slot["content"].append(delta["content"])
            if choice.get("finish_reason"):
                slot["finish_reason"] = choice["finish_reason"]
    if first is None or not choices:
        return None
    if text:
        return {
            "id": first.get("id"),
            "object": "text_completion",
            "created": first.get("created"),
            "model": first.get("model"),
            "choices": [
                {
                    "text": "".join(slot["content"]),
                    "index": i,
                    "logprobs": None,
                    "finish_reason": slot["finish_reason"],
                }
                for i, slot in sorted(choices.items())
            ],
            "usage": usage,
        }
    return {
        "id": first.get("id"),
        "object": "chat.completion",
        "created": first.get("created"),
        "model": first.get("model"),
        "choices": [
            {
                "index": i,
                "message": {"role": slot["role"], "content": "".join(slot["content"])},
                "logprobs": None,
                "finish_reason": slot["finish_reason"],
            }
            for i, slot in sorted(choices.items())
        ],
        "usage": usage,
    }
