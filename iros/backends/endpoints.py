"""The simulated model's answers beyond chat: legacy text completions and embeddings. No I/O.

p = text_plan({"model": "m", "prompt": "Once upon a time", "seed": 1}, PROFILES["instant"])
text_completion_body(p, "m", "cmpl-1")                   # an OpenAI text_completion object
list(text_chunk_bodies(p, "m", "cmpl-1", include_usage=True))   # its stream
p = embedding_plan(payload, PROFILES["instant"])          # latency and fault; the vectors come from
embedding_body(payload, "m")                              # the words of each input, deterministically

A text completion is the chat answer to one user turn holding the prompt, counted as the prompt's tokens.
An embedding is the normalised sum of one pseudo-random vector per lower-cased word: the same text gives
the same vector, and texts sharing words are closer than texts that share none.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from iros.backends.simulation import InvalidRequest, Plan, Profile, plan, timing
from iros.core.tokens import count_text_tokens

EMBEDDING_DIM = 64  # the simulated model's vector size unless `dimensions` asks for another
_CHAT_ONLY = ("tools", "tool_choice", "response_format", "messages")


def prompt_text(value: Any, param: str = "prompt") -> list[str]:
    """The texts of a prompt or input: a text, texts, a token list or token lists (tokens as numbers)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [" ".join(map(str, value))]
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value):
            return [" ".join(map(str, v)) for v in value]
    raise InvalidRequest(f"'{param}' must be a text, texts, or token arrays", param)


def text_plan(payload: dict[str, Any], profile: Profile, rng_latency: random.Random | None = None) -> Plan:
    """Decide the answer to a legacy completions payload (see simulation.plan)."""
    texts = prompt_text(payload.get("prompt"))
    chat = {k: v for k, v in payload.items() if k not in _CHAT_ONLY and k != "prompt"}
    chat["messages"] = [{"role": "user", "content": "\n".join(texts)}]
    p = plan(chat, profile, rng_latency)
    return dataclasses.replace(p, prompt_tokens=max(count_text_tokens(payload.get("prompt")), 1))


def text_completion_body(plan: Plan, model: str, request_id: str) -> dict[str, Any]:
    """The plan as an OpenAI text_completion object."""
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "iros-simulated",
        "choices": [
            {"text": plan.content or "", "index": 0, "logprobs": None, "finish_reason": plan.finish_reason}
        ],
        "usage": plan.usage,
    }


def text_chunk_bodies(
    plan: Plan, model: str, request_id: str, include_usage: bool
) -> Iterator[dict[str, Any]]:
    """The plan as a text_completion stream: one chunk per piece, a finish chunk, and the usage if asked."""
    created = int(time.time())
    extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(text: str, finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": "iros-simulated",
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
            **extra,
        }

    for piece in plan.pieces:
        yield chunk(piece)
    yield chunk("", plan.finish_reason)
    if include_usage:
        yield {**chunk(""), "choices": [], "usage": plan.usage}


def embedding_plan(
    payload: dict[str, Any], profile: Profile, rng_latency: random.Random | None = None
) -> Plan:
    """An embeddings request's latency (one time to first token), fault and input tokens."""
    texts = prompt_text(payload.get("input"), "input")
    dimensions = payload.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or not 1 <= dimensions <= 65536):
        raise InvalidRequest("'dimensions' must be an integer from 1 to 65536", "dimensions")
    fmt = payload.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be float or base64", "encoding_format")
    ttft, _, fault = timing(profile, rng_latency)
    tokens = max(sum(count_text_tokens(t) for t in texts), 1)
    return Plan([], "stop", tokens, 0, ttft, 0.0, fault=fault)


def embedding_body(payload: dict[str, Any], model: str) -> dict[str, Any]:
    """The OpenAI embeddings list for a payload that embedding_plan accepted."""
    texts = prompt_text(payload.get("input"), "input")
    dim = payload.get("dimensions") or EMBEDDING_DIM
    as_base64 = payload.get("encoding_format") == "base64"
    data = []
    for i, text in enumerate(texts):
        vector = embed(model, text, dim)
        value: Any = base64.b64encode(vector.tobytes()).decode() if as_base64 else vector.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = max(sum(count_text_tokens(t) for t in texts), 1)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def embed(model: str, text: str, dim: int) -> npt.NDArray[np.float32]:
    """The unit vector of a text: the sum of its words' vectors (a text without words: its own)."""
    words = text.lower().split() or [text]
    total = np.zeros(dim, dtype=np.float64)
    for word in words:
        total += _word_vector(model, word, dim)
    norm = float(np.linalg.norm(total)) or 1.0
    return (total / norm).astype("<f4")


@functools.lru_cache(maxsize=8192)
def _word_vector(model: str, word: str, dim: int) -> npt.NDArray[np.float64]:
    seed = int.from_bytes(hashlib.blake2b(f"{model}\0{word}".encode(), digest_size=8).digest())
    return np.random.default_rng(seed).standard_normal(dim)
