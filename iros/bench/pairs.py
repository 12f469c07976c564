"""What the cache benchmarks share: the labelled question pairs they read, and small helpers.

pairs = read_pairs(DEFAULT_PAIRS, limit=5000)     # ../shared/data/qqp/dev.jsonl.gz beside the checkout
request_body("What is HNSW?")                      # the chat request every bench sends for a question
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

# (description, completed, total): called as the bench moves on, e.g. to drive a progress bar.
ProgressFn = Callable[[str, float, float], None]

# The development pairs beside the checkout (IROS_PAIRS_DIR elsewhere, e.g. from a git worktree).
DATA_DIR = Path(
    os.environ.get("IROS_PAIRS_DIR") or Path(__file__).resolve().parents[2].parent / "shared" / "data"
)
DEFAULT_PAIRS = DATA_DIR / "qqp" / "dev.jsonl.gz"
DOMAINS = ("qqp", "mrpc", "sick", "sts")  # the development domains, each a folder of DATA_DIR
MODEL = "bench"
SEMANTIC_READY_TIMEOUT = 180.0  # seconds for the embedding model to load on a busy machine


@dataclass(frozen=True, slots=True)
class Pair:
    a: str
    b: str
    label: int


def read_pairs(path: Path, limit: int | None = None, offset: int = 0) -> list[Pair]:
    """JSON lines of {"a", "b", "label"}, gzipped or not: `limit` of them after skipping `offset`."""
    with path.open("rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    pairs: list[Pair] = []
    with opener(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(pairs) >= limit:
                break
            if number <= offset or not line.strip():
                continue
            try:
                row = orjson.loads(line)
                pairs.append(Pair(str(row["a"]), str(row["b"]), int(row["label"])))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: expected {{'a', 'b', 'label'}}: {exc}") from None
    return pairs


def quiet(description: str, done: float, total: float) -> None:
    return None


def ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def request_body(text: str, model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0}


def label_groups(pairs: list[Pair], strict: bool = False) -> dict[str, int]:
    """Every text's group in the graph of label-1 pairs: two texts whose groups match are joined by the
    labels, directly or through a chain (the protocol's test of a right hit). Texts with the same words
    (verifier.rules.wording: "The act of testing something." and "the act of testing something") are one
    text asked twice, joined too, unless `strict`: the files repeat a sentence across pairs, cased or
    punctuated differently, and the labels never join the copies."""
    parent: dict[str, str] = {}

    def root(text: str) -> str:
        while parent.setdefault(text, text) != text:
            parent[text] = parent[parent[text]]
            text = parent[text]
        return text

    for p in pairs:
        root(p.a)
        root(p.b)
        if p.label == 1:
            ra, rb = root(p.a), root(p.b)
            if ra != rb:
                parent[ra] = rb
    if not strict:
        from iros.cache.verifier.rules import wording

        first: dict[tuple[str, ...], str] = {}
        for text in list(parent):
            ra, rb = root(text), root(first.setdefault(wording(text), text))
            if ra != rb:
                parent[ra] = rb
    ids: dict[str, int] = {}
    return {text: ids.setdefault(root(text), len(ids)) for text in parent}


def best_fixed_threshold(
    similarity: list[float], right: list[bool], answerable: int, precision: float
) -> dict[str, float | None]:
    """The best a single cosine threshold does on each question's nearest entry, chosen in hindsight:
    the highest recall whose precision reaches `precision` (the protocol's baseline)."""
    order = sorted(range(len(similarity)), key=lambda i: -similarity[i])
    best: dict[str, float | None] = {"threshold": None, "precision": None, "recall": 0.0}
    true = 0
    for rank, i in enumerate(order, 1):
        true += right[i]
        # Only cut between distinct similarities: ties are served or refused together.
        if rank < len(order) and similarity[order[rank]] == similarity[i]:
            continue
        if true / rank >= precision and answerable and true / answerable > (best["recall"] or 0.0):
            best = {
                "threshold": round(similarity[i], 4),
                "precision": round(true / rank, 4),
                "recall": round(true / answerable, 4),
            }
    return best
