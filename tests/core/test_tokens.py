"""Token counts as Iros estimates them: lossless pieces, prompts with their framing."""

from __future__ import annotations

from typing import Any

from iros.core.tokens import count_prompt_tokens, count_tokens, tokenize


class TestTokenizer:
    def test_splits_words_with_their_leading_space_and_single_punctuation(self) -> None:
        assert tokenize("Hello, big world!") == ["Hello", ",", " big", " world", "!"]
        assert count_tokens("Hello, big world!") == 5
        assert count_tokens("") == 0

    def test_is_lossless_so_pieces_rejoin_to_the_text(self) -> None:
        text = "  A line,\twith  odd   spacing...and ünïcode ✓ \n"
        assert "".join(tokenize(text)) == text

    def test_prompt_tokens_count_text_parts_tool_arguments_and_overhead(self) -> None:
        call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": "Hello, world!"},  # 4 tokens
            {"role": "user", "content": [{"type": "text", "text": "two words"}, {"type": "image_url"}]},  # 2
            {"role": "assistant", "content": None, "tool_calls": [call]},
        ]
        tool_tokens = count_tokens("f") + count_tokens('{"a":1}')
        assert count_prompt_tokens(messages) == 4 + 2 + tool_tokens + 3 * 3 + 3
