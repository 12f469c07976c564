"""Token alignment: how well each word of one question is matched by some word of the other.

Sentence cosine averages every token away, so "a visa for Canada" and "a visa for Australia" sit close.
MiniLM's contextual token embeddings (the forward pass that gives the sentence vector gives them too)
keep the words apart: here every token of each side is matched with its most similar token on the
other side, and the verifier's trees see how well the worst-matched tokens fare.

tokens = TokenProjection(matrix)              # matrix: (384, dim) from training, or None for all 384
q = tokens(query_token_embeddings)            # unit rows, [CLS]/[SEP] dropped, float16: kept per entry
x = align_features(q, tokens(candidate_token_embeddings))   # ALIGN_FEATURES, in that order
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["ALIGN_FEATURES", "MAX_TOKENS", "TokenProjection", "align_features"]

MAX_TOKENS = 64  # wordpieces looked at per question ([CLS] included), as in training
ALIGN_FEATURES: tuple[str, ...] = (
    "align_query",  # mean over the query's tokens of the best match on the other side
    "align_candidate",
    "align_f",  # their harmonic mean
    "align_worst_query",  # the query's worst-matched token
    "align_worst_candidate",
    "align_worst",
    "align_second_query",  # the second worst: one odd token may be noise, two rarely are
    "align_second_candidate",
    "unaligned_60",  # tokens on either side whose best match is under 0.6
    "unaligned_75",
)

Tokens = npt.NDArray[np.float16]


class TokenProjection:
    """Token embeddings as the alignment compares them: unit rows in a smaller space, float16."""

    def __init__(self, matrix: npt.NDArray[Any] | None, input_dim: int = 384) -> None:
        self.matrix = None if matrix is None else np.asarray(matrix, np.float32)
        self.input_dim = input_dim if self.matrix is None else int(self.matrix.shape[0])
        self.dim = self.input_dim if self.matrix is None else int(self.matrix.shape[1])

    def __call__(self, tokens: npt.NDArray[Any]) -> Tokens:
        t = np.asarray(tokens, np.float32)[:MAX_TOKENS]
        if t.ndim != 2 or t.shape[1] != self.input_dim:
            raise ValueError(f"expected (tokens, {self.input_dim}) token embeddings, got {t.shape}")
        if len(t) > 2:
            t = t[1:-1]  # [CLS] and [SEP] carry the whole sentence, not a word
        if self.matrix is not None:
            t = t @ self.matrix
        out: Tokens = (t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-6)).astype(np.float16)
        return out

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.dim


def align_features(query: npt.NDArray[Any], candidate: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """ALIGN_FEATURES of two projected questions (TokenProjection's output)."""
    q = np.asarray(query, np.float32)
    c = np.asarray(candidate, np.float32)
    if not len(q) or not len(c):
        return np.zeros(len(ALIGN_FEATURES))
    s = q @ c.T
    best_q, best_c = s.max(axis=1), s.max(axis=0)
    sorted_q, sorted_c = np.sort(best_q), np.sort(best_c)
    mean_q, mean_c = float(best_q.mean()), float(best_c.mean())
    return np.array(
        [
            mean_q,
            mean_c,
            2 * mean_q * mean_c / (mean_q + mean_c) if mean_q + mean_c > 0 else 0.0,
            sorted_q[0],
            sorted_c[0],
            min(sorted_q[0], sorted_c[0]),
            sorted_q[min(1, len(sorted_q) - 1)],
            sorted_c[min(1, len(sorted_c) - 1)],
            float((best_q < 0.6).sum() + (best_c < 0.6).sum()),
            float((best_q < 0.75).sum() + (best_c < 0.75).sum()),
        ],
        np.float64,
    )
