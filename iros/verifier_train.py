"""Train the semantic-cache verifier on QQP question pairs and write iros/verifier.json.

    python -m iros.verifier_train            # or scripts/train-verifier; deterministic, prints the CV metrics

What the cache does is simulated exactly as the cache benchmark measures it: every `a` of a set of pairs
is cached, every `b` asks, the nearest cached question is the candidate; a hit is true only on the
pair's own `a` of a duplicate pair, and queries whose text is cached verbatim (exact hits) are left out.
The verifier learns from those candidates (realistic false hits: hard negatives and other entries) and
from the labelled pairs. Folds are grouped by question (connected pairs stay together), so no question
is in both a training and a validation fold; the decision threshold is chosen on the pooled
out-of-fold scores. scikit-learn is needed here only: the exported model runs on numpy.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from iros.embedder import PACKAGED_MODEL, load_local_model
from iros.verifier import FEATURES, Featurizer, Verifier, parse

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
    return CACHE_DIR


def embed_texts(texts: list[str], model: str = PACKAGED_MODEL) -> npt.NDArray[np.float32]:
    """Unit vectors for `texts`, cached on disk under .cache/ keyed by the model and the texts."""
    digest = hashlib.sha256(model.encode())
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    path = _cache_dir() / f"embeddings-{digest.hexdigest()[:16]}.npy"
    if path.exists():
        cached: npt.NDArray[np.float32] = np.load(path)
        return cached
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


SEED = 7
FOLDS = 5
# Pairs per simulated benchmark. False hits on other entries grow with the share of each question's
# paraphrases that sit in the cache; benchmarks of this many pairs drawn from one fold reproduce the
# plain-cosine figures the cache benchmark measured on its held-out split (precision 0.70 at recall 0.50,
# 0.78 at 0.27). Whole folds, denser in paraphrases, are reported as well.
BENCH_PAIRS = 800
REPEATS = 3  # random partitions of each validation fold into benchmarks
TRAIN_REPEATS = 2
HOLDOUT = 2000  # the last lines of the data: never trained on (tests check the packaged verifier there)
TARGET_PRECISION = 0.90
OPERATING_POINTS = (0.75, 0.80, 0.85, 0.90, 0.95)
SIMILARITY_GRID = (0.70, 0.75, 0.80, 0.85, 0.90)
MIN_DF = 3  # words seen in fewer questions share one "rare" weight
GBM = {
    "max_iter": 200,
    "learning_rate": 0.05,
    "max_leaf_nodes": 15,
    "min_samples_leaf": 40,
    "l2_regularization": 1.0,
    "early_stopping": False,
}


@dataclass(slots=True)
class Candidates:
    """Lookups of one or more simulated benchmarks: what the verifier is asked, and the truth."""

    query: npt.NDArray[np.int64]  # text indices
    candidate: npt.NDArray[np.int64]
    similarity: npt.NDArray[np.float32]
    truth: npt.NDArray[np.bool_]  # a true hit if served
    counted: npt.NDArray[np.bool_]  # not an exact hit (those the exact cache answers)
    positives: int  # duplicate pairs the figures count (recall's denominator)
    bench: npt.NDArray[np.int64]  # which simulated benchmark each lookup belongs to

    @classmethod
    def concat(cls, parts: list[Candidates]) -> Candidates:
        offsets = np.cumsum([0] + [int(p.bench.max(initial=-1)) + 1 for p in parts])
        return cls(
            np.concatenate([p.query for p in parts]),
            np.concatenate([p.candidate for p in parts]),
            np.concatenate([p.similarity for p in parts]),
            np.concatenate([p.truth for p in parts]),
            np.concatenate([p.counted for p in parts]),
            sum(p.positives for p in parts),
            np.concatenate([p.bench + off for p, off in zip(parts, offsets, strict=False)]),
        )


class Data:
    def __init__(self, pairs: Pairs, vectors: npt.NDArray[np.float32], texts: list[str]) -> None:
        self.pairs = pairs
        self.texts = texts
        self.vectors = vectors
        index = {t: i for i, t in enumerate(texts)}
        self.ia = np.fromiter((index[t] for t in pairs.a), np.int64, len(pairs.a))
        self.ib = np.fromiter((index[t] for t in pairs.b), np.int64, len(pairs.b))
        self.y = pairs.label.astype(bool)
        dup = self.y
        self.duplicates = question_groups(self.ia[dup], self.ib[dup], len(texts), per_text=True)

    def simulate(self, subset: npt.NDArray[np.int64]) -> Candidates:
        """One benchmark over these pairs: cache their `a`s, ask with their `b`s."""
        ia, ib, y = self.ia[subset], self.ib[subset], self.y[subset]
        cache = np.unique(ia)
        idx, sim = nearest(self.vectors, ib, cache)
        cand = idx[:, 0]
        counted = ~np.isin(ib, cache)
        truth = (cand == ia) & y & counted
        return Candidates(
            ib, cand, sim[:, 0], truth, counted, int((y & counted).sum()), np.zeros(len(ib), np.int64)
        )

    def benchmarks(self, subset: npt.NDArray[np.int64], repeats: int, rng: np.random.Generator) -> Candidates:
        """Each repeat splits `subset` at random into benchmarks of BENCH_PAIRS pairs."""
        parts = []
        for _ in range(repeats):
            shuffled = rng.permutation(subset)
            chunks = max(1, round(len(subset) / BENCH_PAIRS))
            parts += [self.simulate(np.sort(c)) for c in np.array_split(shuffled, chunks)]
        return Candidates.concat(parts)


def question_groups(
    ia: npt.NDArray[np.int64], ib: npt.NDArray[np.int64], n: int, per_text: bool = False
) -> npt.NDArray[np.int64]:
    """Connected components of the graph of questions joined by these pairs: per pair, or per text."""
    parent = np.arange(n)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = int(parent[root])
        while parent[x] != root:
            parent[x], x = root, int(parent[x])
        return root

    for a, b in zip(ia.tolist(), ib.tolist(), strict=True):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
    if per_text:
        return np.fromiter((find(i) for i in range(n)), np.int64, n)
    return np.fromiter((find(a) for a in ia.tolist()), np.int64, len(ia))


def assign_folds(groups: npt.NDArray[np.int64], k: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """Whole groups to folds, largest first into the smallest fold, so folds are near equal in size."""
    ids, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = rng.permutation(len(ids))
    order = order[np.argsort(-counts[order], kind="stable")]
    sizes = np.zeros(k, np.int64)
    fold_of = np.empty(len(ids), np.int64)
    for g in order:
        f = int(np.argmin(sizes))
        fold_of[g] = f
        sizes[f] += counts[g]
    return fold_of[inverse]


def build_idf(texts: list[str]) -> dict[str, Any]:
    """Smoothed inverse document frequency of content words over these questions."""
    df: Counter[str] = Counter()
    for t in texts:
        df.update(parse(t).content)
    n = len(texts)
    words = {w: round(math.log((1 + n) / (1 + c)), 3) for w, c in sorted(df.items()) if c >= MIN_DF}
    return {"words": words, "rare": round(math.log((1 + n) / 2), 3), "questions": n}


def training_set(
    data: Data, subset: npt.NDArray[np.int64], featurize: Featurizer, rng: np.random.Generator
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Candidates the cache would meet (simulated benchmarks) plus every labelled pair, each once."""
    seen: dict[tuple[int, int, bool], float] = {}
    found = data.benchmarks(subset, TRAIN_REPEATS, rng)
    for q, c, s, t, k in zip(
        found.query.tolist(),
        found.candidate.tolist(),
        found.similarity.tolist(),
        found.truth.tolist(),
        found.counted.tolist(),
        strict=True,
    ):
        if k:
            seen.setdefault((q, c, t), s)
    va, vb = data.vectors[data.ia[subset]], data.vectors[data.ib[subset]]
    cosines = (va * vb).sum(axis=1)
    for a, b, label, s in zip(
        data.ia[subset].tolist(),
        data.ib[subset].tolist(),
        data.y[subset].tolist(),
        cosines.tolist(),
        strict=True,
    ):
        if a != b:
            seen.setdefault((b, a, label), s)
    texts = data.texts
    x = np.stack([featurize(texts[q], texts[c], s) for (q, c, _), s in seen.items()])
    y = np.fromiter((t for (_, _, t) in seen), bool, len(seen))
    return x, y


