"""The verifier's gradient-boosted trees: fitted with scikit-learn, exported as padded numpy arrays.

    model = fit(x, y)                  # HistGradientBoostingClassifier on the hand-made features
    params = export(model, x)          # what verifier.json's "model" holds; checked against scikit-learn

scikit-learn is needed here only: Verifier runs the exported trees on numpy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from iros.cache.verifier.model import Trees

GBM = {
    "max_iter": 200,
    "learning_rate": 0.05,
    "max_leaf_nodes": 15,
    "min_samples_leaf": 40,
    "l2_regularization": 1.0,
    "early_stopping": False,
}


def fit(
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.bool_],
    seed: int,
    weight: npt.NDArray[np.float64] | None = None,
    params: dict[str, Any] | None = None,
) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    model = HistGradientBoostingClassifier(**(params or GBM), random_state=seed)
    model.fit(x, y, sample_weight=weight)
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
    ours = 1.0 / (1.0 + np.exp(-logits(params, x_check)))
    theirs = model.predict_proba(x_check)[:, 1]
    if not np.allclose(ours, theirs, atol=1e-4):
        raise RuntimeError(f"exported trees disagree with scikit-learn by {np.abs(ours - theirs).max():g}")
    return params


def _short(value: float) -> float:
    # Leaf values to six significant digits keep the file small; export() checks the scores still agree.
    return float(f"{value:.6g}")


def logits(model: dict[str, Any], x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The exported trees' logits for feature rows `x`, as Verifier computes them."""
    return Trees(model).logits(x)
