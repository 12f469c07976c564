"""The semantic cache's second opinion: is the nearest cached question really the same question?

Cosine similarity of sentence embeddings ranks candidates well but cannot tell "How do I get a visa for
Canada?" from "How do I get a visa for Australia?". The verifier looks at what cosine blurs (numbers,
negations, names, the kind of question, the words one side has and the other lacks) and scores the pair
with gradient-boosted trees that also read how well the two questions' MiniLM token embeddings align
(tokens.py), trained by tools/verifier/prior.py; inference is plain numpy. What it reads in each text
is text.py's; the rules the trees never override (the same words, a shared instruction) are rules.py's.

verifier = Verifier.load()                                  # the packaged verifier.json
q = verifier.project(query_token_embeddings)                # kept with each cached entry as well
scores, aligned = verifier.scores(query, [cached_prompt], [similarity], q, [cached_projected_tokens])
if scores[0] >= verifier.cut_for(delta, aligned):   # the cache's calibration may move this cut
    ...serve the cached answer
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import orjson

from iros.cache.verifier.rules import same_words, shared_instruction
from iros.cache.verifier.text import parse, trigrams

if TYPE_CHECKING:
    from iros.cache.verifier.tokens import TokenProjection

__all__ = ["FEATURES", "Featurizer", "Verifier"]

PACKAGED = "verifier.json"

FEATURES: tuple[str, ...] = (
    "cosine",
    "cosine_sq",
    "jaccard",
    "missing_query",
    "missing_candidate",
    "missing_max",
    "missing_count",
    "idf_missing_query",
    "idf_missing_candidate",
    "idf_missing_top",
    "idf_jaccard",
    "idf_total_min",
    "number_mismatch",
    "number_only_one_side",
    "negation_mismatch",
    "entity_missing",
    "entity_missing_share",
    "kind_mismatch",
    "first_word_differs",
    "deixis_both",
    "contrast_mismatch",
    "gender_mismatch",
    "unmatched_spelling",
    "clauses_differ",
    "order_agreement",
    "words_differ",
    "person_mismatch",
    "length_ratio",
    "content_words_min",
    "char_jaccard",
    "bigram_jaccard",
)


@lru_cache(maxsize=16384)
def _word_trigrams(word: str) -> frozenset[str]:
    return trigrams(f" {word} ")


def _order(q: dict[str, int], c: dict[str, int]) -> float:
    """Share of shared word pairs that come in the same order on both sides ("A to B" vs "B to A")."""
    shared = sorted((q[w], c[w]) for w in q.keys() & c.keys())
    pairs = same = 0
    for i, (_, ci) in enumerate(shared):
        for _, cj in shared[i + 1 :]:
            pairs += 1
            same += ci < cj
    return same / pairs if pairs else 1.0


def _spelling(only_q: frozenset[str], only_c: frozenset[str]) -> float:
    """How close each unmatched word comes to one on the other side in spelling (1: all are variants)."""
    if not only_q or not only_c:
        return 0.0
    best = [max(_jaccard(_word_trigrams(w), _word_trigrams(v)) for v in only_c) for w in only_q]
    return min(best)


def _jaccard(x: frozenset[Any], y: frozenset[Any]) -> float:
    union = len(x | y)
    return len(x & y) / union if union else 1.0


class Featurizer:
    """Computes FEATURES; `idf` weighs words by how rare they are in questions (unknown words: `rare`)."""

    def __init__(self, idf: dict[str, float], rare: float) -> None:
        self.idf = idf
        self.rare = rare

    def _weight(self, words: frozenset[str]) -> float:
        idf, rare = self.idf, self.rare
        # fsum is exact, so the result does not depend on the set's (per-process) iteration order.
        return math.fsum(idf.get(w, rare) for w in words)

    def __call__(self, query: str, candidate: str, similarity: float) -> npt.NDArray[np.float64]:
        """The inputs for one (query, cached question, cosine) triple, in FEATURES order."""
        q, c = parse(query), parse(candidate)
        only_q, only_c = q.content - c.content, c.content - q.content
        missing_q = len(only_q) / len(q.content) if q.content else 0.0
        missing_c = len(only_c) / len(c.content) if c.content else 0.0
        weight = self._weight
        wq, wc = weight(q.content), weight(c.content)
        w_only_q, w_only_c = weight(only_q), weight(only_c)
        w_union = wq + wc - (wq - w_only_q)
        idf, rare = self.idf, self.rare
        top = max((idf.get(w, rare) for w in only_q | only_c), default=0.0)
        # A name counts as missing only if the other side does not use the word at all, capitalised or not.
        q_words, c_words = set(q.words), set(c.words)
        ent_missing = sum(e not in c_words for e in q.entities) + sum(e not in q_words for e in c.entities)
        ent_total = len(q.entities | c.entities)
        nq, nc = len(q.words), len(c.words)
        return np.array(
            [
                similarity,
                similarity * similarity,
                _jaccard(q.content, c.content),
                missing_q,
                missing_c,
                max(missing_q, missing_c),
                min(len(only_q) + len(only_c), 8),
                w_only_q / wq if wq else 0.0,
                w_only_c / wc if wc else 0.0,
                top,
                (wq - w_only_q) / w_union if w_union else 1.0,
                min(wq, wc),
                float(q.numbers != c.numbers),
                float(bool(q.numbers) != bool(c.numbers)),
                float((q.negations > 0) != (c.negations > 0)),
                min(ent_missing, 4),
                ent_missing / ent_total if ent_total else 0.0,
                float(q.kind != c.kind),
                float(q.words[:1] != c.words[:1]),
                float(q.deixis and c.deixis),
                float(q.contrast != c.contrast),
                float(q.gender != c.gender),
                _spelling(only_q, only_c),
                min(abs(q.clauses - c.clauses), 3),
                _order(q.order, c.order),
                min(len(q_words ^ c_words), 10),
                float(q.persons != c.persons),
                min(nq, nc) / max(nq, nc, 1),
                min(len(q.content), len(c.content), 12),
                _jaccard(q.chars, c.chars),
                _jaccard(q.bigrams, c.bigrams),
            ],
            dtype=np.float64,
        )


class Trees:
    """Gradient-boosted trees exported by tools/verifier/trees.py, run on numpy.

    Every tree is padded to the same node count and leaves lead to themselves, so `depth` steps reach a
    leaf from the root in every tree at once."""

    def __init__(self, trees: dict[str, Any]) -> None:
        if trees.get("kind") != "trees":
            raise ValueError(f"unknown verifier model kind {trees.get('kind')!r}")
        self._feature = np.asarray(trees["feature"], np.intp)
        self._split = np.asarray(trees["split"], np.float64)
        self._left = np.asarray(trees["left"], np.intp)
        self._right = np.asarray(trees["right"], np.intp)
        self._value = np.asarray(trees["value"], np.float64)
        self._depth = int(trees["depth"])
        self._base = float(trees["base"])
        self._trees = np.arange(len(self._feature))[None, :]

    def logits(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        trees = self._trees
        node = np.zeros((len(x), trees.shape[1]), np.intp)
        for _ in range(self._depth):
            feature = self._feature[trees, node]
            go_left = np.take_along_axis(x, feature, axis=1) <= self._split[trees, node]
            node = np.where(go_left, self._left[trees, node], self._right[trees, node])
        out: npt.NDArray[np.float64] = self._base + self._value[trees, node].sum(axis=1)
        return out


def _sigmoid(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    out: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-x))
    return out


class Verifier:
    """Scores (query, candidate, similarity) with gradient-boosted trees over the hand-made features and,
    when both questions' token embeddings are at hand, how well their tokens align (verifier_tokens).

    The rule the cache applies (one rule, see README's Cache section): of the `neighbours` nearest
    cached questions in the same context whose cosine is at least the cache's live
    `similarity_threshold`, the one the verifier scores highest is served if its score reaches
    `threshold` (the cut cross-validation measured for the target precision at the default similarity
    threshold). Without token embeddings (an OpenAI-compatible embedder) the fallback trees, which see
    the hand-made features only, decide at `fallback_threshold`. `curve` is the cross-validated
    precision and recall for each similarity threshold at that cut: the tune API's precision floor.
    """

    def __init__(self, params: dict[str, Any]) -> None:
        names = tuple(params["features"])
        if names != FEATURES:
            raise ValueError(f"verifier parameters are for features {names}, this code computes {FEATURES}")
        self.params = params
        self.model: str = params["embedding_model"]
        self.threshold = float(params["threshold"])
        self.fallback_threshold = float(params.get("fallback_threshold", self.threshold))
        self.similarity_threshold = float(params.get("similarity_threshold", 0.0))
        self.neighbours = int(params.get("neighbours", 1))
        self.metrics: dict[str, Any] = params.get("metrics", {})
        # (precision, score threshold, recall) measured in cross-validation, most precise last.
        self.operating_points: list[dict[str, float]] = sorted(
            params.get("operating_points", []), key=lambda p: p["precision"]
        )
        self.curve: list[dict[str, float]] = params.get("curve", [])
        # (δ, cut with tokens, cut without) measured out of domain, smallest δ first.
        self.cuts: list[tuple[float, float, float]] = sorted(
            (float(c["max_false_hit_rate"]), float(c["threshold"]), float(c["fallback_threshold"]))
            for c in params.get("cuts", [])
        )
        self.features = Featurizer(params["idf"]["words"], float(params["idf"]["rare"]))
        self.trees = Trees(params["model"])
        self.tokens: TokenProjection | None = None  # when the trees also read token alignment
        align = params.get("align")
        if align:
            from iros.cache.verifier.tokens import ALIGN_FEATURES, TokenProjection

            if tuple(align["features"]) != ALIGN_FEATURES:
                raise ValueError(f"verifier parameters are for alignment features {align['features']}")
            self.tokens = TokenProjection(align.get("projection"))
        self.fallback = Trees(params["fallback_model"]) if params.get("fallback_model") else self.trees
        if self.tokens is not None and not params.get("fallback_model"):
            raise ValueError("verifier parameters with token alignment need a fallback_model")

    def threshold_for(self, precision: float, tokens: bool = True) -> float:
        """The score threshold cross-validation found for at least this precision (the nearest above).

        Raises ValueError when no measured operating point is that precise."""
        key = "threshold" if tokens and self.tokens is not None else "fallback_threshold"
        for point in self.operating_points:
            if point["precision"] >= precision:
                return float(point.get(key, point["threshold"]))
        raise ValueError(f"no measured operating point reaches precision {precision}")

    def cut_for(self, delta: float, tokens: bool = True) -> float:
        """The prior's cut for δ (the largest share of served hits that may be wrong): 1 - δ when the
        trees' scores are the chance of a right hit (cut_rule); else the cut tabled for the largest δ
        not above it, so the bound is never loosened, or the packaged cut when there is no table."""
        aligned = tokens and self.tokens is not None
        if self.params.get("cut_rule") == "1 - max_false_hit_rate":
            # The trees give the chance a hit is right: serve when the chance it is wrong is at most δ.
            return 1.0 - delta
        if not self.cuts:
            return self.threshold if aligned else self.fallback_threshold
        chosen = self.cuts[0]
        for row in self.cuts:
            if row[0] <= delta + 1e-9:
                chosen = row
        return chosen[1] if aligned else chosen[2]

    @classmethod
    def load(cls, path: str | Path | None = None) -> Verifier:
        """The packaged verifier.json, or another file written by iros.verifier_train."""
        if path is None:
            raw = resources.files("iros.cache.verifier").joinpath(PACKAGED).read_bytes()
        else:
            raw = Path(path).read_bytes()
        return cls(orjson.loads(raw))

    def project(self, tokens: npt.NDArray[Any] | None) -> npt.NDArray[np.float16] | None:
        """A text's token embeddings as the alignment keeps them (None when it is not used)."""
        if tokens is None or self.tokens is None or not len(tokens):
            return None
        projected: npt.NDArray[np.float16] = self.tokens(tokens)
        return projected

    def _scores(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """The fallback trees' scores for rows of FEATURES."""
        return _sigmoid(self.fallback.logits(x))

    def scores(
        self,
        query: str,
        candidates: Sequence[str],
        similarities: Sequence[float],
        query_tokens: npt.NDArray[Any] | None = None,
        candidate_tokens: Sequence[npt.NDArray[Any] | None] | None = None,
    ) -> tuple[npt.NDArray[np.float64], bool]:
        """Scores for several candidates of one query (0 where they share an instruction and differ in
        their input), and whether the token alignment joined in (False: the fallback trees scored)."""
        scores, flagged, aligned = self.assess(
            query, candidates, similarities, query_tokens, candidate_tokens
        )
        return np.where(flagged, 0.0, scores), aligned

    def assess(
        self,
        query: str,
        candidates: Sequence[str],
        similarities: Sequence[float],
        query_tokens: npt.NDArray[Any] | None = None,
        candidate_tokens: Sequence[npt.NDArray[Any] | None] | None = None,
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_], bool]:
        """The trees' score for each candidate (1 for the same words), which of them the shared-instruction
        rule flags (the cache judges those apart; `scores` refuses them), and whether the token alignment
        joined in (False: the fallback trees scored)."""
        n = len(candidates)
        if not n:
            return np.empty(0, np.float64), np.empty(0, np.bool_), False
        x = np.stack([self.features(query, c, s) for c, s in zip(candidates, similarities, strict=True)])
        same = np.fromiter((same_words(query, c) for c in candidates), np.bool_, n)
        flagged = np.fromiter(
            (not s and shared_instruction(query, c) for s, c in zip(same.tolist(), candidates, strict=True)),
            np.bool_,
            n,
        )
        if (
            self.tokens is None
            or query_tokens is None
            or candidate_tokens is None
            or any(t is None for t in candidate_tokens)
        ):
            return np.where(same, 1.0, self._scores(x)), flagged, False
        from iros.cache.verifier.tokens import align_features

        aligned = np.stack([align_features(query_tokens, c) for c in candidate_tokens if c is not None])
        return np.where(same, 1.0, _sigmoid(self.trees.logits(np.hstack([x, aligned])))), flagged, True
