"""What every pair-model study shares: the QQP data, fold 0 of verifier_train's grouped folds, the
training examples verifier_train would build from the other folds, and fold 0's simulated benchmarks.

The random draws happen in verifier_train's order, so every study scores the same validation rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tools.verifier.data import (
    DEFAULT_DATA,
    FOLDS,
    REPEATS,
    SEED,
    Candidates,
    Data,
    assign_folds,
    embed_texts,
    question_groups,
    read_pairs,
    split_holdout,
    unique_texts,
)
from tools.verifier.eval import best_cut, precision_at
from tools.verifier.train import training_rows

OUT = Path(__file__).resolve().parents[2] / ".cache" / "iros" / "research"
GATE = 0.80  # the cache's default similarity threshold


@dataclass(slots=True)
class Fold:
    data: Data
    train_pairs: npt.NDArray[np.int64]
    val: Candidates  # fold 0's simulated benchmarks, 3 neighbours a lookup
    # Training examples: (query text, candidate text, label, cosine), candidates and labelled pairs.
    q: npt.NDArray[np.int64]
    c: npt.NDArray[np.int64]
    y: npt.NDArray[np.float32]
    s: npt.NDArray[np.float32]
    rng: np.random.Generator


def texts() -> list[str]:
    found, _, _ = unique_texts(read_pairs(DEFAULT_DATA))
    return found


def fold0() -> Fold:
    pairs = read_pairs(DEFAULT_DATA)
    all_texts, _, _ = unique_texts(pairs)
    data = Data(pairs, embed_texts(all_texts), all_texts)
    groups = question_groups(data.ia, data.ib, len(all_texts))
    _, trainable = split_holdout(data)
    rng = np.random.default_rng(SEED)
    fold_of = assign_folds(groups[trainable], FOLDS, rng)
    train_pairs, val_pairs = trainable[fold_of != 0], trainable[fold_of == 0]
    seen = training_rows(data, train_pairs, rng)
    keys = list(seen)
    val = data.benchmarks(val_pairs, REPEATS, rng, 3)
    return Fold(
        data,
        train_pairs,
        val,
        np.array([k[0] for k in keys]),
        np.array([k[1] for k in keys]),
        np.array([k[2] for k in keys], np.float32),
        np.array([seen[k] for k in keys], np.float32),
        rng,
    )


def show(tag: str, val: Candidates, logit: npt.NDArray[np.float64]) -> None:
    """Precision at each recall, and the best recall at precision 0.90, when the cache serves by `logit`."""
    one, gated = val.collapse(logit, GATE)
    print(tag, precision_at(gated, one), "cut for 0.90:", best_cut(gated, one, 0.9), flush=True)