def fit(x: npt.NDArray[np.float64], y: npt.NDArray[np.bool_]) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    model = HistGradientBoostingClassifier(**GBM, random_state=SEED)
    model.fit(x, y)
    return model


def export(model: Any, x_check: npt.NDArray[np.float64]) -> dict[str, Any]:
    """The fitted trees as padded arrays for Verifier's numpy inference (checked against sklearn)."""
    trees = [predictors[0].nodes for predictors in model._predictors]
    width = max(len(t) for t in trees)
    depth = max(int(t["depth"].max()) for t in trees)
    shape = (len(trees), width)
    feature = np.zeros(shape, np.int64)
    split = np.zeros(shape)
    left = np.zeros(shape, np.int64)
    right = np.zeros(shape, np.int64)
    value = np.zeros(shape)
    for i, t in enumerate(trees):
        n = len(t)
        leaf = t["is_leaf"].astype(bool)
        feature[i, :n] = np.where(leaf, 0, t["feature_idx"])
        split[i, :n] = np.where(leaf, 0.0, t["num_threshold"])
        # Leaves (and padding) lead to themselves, so every row can take `depth` steps.
        own = np.arange(width)
        left[i] = own
        right[i] = own
        left[i, :n] = np.where(leaf, own[:n], t["left"])
        right[i, :n] = np.where(leaf, own[:n], t["right"])
        value[i, :n] = np.where(leaf, [_short(v) for v in t["value"]], 0.0)
    params = {
        "kind": "trees",
        "feature": feature.tolist(),
        "split": split.tolist(),
        "left": left.tolist(),
        "right": right.tolist(),
        "value": value.tolist(),
        "depth": depth,
        "base": float(np.ravel(model._baseline_prediction)[0]),
    }
    ours = _scores(params, x_check)
    theirs = model.predict_proba(x_check)[:, 1]
    if not np.allclose(ours, theirs, atol=1e-4):
        raise RuntimeError(f"exported trees disagree with scikit-learn by {np.abs(ours - theirs).max():g}")
    return params


