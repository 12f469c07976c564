"""Judges for verification: does the fresh answer say what the cached one says?

same = await judge("embedding", fresh_text, cached_text, embedder, ask)   # ask: a model, for "model"

- exact: the two texts are equal once case, spacing and punctuation are set aside (a deterministic
  upstream at temperature 0 answers one question one way).
- embedding: the two answers' embeddings are at least ANSWER_SIMILARITY apart in cosine.
- model: a configured model is asked whether the two answers say the same; its first word decides.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from iros.cache.base import Embedder

__all__ = ["ANSWER_SIMILARITY", "Ask", "answer_text", "judge", "normalise"]

ANSWER_SIMILARITY = 0.9  # cosine of two answers' MiniLM vectors taken as the same answer
MAX_JUDGED_CHARS = 4000  # of each answer, for the embedding and model judges
Ask = Callable[[str], Awaitable[str]]  # a prompt to a configured model -> its answer's text

_PUNCT = re.compile(r"[^\w\s]+")
_SPACE = re.compile(r"\s+")

PROMPT = (
    "Two answers were given to questions that may be the same question. Do they say the same thing, so "
    "that either would serve whoever asked the other? Reply with one word: yes or no.\n\n"
    "Answer A:\n{a}\n\nAnswer B:\n{b}"
)


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return _SPACE.sub(" ", _PUNCT.sub(" ", text)).strip()


def answer_text(completion: dict[str, Any]) -> str | None:
    """Every choice's message text, in order (None when the completion holds none)."""
    choices = completion.get("choices")
    if not isinstance(choices, list):
        return None
    parts = []
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
    return "\n".join(parts) if parts else None


async def judge(kind: str, fresh: str, cached: str, embedder: Embedder | None, ask: Ask | None) -> bool:
    """Whether `fresh` says what `cached` says, by the `kind` of judge configured."""
    if normalise(fresh) == normalise(cached):
        return True
    if kind == "exact":
        return False
    if kind == "embedding":
        if embedder is None:
            raise RuntimeError("judge: embedding needs the semantic cache's embedder")
        vectors = np.asarray(await embedder.embed([fresh[:MAX_JUDGED_CHARS], cached[:MAX_JUDGED_CHARS]]))
        return float(vectors[0] @ vectors[1]) >= ANSWER_SIMILARITY
    if ask is None:
        raise RuntimeError("judge: model has no model to ask")
    reply = await ask(PROMPT.format(a=fresh[:MAX_JUDGED_CHARS], b=cached[:MAX_JUDGED_CHARS]))
    words = normalise(reply).split()
    return bool(words) and words[0] == "yes"
