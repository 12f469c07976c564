"""The ANN index behind the semantic cache: recall against brute force, replacement, removal, files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from iros.cache.index import VectorIndex

DIM = 384  # the packaged MiniLM's


def unit(rows: np.ndarray) -> np.ndarray:
    out: np.ndarray = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    return out


def random_unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    return unit(rng.standard_normal((n, dim)))


@pytest.fixture(scope="module")
def corpus() -> tuple[VectorIndex, np.ndarray]:
    rng = np.random.default_rng(11)
    vectors = random_unit(rng, 20_000)
    index = VectorIndex(DIM)
    index.add_many([f"k{i}" for i in range(len(vectors))], vectors)
    return index, vectors


def test_top1_recall_against_brute_force(corpus: tuple[VectorIndex, np.ndarray]) -> None:
    """Top-1 recall is at least 0.98 for queries near a stored vector, all asked in one batch call.

    The queries sit at cosine ~0.86 from their source, below any useful semantic-cache threshold.
    (Fully random queries in 384 dimensions have no meaningful nearest neighbour: every candidate is
    at ~0, and HNSW's top-1 is then a coin toss among near-ties.)
    """
    index, vectors = corpus
    rng = np.random.default_rng(12)
    sources = rng.choice(len(vectors), 500, replace=False)
    queries = unit(vectors[sources] + 0.03 * rng.standard_normal((500, DIM)))
    assert np.median(np.sum(queries * vectors[sources], axis=1)) == pytest.approx(0.86, abs=0.02)
    truth = np.argmax(queries @ vectors.T, axis=1)
    results = index.search(queries, 5)
    assert len(results) == len(queries)
    found = np.array([int(row[0][0][1:]) for row in results])
    assert (found == truth).mean() >= 0.98
    # Similarities are cosines, best first, and agree with numpy's to f16 precision.
    for q, row in zip(queries[:20], results[:20], strict=True):
        sims = [s for _, s in row]
        assert sims == sorted(sims, reverse=True)
        exact = vectors[[int(k[1:]) for k, _ in row]] @ q
        assert np.allclose(sims, exact, atol=0.01)


def test_single_query_and_unnormalised_input(corpus: tuple[VectorIndex, np.ndarray]) -> None:
    """A 1-d query is one row; vectors that are not unit length are normalised, not rejected."""
    index, vectors = corpus
    [row] = index.search(vectors[7] * 3.0, 1)
    assert row[0][0] == "k7" and row[0][1] == pytest.approx(1.0, abs=0.01)


def test_replace_and_remove() -> None:
    """Adding a key again replaces its vector; a removed key is never returned again."""
    rng = np.random.default_rng(3)
    a, b, c = random_unit(rng, 3, 16)
    index = VectorIndex(16)
    index.add("x", a)
    index.add("y", b)
    index.add("x", c)
    assert len(index) == 2
    assert index.search(c, 1)[0][0][0] == "x"
    assert all(s < 0.99 for _, s in index.search(a, 2)[0])  # a is gone: x now holds c
    assert index.remove("x") is True
    assert index.remove("x") is False
    assert "x" not in index and len(index) == 1
    assert [k for k, _ in index.search(np.stack([a, c]), 5)[1]] == ["y"]
    # Within one batch the last vector for a key wins.
    index.add_many(["z", "z"], np.stack([a, b]))
    assert len(index) == 2 and index.search(b, 2)[0][0][1] == pytest.approx(1.0, abs=0.01)
    index.clear()
    assert len(index) == 0 and index.search(np.stack([a, b]), 3) == [[], []]


def test_churn_keeps_recall() -> None:
    """Removing and adding many keys (as eviction does) reuses slots and keeps results right."""
    rng = np.random.default_rng(5)
    index = VectorIndex(32)
    live: dict[str, np.ndarray] = {}
    for round_ in range(5):
        batch = random_unit(rng, 1000, 32)
        keys = [f"r{round_}-{i}" for i in range(len(batch))]
        index.add_many(keys, batch)
        live.update(zip(keys, batch, strict=True))
        for key in list(live)[:800]:
            assert index.remove(key)
            del live[key]
    assert len(index) == len(live)
    keys = list(live)
    vectors = np.stack([live[k] for k in keys])
    results = index.search(vectors[:300], 1)
    assert sum(row[0][0] == key for row, key in zip(results, keys, strict=False)) >= 0.98 * 300


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    """A saved index loads into a new object with the same keys and answers."""
    rng = np.random.default_rng(8)
    vectors = random_unit(rng, 500, 64)
    path = tmp_path / "sub" / "index.usearch"
    index = VectorIndex(64, path)
    index.add_many([f"k{i}" for i in range(500)], vectors)
    index.remove("k3")
    index.save()
    assert not list(path.parent.glob("*.tmp"))

    loaded = VectorIndex(64, path)
    assert loaded.load() is True
    assert len(loaded) == 499 and "k3" not in loaded
    assert loaded.search(vectors[:50], 3) == index.search(vectors[:50], 3)
    # Labels go on from where the saved index left off: a re-added key replaces, nothing collides.
    loaded.add("k3", vectors[3])
    loaded.add("k4", vectors[5])
    assert loaded.search(vectors[5], 2)[0][0][0] in {"k4", "k5"}
    assert len(loaded) == 500


def test_load_rejects_missing_mismatched_or_foreign_files(tmp_path: Path) -> None:
    """load() says False, leaving the index as it was, for anything it cannot trust."""
    rng = np.random.default_rng(9)
    path = tmp_path / "index.usearch"
    index = VectorIndex(8, path)
    assert index.load() is False  # nothing saved yet
    index.add_many(["a", "b"], random_unit(rng, 2, 8))
    index.save()
    shutil.copy(index.sidecar, tmp_path / "old-keys")
    index.add("c", random_unit(rng, 1, 8))
    index.save()

    shutil.copy(tmp_path / "old-keys", index.sidecar)  # as if a crash fell between the two renames
    other = VectorIndex(8, path)
    other.add("keep", random_unit(rng, 1, 8))
    assert other.load() is False
    assert len(other) == 1 and "keep" in other

    assert VectorIndex(16, path).load() is False  # another dimension

    path.write_bytes(b"not an index")
    assert VectorIndex(8, path).load() is False


def test_bad_input_is_refused() -> None:
    """Wrong shapes, zero vectors and mismatched key counts raise ValueError."""
    index = VectorIndex(4)
    with pytest.raises(ValueError, match="dimension 4"):
        index.add("a", np.ones(5, dtype=np.float32))
    with pytest.raises(ValueError, match="not zero"):
        index.add("a", np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="2 keys for 1 vectors"):
        index.add_many(["a", "b"], np.ones((1, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="no path"):
        index.save()
    assert index.search(np.ones((2, 4), dtype=np.float32), 3) == [[], []]
