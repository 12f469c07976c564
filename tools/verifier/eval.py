"""How a verifier's scores would do in the cache benchmark: precision, recall, cuts and curves.

    cut = best_cut(score, found, 0.90)            # (score cut, precision, recall) or None
    precision_at(score, found, (0.1, 0.3))        # {"0.1": 0.93, "0.3": 0.87}
    figures(found, accept)                        # {"precision", "recall", "true_hits", "false_hits"}

`found` holds one row per lookup (Candidates.collapse picks it) and `score` is -inf where nothing may be
served.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from tools.verifier.data import Candidates, Data

CURVE_RECALLS = (0.1, 0.2, 0.27, 0.3, 0.4, 0.5)


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


def _ranked(
    score: npt.NDArray[np.float64], found: Candidates
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Scores best first (uncounted lookups last), true hits so far, and precision so far."""
    s = np.where(found.counted, score, -np.inf)
    order = np.argsort(-s, kind="stable")
    true: npt.NDArray[np.int64] = np.cumsum(found.truth[order], dtype=np.int64)
    ranked: npt.NDArray[np.float64] = s[order]
    return ranked, true, true / np.arange(1, len(order) + 1)


def best_cut(
    score: npt.NDArray[np.float64], found: Candidates, target: float
) -> tuple[float, float, float] | None:
    """The lowest score cut whose hits reach `target` precision: (cut, precision, recall)."""
    sorted_s, true, precision = _ranked(score, found)
    ok = np.flatnonzero((precision >= target) & np.isfinite(sorted_s))
    # Only cut between distinct scores: ties are accepted or rejected together.
    distinct = np.r_[sorted_s[1:] < sorted_s[:-1], True]
    ok = ok[distinct[ok]]
    if not len(ok):
        return None
    i = int(ok[np.argmax(true[ok])])
    return float(sorted_s[i]), float(precision[i]), float(true[i] / found.positives)


def precision_at(
    score: npt.NDArray[np.float64], found: Candidates, recalls: tuple[float, ...] = CURVE_RECALLS
) -> dict[str, float | None]:
    """Precision where the hits, best score first, first reach each recall (None: never reached)."""
    sorted_s, true, precision = _ranked(score, found)
    recall = true / max(found.positives, 1)
    out: dict[str, float | None] = {}
    for r in recalls:
        i = int(np.searchsorted(recall, r))
        reached = i < len(sorted_s) and bool(np.isfinite(sorted_s[i]))
        out[f"{r:g}"] = round(float(precision[i]), 4) if reached else None
    return out


def cosine_at_recall(found: Candidates, recall: float) -> dict[str, float | int]:
    """Plain cosine's figures at the first similarity cut that recalls at least `recall`."""
    s = np.where(found.counted, found.similarity.astype(np.float64), -np.inf)
    order = np.argsort(-s, kind="stable")
    true = np.cumsum(found.truth[order])
    i = min(int(np.searchsorted(true / max(found.positives, 1), recall)), len(order) - 1)
    return {**figures(found, s >= s[order[i]]), "similarity": round(float(s[order[i]]), 4)}


def similarity_curve(
    found: Candidates, score: npt.NDArray[np.float64], cut: float, gates: tuple[float, ...]
) -> list[dict[str, float]]:
    """Precision and recall at the score cut for each similarity gate (for the tune API's floor).

    `found` and `score` hold every neighbour row (not collapsed): each gate picks anew.
    """
    out = []
    for gate in gates:
        one, s = found.collapse(score, gate)
        m = figures(one, s >= cut)
        out.append({"similarity_threshold": gate, "precision": m["precision"], "recall": m["recall"]})
    return out


def report(
    data: Data, rows: Candidates, score: npt.NDArray[np.float64], gate: float, cut: float
) -> dict[str, Any]:
    """The figures of one split: the verifier at (gate, cut), plain cosine beside it, and the curves."""
    found, gated = rows.collapse(score, gate)
    nearest = rows.take(np.flatnonzero(np.r_[True, rows.lookup[1:] != rows.lookup[:-1]]))
    mine = figures(found, gated >= cut)
    out: dict[str, Any] = {
        "benchmarks": int(found.bench.max()) + 1,
        "verifier": mine,
        "cosine_at_similarity_threshold": figures(nearest, nearest.similarity >= gate),
        "cosine_at_same_recall": cosine_at_recall(nearest, float(mine["recall"])),
        # Serving exactly the candidates the labels call duplicates of the query (label-1 pairs, joined
        # transitively): the benchmark still counts a hit on another cached paraphrase as false.
        "labels_ceiling": figures(
            nearest, data.duplicates[nearest.query] == data.duplicates[nearest.candidate]
        ),
    }
    cosine_cut = best_cut(nearest.similarity.astype(np.float64), nearest, 0.90)
    out["cosine_best_recall_at_0.9"] = round(cosine_cut[2], 4) if cosine_cut else 0.0
    out["curve"] = {
        "verifier": precision_at(gated, found),
        "cosine": precision_at(nearest.similarity.astype(np.float64), nearest),
    }
    return out
