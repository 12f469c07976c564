"""What the cache benchmarks share: the labelled question pairs they read, and small helpers.

pairs = read_pairs(DEFAULT_PAIRS, limit=5000)     # ../shared/data/qqp/dev.jsonl.gz beside the checkout
request_body("What is HNSW?")                      # the chat request every bench sends for a question
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

# (description, completed, total): called as the bench moves on, e.g. to drive a progress bar.
ProgressFn = Callable[[str, float, float], None]

DEFAULT_PAIRS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "qqp" / "dev.jsonl.gz"
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
