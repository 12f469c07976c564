"""Train the semantic-cache verifier on QQP pairs: python -m iros.verifier_train (scripts/train-verifier)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from iros.embedder import PACKAGED_MODEL, load_local_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "qqp" / "dev.jsonl.gz"
CACHE_DIR = ROOT / ".cache" / "iros"


@dataclass(slots=True)
class Pairs:
    a: list[str]
    b: list[str]
    label: npt.NDArray[np.int8]


def read_pairs(path: Path) -> Pairs:
    a, b, label = [], [], []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            a.append(row["a"])
            b.append(row["b"])
            label.append(int(row["label"]))
    return Pairs(a, b, np.asarray(label, np.int8))


def _cache_dir() -> Path:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    # Like pytest's and mypy's caches: the folder keeps itself out of git.
    ignore = CACHE_DIR.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# created by iros.verifier_train\n*\n")
    return CACHE_DIR


def embed_texts(texts: list[str], model: str = PACKAGED_MODEL) -> npt.NDArray[np.float32]:
    """Unit vectors for `texts`, cached on disk under .cache/ keyed by the model and the texts."""
    digest = hashlib.sha256(model.encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    path = _cache_dir() / f"embeddings-{digest.hexdigest()[:16]}.npy"
    if path.exists():
        return np.load(path)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    st = load_local_model(model, "auto", threads=os.cpu_count() or 1)
    out = np.empty((len(texts), st.get_embedding_dimension() or 0), np.float32)
    # Longest first in chunks: similar lengths pad little, and the bar's estimate is pessimistic.
    order = np.argsort([-len(t) for t in texts], kind="stable")
    chunk = 1024
    columns = (*Progress.get_default_columns()[:2], BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns) as progress:
        task = progress.add_task(f"embedding with {model}", total=len(texts))
        for i in range(0, len(texts), chunk):
            idx = order[i : i + chunk]
            out[idx] = st.encode(
                [texts[j] for j in idx],
                batch_size=128,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            progress.advance(task, len(idx))
    np.save(path, out)
    return out


def unique_texts(pairs: Pairs) -> tuple[list[str], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Each distinct question once, and the index of each pair's a and b in that list."""
    index: dict[str, int] = {}
    for t in (*pairs.a, *pairs.b):
        index.setdefault(t, len(index))
    ia = np.fromiter((index[t] for t in pairs.a), np.int64, len(pairs.a))
    ib = np.fromiter((index[t] for t in pairs.b), np.int64, len(pairs.b))
    return list(index), ia, ib


def nearest(
    vectors: npt.NDArray[np.float32], queries: npt.NDArray[np.int64], cache: npt.NDArray[np.int64], k: int = 1
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """For each query text, the k most similar cached texts (text indices) and their cosines, best first."""
    keys = vectors[cache]
    idx = np.empty((len(queries), k), np.int64)
    sim = np.empty((len(queries), k), np.float32)
    for i in range(0, len(queries), 2048):
        s = vectors[queries[i : i + 2048]] @ keys.T
        top = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else np.argsort(-s, axis=1)[:, :k]
        top_s = np.take_along_axis(s, top, axis=1)
        order = np.argsort(-top_s, axis=1, kind="stable")
        idx[i : i + 2048] = cache[np.take_along_axis(top, order, axis=1)]
        sim[i : i + 2048] = np.take_along_axis(top_s, order, axis=1)
    return idx, sim