def _short(value: float) -> float:
    # Leaf values to six significant digits keep the file small; export() checks the scores still agree.
    return float(f"{value:.6g}")


def _scores(model: dict[str, Any], x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    verifier = Verifier(
        {
            "features": list(FEATURES),
            "embedding_model": PACKAGED_MODEL,
            "threshold": 0.5,
            "similarity_threshold": 0.0,
            "idf": {"words": {}, "rare": 0.0},
            "model": model,
        }
    )
    return verifier._scores(x)


def score_candidates(verifier: Verifier, data: Data, found: Candidates) -> npt.NDArray[np.float64]:
    texts = data.texts
    x = np.stack(
        [
            verifier.features(texts[q], texts[c], s)
            for q, c, s in zip(
                found.query.tolist(), found.candidate.tolist(), found.similarity.tolist(), strict=True
            )
        ]
    )
    return verifier._scores(x)


def figures(found: Candidates, accept: npt.NDArray[np.bool_]) -> dict[str, float | int]:
    served = accept & found.counted
    true = int((served & found.truth).sum())
    hits = int(served.sum())
    return {
        "precision": round(true / hits, 4) if hits else 0.0,
        "recall": round(true / found.positives, 4) if found.positives else 0.0,
        "true_hits": true,
        "false_hits": hits - true,
    }


def best_cut(
    score: npt.NDArray[np.float64], found: Candidates, target: float
) -> tuple[float, float, float] | None:
    """The lowest score cut whose hits reach `target` precision: (cut, precision, recall)."""
    s = np.where(found.counted, score, -np.inf)
    order = np.argsort(-s, kind="stable")
    true = np.cumsum(found.truth[order])
    hits = np.arange(1, len(order) + 1)
    precision = true / hits
    ok = np.flatnonzero((precision >= target) & np.isfinite(s[order]))
    if not len(ok):
        return None
    # Only cut between distinct scores: ties are accepted or rejected together.
    sorted_s = s[order]
    distinct = np.r_[sorted_s[1:] < sorted_s[:-1], True]
    ok = ok[distinct[ok]]
    if not len(ok):
        return None
    i = int(ok[np.argmax(true[ok])])
    return float(sorted_s[i]), float(precision[i]), float(true[i] / found.positives)


@dataclass(slots=True)
class Fold:
    sparse: Candidates
    sparse_score: npt.NDArray[np.float64]
    dense: Candidates
    dense_score: npt.NDArray[np.float64]


def train(data: Data, subset: npt.NDArray[np.int64], rng: np.random.Generator) -> Verifier:
    """A verifier (threshold still unset) trained on these pairs only, idf included."""
    texts = sorted({data.texts[i] for i in (*data.ia[subset].tolist(), *data.ib[subset].tolist())})
    idf = build_idf(texts)
    featurize = Featurizer(idf["words"], idf["rare"])
    x, y = training_set(data, subset, featurize, rng)
    model = fit(x, y)
    params = {
        "features": list(FEATURES),
        "embedding_model": PACKAGED_MODEL,
        "threshold": 0.5,
        "similarity_threshold": 0.0,
        "idf": idf,
        "model": export(model, x),
        "training_examples": {"total": len(y), "positive": int(y.sum())},
    }
    return Verifier(params)


def choose(folds: list[Fold], target: float) -> tuple[float, float]:
    """(similarity threshold, score threshold) with the most pooled recall at `target` precision.

    Of similarity thresholds within 1% of the best recall the highest wins: fewer candidates to verify.
    """
    found = Candidates.concat([f.sparse for f in folds])
    score = np.concatenate([f.sparse_score for f in folds])
    cuts = {}
    for sim in SIMILARITY_GRID:
        cut = best_cut(np.where(found.similarity >= sim, score, -np.inf), found, target)
        if cut is not None:
            cuts[sim] = cut
    if not cuts:
        raise RuntimeError(f"no operating point reaches precision {target} in cross-validation")
    best = max(cut[2] for cut in cuts.values())
    sim = max(s for s, cut in cuts.items() if cut[2] >= 0.99 * best)
    return sim, cuts[sim][0]


def cosine_at_recall(found: Candidates, recall: float) -> dict[str, float | int]:
    """Plain cosine's figures at the first similarity cut that recalls at least `recall`."""
    s = np.where(found.counted, found.similarity.astype(np.float64), -np.inf)
    order = np.argsort(-s, kind="stable")
    true = np.cumsum(found.truth[order])
    i = min(int(np.searchsorted(true / max(found.positives, 1), recall)), len(order) - 1)
    return {**figures(found, s >= s[order[i]]), "similarity": round(float(s[order[i]]), 4)}


def report(
    data: Data, found: Candidates, score: npt.NDArray[np.float64], sim: float, cut: float
) -> dict[str, Any]:
    accept = (found.similarity >= sim) & (score >= cut)
    mine = figures(found, accept)
    out: dict[str, Any] = {
        "benchmarks": int(found.bench.max()) + 1,
        "verifier": mine,
        "cosine_at_similarity_threshold": figures(found, found.similarity >= sim),
        "cosine_at_same_recall": cosine_at_recall(found, float(mine["recall"])),
        # Serving exactly the candidates the labels call duplicates of the query (label-1 pairs, joined
        # transitively): the benchmark still counts a hit on another cached paraphrase as false.
        "labels_ceiling": figures(found, data.duplicates[found.query] == data.duplicates[found.candidate]),
    }
    cosine_cut = best_cut(found.similarity.astype(np.float64), found, TARGET_PRECISION)
    out["cosine_best_recall_at_target"] = round(cosine_cut[2], 4) if cosine_cut else 0.0
    gated = np.where(found.similarity >= sim, score, -np.inf)
    out["curve"] = {
        "verifier": precision_at(gated, found, CURVE_RECALLS),
        "cosine": precision_at(found.similarity.astype(np.float64), found, CURVE_RECALLS),
    }
    return out


CURVE_RECALLS = (0.1, 0.2, 0.27, 0.3, 0.4, 0.5)


def precision_at(
    score: npt.NDArray[np.float64], found: Candidates, recalls: tuple[float, ...]
) -> dict[str, float | None]:
    """Precision where the hits, best score first, first reach each recall (None: never reached)."""
    s = np.where(found.counted, score, -np.inf)
    order = np.argsort(-s, kind="stable")
    true = np.cumsum(found.truth[order])
    recall = true / max(found.positives, 1)
    out: dict[str, float | None] = {}
    for r in recalls:
        i = int(np.searchsorted(recall, r))
        reached = i < len(order) and bool(np.isfinite(s[order[i]]))
        out[f"{r:g}"] = round(float(true[i] / (i + 1)), 4) if reached else None
    return out


def per_fold(folds: list[Fold], sim: float, cut: float, dense: bool) -> list[float]:
    out = []
    for f in folds:
        found, score = (f.dense, f.dense_score) if dense else (f.sparse, f.sparse_score)
        out.append(float(figures(found, (found.similarity >= sim) & (score >= cut))["precision"]))
    return out


def split_holdout(data: Data) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The last HOLDOUT pairs, and the pairs that share no question with them (the ones to train on)."""
    n = len(data.ia)
    holdout = np.arange(n - HOLDOUT, n)
    held_texts = np.union1d(data.ia[holdout], data.ib[holdout])
    shares = np.isin(data.ia, held_texts) | np.isin(data.ib, held_texts)
    shares[holdout] = True
    return holdout, np.flatnonzero(~shares)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import time

    import sklearn
    from rich.console import Console

    parser = argparse.ArgumentParser(prog="train-verifier", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("verifier.json"))
    args = parser.parse_args(argv)
    console = Console()
    started = time.monotonic()

    pairs = read_pairs(args.data)
    texts, _, _ = unique_texts(pairs)
    data = Data(pairs, embed_texts(texts), texts)
    groups = question_groups(data.ia, data.ib, len(texts))
    holdout, trainable = split_holdout(data)
    rng = np.random.default_rng(SEED)
    fold_of = assign_folds(groups[trainable], FOLDS, rng)

    folds: list[Fold] = []
    for k in range(FOLDS):
        console.print(f"fold {k + 1}/{FOLDS}: training on {int((fold_of != k).sum())} pairs")
        verifier = train(data, trainable[fold_of != k], rng)
        val = trainable[fold_of == k]
        sparse = data.benchmarks(val, REPEATS, rng)
        dense = data.simulate(val)
        folds.append(
            Fold(
                sparse,
                score_candidates(verifier, data, sparse),
                dense,
                score_candidates(verifier, data, dense),
            )
        )
    sim, cut = choose(folds, TARGET_PRECISION)
    pooled = Candidates.concat([f.sparse for f in folds])
    pooled_score = np.concatenate([f.sparse_score for f in folds])
    gated = np.where(pooled.similarity >= sim, pooled_score, -np.inf)
    # Other precisions the cache may be tuned to (its precision_floor), with what they cost in recall.
    points = []
    for target in OPERATING_POINTS:
        found_cut = best_cut(gated, pooled, target)
        if found_cut is not None:
            points.append(
                {"precision": target, "threshold": found_cut[0], "cv_recall": round(found_cut[2], 4)}
            )

    console.print(f"final model: training on {len(trainable)} pairs")
    final = train(data, trainable, rng)
    held = data.simulate(holdout)
    metrics = {
        "target_precision": TARGET_PRECISION,
        "cv": {
            "folds": FOLDS,
            "grouped_by": "question (pairs sharing a question stay in one fold)",
            "benchmark_pairs": BENCH_PAIRS,
            "repeats": REPEATS,
            **report(data, pooled, pooled_score, sim, cut),
            "verifier_precision_by_fold": per_fold(folds, sim, cut, dense=False),
            "dense": {
                "note": "each whole validation fold (~7,500 pairs) as one benchmark: denser in paraphrases",
                **report(
                    data,
                    Candidates.concat([f.dense for f in folds]),
                    np.concatenate([f.dense_score for f in folds]),
                    sim,
                    cut,
                ),
                "verifier_precision_by_fold": per_fold(folds, sim, cut, dense=True),
            },
        },
        "holdout": {
            "pairs": f"the last {HOLDOUT} lines as one benchmark; no question of them was trained on",
            **report(data, held, score_candidates(final, data, held), sim, cut),
        },
    }
    digest = hashlib.sha256(args.data.read_bytes()).hexdigest()
    params = {
        "version": 1,
        "features": list(FEATURES),
        "embedding_model": PACKAGED_MODEL,
        "threshold": cut,
        "similarity_threshold": sim,
        "operating_points": points,
        "metrics": metrics,
        "training": {
            "data": args.data.name,
            "data_sha256": digest,
            "pairs": len(trainable),
            "examples": final.params["training_examples"],
            "seed": SEED,
            "model": "HistGradientBoostingClassifier",
            "params": GBM,
            "scikit_learn": sklearn.__version__,
        },
        "idf": final.params["idf"],
        "model": final.params["model"],
    }
    write_params(params, args.out)
    show(console, metrics, sim, cut)
    console.print(f"wrote {args.out} in {time.monotonic() - started:.0f} s")


def write_params(params: dict[str, Any], path: Path) -> None:
    # One top-level key a line (metrics indented): small diffs when retrained, and still one small file.
    lines = []
    for key, value in params.items():
        if key in ("metrics", "training", "operating_points"):
            text = json.dumps(value, indent=2, ensure_ascii=False).replace("\n", "\n  ")
        else:
            text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        lines.append(f"  {json.dumps(key)}: {text}")
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")


def show(console: Any, metrics: dict[str, Any], sim: float, cut: float) -> None:
    from rich.table import Table

    table = Table(
        title=f"verifier at similarity ≥ {sim}, score ≥ {cut:.3f} (target precision {TARGET_PRECISION})"
    )
    for col in (
        "split",
        "verifier P",
        "verifier R",
        "cosine P @ same R",
        "cosine P/R @ sim",
        "cosine R @ P≥0.9",
    ):
        table.add_column(col)
    rows = [
        (f"CV, {BENCH_PAIRS}-pair benchmarks", metrics["cv"]),
        ("CV, whole folds", metrics["cv"]["dense"]),
        (f"hold-out, {HOLDOUT} pairs", metrics["holdout"]),
    ]
    for name, m in rows:
        v, same, at = m["verifier"], m["cosine_at_same_recall"], m["cosine_at_similarity_threshold"]
        table.add_row(
            name,
            f"{v['precision']:.3f}",
            f"{v['recall']:.3f}",
            f"{same['precision']:.3f}",
            f"{at['precision']:.3f} / {at['recall']:.3f}",
            f"{m['cosine_best_recall_at_target']:.3f}",
        )
    console.print(table)
    console.print(f"CV precision by fold: {metrics['cv']['verifier_precision_by_fold']}")
    for name, m in rows:
        console.print(f"{name}: precision at recall {m['curve']}")


if __name__ == "__main__":
    main()
