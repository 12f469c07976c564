"""Train the semantic-cache verifier on QQP question pairs and write iros/cache/verifier/verifier.json.

    python -m tools.verifier.train     # or scripts/train-verifier; deterministic, prints the CV metrics

The cache benchmark is simulated exactly (tools.verifier.data): every `a` of a set of pairs is cached,
every `b` asks, and the verifier sees the `NEIGHBOURS` nearest cached questions. Gradient-boosted trees
(tools.verifier.trees) learn from those candidates (realistic false hits: hard negatives and other
entries) and from the labelled pairs, over the hand-made features plus how well the two questions'
MiniLM token embeddings align (iros.cache.verifier.tokens); fallback trees learn the hand-made features
alone, for embedders that give no token embeddings. Folds are grouped by question (connected pairs
stay together), so no question is in both a training and a validation fold; the cuts are chosen on the
pooled out-of-fold scores at the cache's default similarity threshold. The last HOLDOUT lines are
never trained on, only reported.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from iros.cache.embedder import PACKAGED_MODEL
from iros.cache.verifier.model import FEATURES, Featurizer
from iros.cache.verifier.tokens import ALIGN_FEATURES, TokenProjection, align_features
from iros.config import CacheSettings
from tools.verifier import trees as verifier_trees
from tools.verifier.data import (
    DEFAULT_DATA,
    FOLDS,
    HOLDOUT,
    REPEATS,
    ROOT,
    SEED,
    TRAIN_REPEATS,
    Candidates,
    Data,
    TokenStore,
    assign_folds,
    build_idf,
    cache_dir,
    embed_texts,
    question_groups,
    read_pairs,
    split_holdout,
    unique_texts,
)
from tools.verifier.eval import best_cut, report, similarity_curve

TARGET_PRECISION = 0.90
OPERATING_POINTS = (0.75, 0.80, 0.85, 0.90, 0.95)
SIMILARITY_GRID = (0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90)
# The cache's default similarity threshold: the cut is chosen for it (one rule, see verifier.py).
GATE = CacheSettings().similarity_threshold
NEIGHBOURS = 3  # nearest cached questions the verifier chooses among
PROJECTION = 0  # token dimensions kept for the alignment (principal components); 0: all 384
PROJECTION_SAMPLE = 200_000  # tokens the principal components are computed from


class Aligner:
    """Alignment features of (query text, candidate text) index pairs, each text projected once."""

    def __init__(self, store: TokenStore, projection: TokenProjection) -> None:
        self.store = store
        self.projection = projection
        self._texts: dict[int, npt.NDArray[np.float16]] = {}
        self._pairs: dict[tuple[int, int], npt.NDArray[np.float64]] = {}

    def _text(self, i: int) -> npt.NDArray[np.float16]:
        found = self._texts.get(i)
        if found is None:
            found = self._texts[i] = self.projection(self.store.text(i))
        return found

    def __call__(
        self, query: npt.NDArray[np.int64], candidate: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.float64]:
        out = np.empty((len(query), len(ALIGN_FEATURES)))
        for row, key in enumerate(zip(query.tolist(), candidate.tolist(), strict=True)):
            found = self._pairs.get(key)
            if found is None:
                found = self._pairs[key] = align_features(self._text(key[0]), self._text(key[1]))
            out[row] = found
        return out


def principal_components(store: TokenStore, dim: int) -> npt.NDArray[np.float32] | None:
    """(384, dim): the token space's main directions, from a fixed sample (deterministic); None for all."""
    if not dim:
        return None
    rows = np.sort(np.random.default_rng(SEED).choice(len(store.flat), PROJECTION_SAMPLE, replace=False))
    _, _, vt = np.linalg.svd(store.flat[rows].astype(np.float64), full_matrices=False)
    components: npt.NDArray[np.float32] = vt[:dim].T.astype(np.float32)
    return components


@dataclass(slots=True)
class Examples:
    """(query text, candidate text) index pairs with their hand-made features and labels."""

    query: npt.NDArray[np.int64]
    candidate: npt.NDArray[np.int64]
    x: npt.NDArray[np.float64]
    y: npt.NDArray[np.bool_]


def featurize(data: Data, found: Candidates, features: Featurizer) -> npt.NDArray[np.float64]:
    texts = data.texts
    return np.stack(
        [
            features(texts[q], texts[c], s)
            for q, c, s in zip(
                found.query.tolist(), found.candidate.tolist(), found.similarity.tolist(), strict=True
            )
        ]
    )


