"""An approximate nearest-neighbour index over unit vectors with string keys (usearch's HNSW graph).

index = VectorIndex(384, Path("iros-data/cache-index.usearch"))
index.load()                                     # False when there is nothing usable: rebuild instead
index.add_many(["k1", "k2"], vectors)            # (2, 384) float32; adding a key again replaces it
index.search(queries, k=4)                       # one list per query row: [("k1", 0.97), ...], best first
await asyncio.to_thread(index.save)              # usearch's file plus a key sidecar, each written atomically

Similarity is cosine: vectors are normalised on the way in (the embedder's already are), and the graph
compares them by inner product, which on unit vectors is the same and cheaper. They are stored as f16:
half the memory of f32 at the same top-1 recall (measured on 20k random 384-d vectors, see the tests).

usearch labels are integers, so each key gets a label from a counter that only grows: a key added again
gets a new one, and a label never names two keys. That makes a saved pair of files checkable: the load
is accepted only if the graph holds exactly the labels the sidecar names.

Callers use an index from the event loop's thread, but a save may run in a worker thread: one lock
guards every method. A large add_many blocks its caller for a while (about a millisecond per vector per
core); run it in a thread when that matters.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime  # noqa: F401  (before usearch: loading onnxruntime's library after usearch's crashes)
import orjson
from usearch.index import BatchMatches, Index

log = logging.getLogger(__name__)

__all__ = ["VectorIndex"]

SIDECAR_FORMAT = 1
# Measured on 20k random 384-d unit vectors (the hard case: real embeddings cluster): top-1 recall
# 0.998-1.0 for queries at cosine ~0.86 from their neighbour, ~0.99 at ~0.75. Building is the cost that
# shows (a rebuild at start): expansion_add 64 builds about twice as fast as 128 at the same recall
# once expansion_search is 128; connectivity 32 doubled the build time for no gain.
CONNECTIVITY = 16
EXPANSION_ADD = 64
EXPANSION_SEARCH = 128

Vectors = npt.NDArray[np.float32]


class VectorIndex:
    def __init__(self, dim: int, path: Path | None = None, *, dtype: str = "f16") -> None:
        if dim < 1:
            raise ValueError(f"dim must be at least 1, not {dim}")
        self.dim = dim
        self.path = Path(path) if path is not None else None
        self.dtype = dtype
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()  # one save at a time: they share the temporary files
        self._index = self._new_index()
        self._labels: dict[str, int] = {}
        self._keys: dict[int, str] = {}
        self._next = 1  # usearch pads short result rows with label 0: never hand it out

    def _new_index(self) -> Index:
        return Index(
            ndim=self.dim,
            metric="ip",
            dtype=self.dtype,
            connectivity=CONNECTIVITY,
            expansion_add=EXPANSION_ADD,
            expansion_search=EXPANSION_SEARCH,
        )

    @property
    def sidecar(self) -> Path:
        return self._files()[1]

    def _files(self) -> tuple[Path, Path]:
        if self.path is None:
            raise ValueError("this VectorIndex has no path to save to or load from")
        return self.path, self.path.with_name(self.path.name + ".keys.json")

    def _unit(self, vectors: npt.ArrayLike) -> Vectors:
        array = np.asarray(vectors, dtype=np.float32)
        if array.ndim == 1:
            array = array[None, :]
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise ValueError(f"expected vectors of dimension {self.dim}, got shape {array.shape}")
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        if not (np.isfinite(norms).all() and (norms > 0).all()):
            raise ValueError("vectors must be finite and not zero")
        unit: Vectors = np.ascontiguousarray(array / norms, dtype=np.float32)
        return unit

    # ------------------------------------------------------------------------------ changes

    def add(self, key: str, vector: npt.ArrayLike) -> None:
        self.add_many([key], vector)

    def add_many(self, keys: Sequence[str], vectors: npt.ArrayLike) -> None:
        """Add (or replace) one vector per key; within one call the last vector given for a key wins."""
        unit = self._unit(vectors)
        if len(keys) != len(unit):
            raise ValueError(f"{len(keys)} keys for {len(unit)} vectors")
        if not keys:
            return
        last = {key: i for i, key in enumerate(keys)}
        if len(last) != len(keys):
            unit = unit[list(last.values())]
        with self._lock:
            self._drop(last)
            labels = np.arange(self._next, self._next + len(last), dtype=np.uint64)
            self._next += len(last)
            self._index.add(labels, unit)
            for key, label in zip(last, labels.tolist(), strict=True):
                self._labels[key] = label
                self._keys[label] = key

    def remove(self, key: str) -> bool:
        """Forget a key; False if it was not there."""
        with self._lock:
            return self._drop([key]) > 0

    def _drop(self, keys: Iterable[str]) -> int:
        # Lock held.
        labels = [label for key in keys if (label := self._labels.pop(key, None)) is not None]
        if labels:
            self._index.remove(np.array(labels, dtype=np.uint64))
            for label in labels:
                del self._keys[label]
        return len(labels)

    def clear(self) -> None:
        with self._lock:
            self._index = self._new_index()
            self._labels.clear()
            self._keys.clear()  # the label counter goes on: see the module docstring

    # ------------------------------------------------------------------------------ reading

    def search(self, vectors: npt.ArrayLike, k: int) -> list[list[tuple[str, float]]]:
        """The k nearest keys to each query row with their cosine similarity, best first."""
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        queries = self._unit(vectors)
        with self._lock:
            if not self._labels or not len(queries):
                return [[] for _ in range(len(queries))]
            matches: Any = self._index.search(queries, min(k, len(self._labels)))
            rows: Iterable[tuple[list[int], list[float], int]]
            if isinstance(matches, BatchMatches):
                keys_, distances_ = matches.keys.tolist(), matches.distances.tolist()
                rows = zip(keys_, distances_, matches.counts.tolist(), strict=True)
            else:  # one query row comes back as a plain Matches
                rows = [(matches.keys.tolist(), matches.distances.tolist(), len(matches))]
            keys = self._keys
            return [
                [
                    (keys[label], min(1.0, max(-1.0, 1.0 - distance)))
                    for label, distance in zip(labels[:count], distances[:count], strict=True)
                    if label in keys
                ]
                for labels, distances, count in rows
            ]

    def __len__(self) -> int:
        return len(self._labels)

    def __contains__(self, key: object) -> bool:
        return key in self._labels

    # ------------------------------------------------------------------------------ files

    def save(self) -> None:
        """Write the index to `path` and its keys to `path`.keys.json, each through a temporary file."""
        path, sidecar = self._files()
        with self._save_lock:
            # Serialised into memory under the lock (a copy), written to disk without holding it.
            with self._lock:
                graph = self._index.save()
                labels = list(self._keys)
                meta = {"format": SIDECAR_FORMAT, "dim": self.dim, "next": self._next}
                doc = orjson.dumps({**meta, "labels": labels, "keys": [self._keys[x] for x in labels]})
            assert graph is not None
            path.parent.mkdir(parents=True, exist_ok=True)
            # The graph first: a crash between the two renames leaves a pair that load() rejects.
            _write_atomically(path, graph)
            _write_atomically(sidecar, doc)

    def load(self) -> bool:
        """Replace the contents with the saved pair of files. False (and the index unchanged) when they
        are missing, unreadable, of another dimension or do not match each other: rebuild then."""
        path, sidecar = self._files()
        if not (path.is_file() and sidecar.is_file()):
            return False
        try:
            meta = Index.metadata(str(path))
            if meta is None or meta["dimensions"] != self.dim:
                raise ValueError(f"the saved index is not of dimension {self.dim}")
            doc = orjson.loads(sidecar.read_bytes())
            if doc.get("format") != SIDECAR_FORMAT or doc.get("dim") != self.dim:
                raise ValueError("the key file is of another format or dimension")
            labels: list[int] = doc["labels"]
            keys: list[str] = doc["keys"]
            if len(labels) != len(keys) or len(set(keys)) != len(keys):
                raise ValueError("the key file is inconsistent")
            index = self._new_index()
            index.load(str(path))
            # Not part of the file. usearch's stub declares the property without its setter.
            index.expansion_search = EXPANSION_SEARCH  # type: ignore[misc]
            wanted = np.array(labels, dtype=np.uint64)
            if len(index) != len(labels) or (labels and not np.all(index.contains(wanted))):
                raise ValueError("the index and the key file are from different saves")
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            log.warning("vector index %s not loaded (%s); it will be rebuilt", path, exc)
            return False
        with self._lock:
            self._index = index
            self._keys = dict(zip(labels, keys, strict=True))
            self._labels = {key: label for label, key in self._keys.items()}
            self._next = max(int(doc.get("next", 1)), max(labels, default=0) + 1)
        return True


def _write_atomically(path: Path, data: bytes | bytearray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
