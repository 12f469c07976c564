"""The packaged verifier's model (trees over hand-made and token-alignment features) trained on folds
1-4 and scored on fold 0, beside the studies' scores and their sums (z-scored logits).

    python research/pair_models/compare.py     # after head.py and joint.py
"""

from __future__ import annotations

import numpy as np
from common import GATE, OUT, fold0, show

from iros.verifier_data import SEED, TokenStore, cache_dir
from iros.verifier_tokens import TokenProjection
from iros.verifier_train import Aligner, train

fold = fold0()
val = fold.val
aligner = Aligner(TokenStore.build(fold.data.texts, cache_dir()), TokenProjection(None))
trees, _ = train(fold.data, aligner, fold.train_pairs, np.random.default_rng(SEED)).logits(
    fold.data, aligner, val
)
live = val.similarity >= GATE
scores = {"trees": trees}
for name in ("head_val_128", "joint_val_4", "joint_val_0"):
    if (OUT / f"{name}.npy").exists():
        scores[name] = np.where(live, np.load(OUT / f"{name}.npy"), -np.inf)


def z(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.where(live, (x - x[live].mean()) / x[live].std(), -np.inf)
    return out


for name, s in scores.items():
    show(name, val, s)
for name, s in scores.items():
    if name != "trees":
        show(f"trees + {name}", val, z(trees) + z(s))
show("all", val, sum((z(s) for s in scores.values()), np.zeros(len(trees))))
