"""The packaged verifier's model (trees over hand-made and token-alignment features) trained on folds
1-4 and scored on fold 0, beside the studies' scores and their sums (z-scored logits).

    python research/pair_models/compare.py     # after head.py and joint.py
"""

from __future__ import annotations

import numpy as np
from common import GATE, OUT, fold0, show

from iros.cache.verifier.tokens import TokenProjection
from tools.verifier.data import SEED, TokenStore, cache_dir
from tools.verifier.train import Aligner, train

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

# The trees' false hits at recall 0.30: how many served another cached question that the labels join to
# the query as a duplicate (the benchmark counts only the pair's own entry as true).
one, gated = val.collapse(trees, GATE)
order = np.argsort(-np.where(one.counted, gated, -np.inf), kind="stable")
true_so_far = np.cumsum(one.truth[order])
served = order[: int(np.searchsorted(true_so_far / one.positives, 0.30)) + 1]
false = served[~one.truth[served]]
duplicates = fold.data.duplicates
same = int((duplicates[one.query[false]] == duplicates[one.candidate[false]]).sum())
precision, counting_those = 1 - len(false) / len(served), 1 - (len(false) - same) / len(served)
print(
    f"trees at recall 0.30: {len(served)} hits, {len(false)} false, {same} of them on a labelled duplicate;"
    f" precision {precision:.3f}, {counting_those:.3f} counting those true"
)
