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
    """The cached answer as a JSON body with this request's id and time."""
    completion = orjson.loads(entry.body)
    completion["id"] = f"chatcmpl-{request_id}"
    completion["created"] = int(time.time())
    return orjson.dumps(completion)


def replay_chunks(entry: CacheEntry, request_id: str, include_usage: bool) -> list[bytes]:
    """The cached answer as the data of server-sent events, ending with the usage chunk if asked."""
    completion = orjson.loads(entry.body)
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


def assemble(chunks: list[bytes]) -> dict[str, Any] | None:
    """A streamed answer put back together as a completion, or None if it cannot be faithfully."""
    choices: dict[int, dict[str, Any]] = {}
    first: dict[str, Any] | None = None
    usage = None
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