def training_rows(
    data: Data, subset: npt.NDArray[np.int64], rng: np.random.Generator
) -> dict[tuple[int, int, bool], float]:
    """(query text, candidate text, label) -> cosine: the candidates the cache would meet (simulated
    benchmarks) plus every labelled pair, each once."""
    seen: dict[tuple[int, int, bool], float] = {}
    found = data.benchmarks(subset, TRAIN_REPEATS, rng, NEIGHBOURS)
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
    return seen


def training_set(
    data: Data, subset: npt.NDArray[np.int64], features: Featurizer, rng: np.random.Generator
) -> Examples:
    """training_rows() with their hand-made features."""
    seen = training_rows(data, subset, rng)
    keys = list(seen)
    query = np.fromiter((q for q, _, _ in keys), np.int64, len(keys))
    candidate = np.fromiter((c for _, c, _ in keys), np.int64, len(keys))
    texts = data.texts
    x = np.stack([features(texts[q], texts[c], seen[(q, c, t)]) for q, c, t in keys])
    return Examples(query, candidate, x, np.fromiter((t for _, _, t in keys), bool, len(keys)))


@dataclass(slots=True)
class Model:
    idf: dict[str, Any]
    features: Featurizer
    trees: dict[str, Any]  # over FEATURES + ALIGN_FEATURES
    fallback: dict[str, Any]  # over FEATURES alone
    examples: dict[str, int]

    def logits(
        self, data: Data, aligner: Aligner, found: Candidates
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """(trees, fallback trees) logits of every row of `found`."""
        x = featurize(data, found, self.features)
        xa = np.hstack([x, aligner(found.query, found.candidate)])
        return verifier_trees.logits(self.trees, xa), verifier_trees.logits(self.fallback, x)


def train(data: Data, aligner: Aligner, subset: npt.NDArray[np.int64], rng: np.random.Generator) -> Model:
    """Both tree models trained on these pairs only, idf included."""
    texts = sorted({data.texts[i] for i in (*data.ia[subset].tolist(), *data.ib[subset].tolist())})
    idf = build_idf(texts)
    features = Featurizer(idf["words"], idf["rare"])
    ex = training_set(data, subset, features, rng)
    xa = np.hstack([ex.x, aligner(ex.query, ex.candidate)])
    trees = verifier_trees.export(verifier_trees.fit(xa, ex.y, SEED), xa)
    fallback = verifier_trees.export(verifier_trees.fit(ex.x, ex.y, SEED), ex.x)
    return Model(idf, features, trees, fallback, {"total": len(ex.y), "positive": int(ex.y.sum())})


def _cut(found: Candidates, logit: npt.NDArray[np.float64], target: float) -> tuple[float, float] | None:
    """(probability cut, pooled recall) at the gate for `target` precision."""
    one, s = found.collapse(logit, GATE)
    cut = best_cut(s, one, target)
    if cut is None:
        return None
    return float(1.0 / (1.0 + np.exp(-cut[0]))), cut[2]


def _probability(logit: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    out: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-logit))
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    import sklearn
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    parser = argparse.ArgumentParser(prog="train-verifier", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "iros" / "cache" / "verifier" / "verifier.json")
    args = parser.parse_args(argv)
    console = Console()
    started = time.monotonic()

    pairs = read_pairs(args.data)
    texts, _, _ = unique_texts(pairs)
    data = Data(pairs, embed_texts(texts), texts)
    columns = (
        *Progress.get_default_columns()[:2],
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("token embeddings", total=len(texts))
        store = TokenStore.build(
            texts, cache_dir(), progress=lambda done, total: bar.update(task, completed=done, total=total)
        )
        bar.update(task, completed=len(texts))
        components = principal_components(store, PROJECTION)
        aligner = Aligner(store, TokenProjection(components))
        groups = question_groups(data.ia, data.ib, len(texts))
        holdout, trainable = split_holdout(data)
        rng = np.random.default_rng(SEED)
        fold_of = assign_folds(groups[trainable], FOLDS, rng)

        found_parts: list[Candidates] = []
        tree_parts: list[npt.NDArray[np.float64]] = []
        fallback_parts: list[npt.NDArray[np.float64]] = []
        task = bar.add_task("cross-validation folds, then the final model", total=FOLDS + 1)
        for k in range(FOLDS):
            model = train(data, aligner, trainable[fold_of != k], rng)
            found = data.benchmarks(trainable[fold_of == k], REPEATS, rng, NEIGHBOURS)
            trees, fallback_logits = model.logits(data, aligner, found)
            found_parts.append(found)
            tree_parts.append(trees)
            fallback_parts.append(fallback_logits)
            bar.advance(task)
        final = train(data, aligner, trainable, rng)
        bar.advance(task)
        held = data.simulate(holdout, NEIGHBOURS)
        held_trees, _ = final.logits(data, aligner, held)

    pooled = Candidates.concat(found_parts)
    trees, fallback_logits = np.concatenate(tree_parts), np.concatenate(fallback_parts)
    cut, fallback = _cut(pooled, trees, TARGET_PRECISION), _cut(pooled, fallback_logits, TARGET_PRECISION)
    if cut is None or fallback is None:
        raise RuntimeError(f"no operating point reaches precision {TARGET_PRECISION} in cross-validation")
    # Other precisions the cache may be held to, with what they cost in recall.
    points = []
    for target in OPERATING_POINTS:
        aligned, alone = _cut(pooled, trees, target), _cut(pooled, fallback_logits, target)
        if aligned is not None and alone is not None:
            points.append(
                {
                    "precision": target,
                    "threshold": aligned[0],
                    "cv_recall": round(aligned[1], 4),
                    "fallback_threshold": alone[0],
                    "fallback_cv_recall": round(alone[1], 4),
                }
            )
    probability = _probability(trees)
    metrics = {
        "target_precision": TARGET_PRECISION,
        "cv": {
            "folds": FOLDS,
            "grouped_by": "question (pairs sharing a question stay in one fold)",
            "repeats": REPEATS,
            **report(data, pooled, probability, GATE, cut[0]),
            "fallback": report(data, pooled, _probability(fallback_logits), GATE, fallback[0]),
        },
        "holdout": {
            "pairs": f"the last {HOLDOUT} lines as one benchmark; no question of them was trained on",
            **report(data, held, _probability(held_trees), GATE, cut[0]),
        },
    }
    params = {
        "version": 2,
        "features": list(FEATURES),
        "embedding_model": PACKAGED_MODEL,
        "similarity_threshold": GATE,
        "neighbours": NEIGHBOURS,
        "threshold": cut[0],
        "fallback_threshold": fallback[0],
        "align": {
            "features": list(ALIGN_FEATURES),
            "projection": None if components is None else np.round(components, 5).tolist(),
        },
        "operating_points": points,
        "curve": similarity_curve(pooled, probability, cut[0], SIMILARITY_GRID),
        "metrics": metrics,
        "training": {
            "data": args.data.name,
            "data_sha256": hashlib.sha256(args.data.read_bytes()).hexdigest(),
            "pairs": len(trainable),
            "examples": final.examples,
            "seed": SEED,
            "model": "HistGradientBoostingClassifier",
            "params": verifier_trees.GBM,
            "scikit_learn": sklearn.__version__,
        },
        "idf": final.idf,
        "model": final.trees,
        "fallback_model": final.fallback,
    }
    write_params(params, args.out)
    show(console, metrics, cut[0])
    console.print(f"wrote {args.out} in {time.monotonic() - started:.0f} s")


def write_params(params: dict[str, Any], path: Path) -> None:
    # One top-level key a line (metrics indented): small diffs when retrained, and still one small file.
    lines = []
    for key, value in params.items():
        if key in ("metrics", "training", "operating_points", "curve"):
            text = json.dumps(value, indent=2, ensure_ascii=False).replace("\n", "\n  ")
        else:
            text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        lines.append(f"  {json.dumps(key)}: {text}")
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")


def show(console: Any, metrics: dict[str, Any], cut: float) -> None:
    from rich.table import Table

    table = Table(
        title=f"verifier at similarity ≥ {GATE}, best of {NEIGHBOURS} neighbours, score ≥ {cut:.3f} "
        f"(target precision {TARGET_PRECISION})"
    )
    for col in (
        "split",
        "verifier P",
        "verifier R",
        "cosine P @ same R",
        "cosine P/R @ gate",
        "labels ceiling P",
    ):
        table.add_column(col)
    rows = [
        ("CV, fallback (no tokens)", metrics["cv"]["fallback"]),
        ("CV", metrics["cv"]),
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
            f"{m['labels_ceiling']['precision']:.3f}",
        )
    console.print(table)
    for name, m in rows:
        console.print(f"{name}: precision at recall {m['curve']['verifier']}")


if __name__ == "__main__":
    main()
