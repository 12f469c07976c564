"""The semantic cache's second opinion: is the nearest cached question really the same question?

Cosine similarity of sentence embeddings ranks candidates well but cannot tell "How do I get a visa for
Canada?" from "How do I get a visa for Australia?". The verifier looks at what cosine blurs (numbers,
negations, names, the kind of question, the words one side has and the other lacks) and scores the pair
with a small model trained by iros.verifier_train; inference is plain numpy.

verifier = Verifier.load()                                  # the packaged verifier.json
if similarity >= verifier.similarity_threshold and verifier.accept(query, cached_prompt, similarity):
    ...serve the cached answer
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

__all__ = ["FEATURES", "Verifier", "features"]

PACKAGED = "verifier.json"

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_CASED = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:'[a-z]+)?")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})

_NEGATIONS = frozenset(
    "not no never none nothing nobody nowhere neither nor without cannot cant dont doesnt didnt isnt "
    "arent wasnt werent wont wouldnt shouldnt couldnt hasnt havent hadnt".split()
)
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_NUMBER_WORDS |= {"first": "1", "second": "2", "third": "3", "hundred": "100", "thousand": "1000"}
_NUMBER_WORDS |= {"million": "1e6", "billion": "1e9", "half": "0.5", "single": "1", "double": "2"}
# The kind of answer a question asks for, by its first question word.
_KINDS = {
    "what": "what",
    "which": "what",
    "whats": "what",
    "why": "why",
    "how": "how",
    "who": "who",
    "whom": "who",
    "whose": "who",
    "when": "when",
    "where": "where",
}
_YES_NO = frozenset(
    "can could should would will shall may might must is are am was were do does did has have had".split()
)
_STOP = frozenset(
    """a an the and or but if then so of to in on at by for with from into onto about as than that this
    these those there here it its it's i i'm me my mine we our ours you your yours he him his she her hers
    they them their what which who whom whose why how when where whats can could should would will shall
    may might must is are am was were be been being do does did doing has have had having get got getting
    any some all also just very really much many more most such own same other another each every one's
    own please best good way ways thing things someone something anyone anything people person quora""".split()
)
# Adjacent features compare each side's kind of question: "how" vs "how much" is a different question.
_HOW_QUANTITY = frozenset({"much", "many", "long", "far", "old", "big", "often", "tall", "fast"})

FEATURES: tuple[str, ...] = (
    "cosine",
    "cosine_sq",
    "jaccard",
    "missing_query",
    "missing_candidate",
    "missing_max",
    "missing_count",
    "number_mismatch",
    "number_only_one_side",
    "negation_mismatch",
    "entity_missing",
    "entity_missing_share",
    "kind_mismatch",
    "first_word_differs",
    "length_ratio",
    "content_words_min",
    "char_jaccard",
    "bigram_jaccard",
)


@dataclass(frozen=True, slots=True)
class Parsed:
    """What the features need from one question; computed once per text and cached."""

    words: tuple[str, ...]  # lowercase tokens in order
    content: frozenset[str]  # stemmed content words
    bigrams: frozenset[tuple[str, str]]
    numbers: frozenset[str]
    negations: int
    entities: frozenset[str]  # lowercase forms of capitalised words past the first
    kind: str
    chars: frozenset[str]  # character trigrams of the lowercase text


def _stem(word: str) -> str:
    # Just enough to match plurals and common inflections; the model learns the rest from cosine.
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 5 and word.endswith("ing"):
        return word[:-3]
    if len(word) > 4 and word.endswith("ed"):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _kind(words: Sequence[str]) -> str:
    for i, w in enumerate(words):
        kind = _KINDS.get(w)
        if kind == "how" and i + 1 < len(words) and words[i + 1] in _HOW_QUANTITY:
            return "how-" + words[i + 1]
        if kind:
            return kind
        if i == 0 and w in _YES_NO:
            return "yes-no"
    return "other"


@lru_cache(maxsize=65536)
def parse(text: str) -> Parsed:
    text = text.translate(_APOSTROPHES)
    lower = text.lower()
    words = tuple(_WORD.findall(lower))
    negations = 0
    numbers = set(_NUMBER.findall(lower))
    content = set()
    for w in words:
        bare = w.replace("'", "")
        if bare in _NEGATIONS or w.endswith("n't"):
            negations += 1
            continue
        if w in _NUMBER_WORDS:
            numbers.add(_NUMBER_WORDS[w])
            continue
        if w in _STOP or w.isdigit():
            continue
        content.add(_stem(w.removesuffix("'s")))
    cased = _CASED.findall(text)
    entities = frozenset(
        w.lower().removesuffix("'s")
        for i, w in enumerate(cased)
        if i > 0 and (w[0].isupper() or any(c.isupper() for c in w[1:])) and w.lower() not in _STOP
    )
    stems = [_stem(w) for w in words]
    squeezed = " ".join(words)
    return Parsed(
        words=words,
        content=frozenset(content),
        bigrams=frozenset(zip(stems, stems[1:], strict=False)),
        numbers=frozenset(numbers),
        negations=negations,
        entities=entities,
        kind=_kind(words),
        chars=frozenset(squeezed[i : i + 3] for i in range(max(len(squeezed) - 2, 0))),
    )


def _jaccard(x: frozenset[Any], y: frozenset[Any]) -> float:
    union = len(x | y)
    return len(x & y) / union if union else 1.0


def features(query: str, candidate: str, similarity: float) -> npt.NDArray[np.float64]:
    """The verifier's inputs for one (query, cached question, cosine) triple, in FEATURES order."""
    q, c = parse(query), parse(candidate)
    only_q, only_c = q.content - c.content, c.content - q.content
    missing_q = len(only_q) / len(q.content) if q.content else 0.0
    missing_c = len(only_c) / len(c.content) if c.content else 0.0
    # A name counts as missing only if the other side does not use the word at all, capitalised or not.
    q_words, c_words = set(q.words), set(c.words)
    ent_missing = len({e for e in q.entities if e not in c_words}) + len(
        {e for e in c.entities if e not in q_words}
    )
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
            float(q.numbers != c.numbers),
            float(bool(q.numbers) != bool(c.numbers)),
            float((q.negations > 0) != (c.negations > 0)),
            min(ent_missing, 4),
            ent_missing / ent_total if ent_total else 0.0,
            float(q.kind != c.kind),
            float(q.words[:1] != c.words[:1]),
            min(nq, nc) / max(nq, nc, 1),
            min(len(q.content), len(c.content), 12),
            _jaccard(q.chars, c.chars),
            _jaccard(q.bigrams, c.bigrams),
        ],
        dtype=np.float64,
    )


class Verifier:
    """Scores (query, candidate, similarity) with the trained model in verifier.json.

    `threshold` is the decision threshold on the score, chosen by cross-validation for precision;
    `similarity_threshold` is the cosine a candidate needs before the verifier is asked at all.
    """

    def __init__(self, params: dict[str, Any]) -> None:
        names = tuple(params["features"])
        if names != FEATURES:
            raise ValueError(f"verifier parameters are for features {names}, this code computes {FEATURES}")
        self.params = params
        self.model: str = params["embedding_model"]
        self.threshold = float(params["threshold"])
        self.similarity_threshold = float(params["similarity_threshold"])
        self.metrics: dict[str, Any] = params.get("metrics", {})
        model = params["model"]
        self.kind: str = model["kind"]
        self._mean = np.asarray(model["mean"], np.float64)
        self._scale = np.asarray(model["scale"], np.float64)
        if self.kind == "logistic":
            self._coef = np.asarray(model["coef"], np.float64)
            self._intercept = float(model["intercept"])
        elif self.kind == "trees":
            # Every tree padded to the same node count; leaves point at themselves.
            self._feature = np.asarray(model["feature"], np.int64)
            self._split = np.asarray(model["split"], np.float64)
            self._left = np.asarray(model["left"], np.int64)
            self._right = np.asarray(model["right"], np.int64)
            self._value = np.asarray(model["value"], np.float64)
            self._depth = int(model["depth"])
            self._base = float(model["base"])
            self._rate = float(model["learning_rate"])
        else:
            raise ValueError(f"unknown verifier model kind {self.kind!r}")

    @classmethod
    def load(cls, path: str | Path | None = None) -> Verifier:
        if path is None:
            raw = resources.files("iros").joinpath(PACKAGED).read_bytes()
        else:
            raw = Path(path).read_bytes()
        return cls(orjson.loads(raw))

    def features(self, query: str, candidate: str, similarity: float) -> npt.NDArray[np.float64]:
        return features(query, candidate, similarity)

    def _scores(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        z = (x - self._mean) / self._scale
        if self.kind == "logistic":
            logit = z @ self._coef + self._intercept
        else:
            rows = np.arange(len(self._feature))[None, :]
            node = np.zeros((len(z), len(self._feature)), np.int64)
            for _ in range(self._depth):
                f = self._feature[rows, node]
                go_left = np.take_along_axis(z, f, axis=1) <= self._split[rows, node]
                node = np.where(go_left, self._left[rows, node], self._right[rows, node])
            logit = self._base + self._rate * self._value[rows, node].sum(axis=1)
        out: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-logit))
        return out

    def score(self, query: str, candidate: str, similarity: float) -> float:
        """Probability-like: how likely serving the candidate's answer is right."""
        return float(self._scores(features(query, candidate, similarity)[None, :])[0])

    def accept(self, query: str, candidate: str, similarity: float) -> bool:
        return self.score(query, candidate, similarity) >= self.threshold

    def score_many(
        self, query: str, candidates: Sequence[str], similarities: Sequence[float]
    ) -> npt.NDArray[np.float64]:
        """Scores for several candidates of one query, in one model call."""
        if not candidates:
            return np.empty(0, np.float64)
        x = np.stack([features(query, c, s) for c, s in zip(candidates, similarities, strict=True)])
        return self._scores(x)

    def accept_many(
        self, query: str, candidates: Sequence[str], similarities: Sequence[float]
    ) -> npt.NDArray[np.bool_]:
        return self.score_many(query, candidates, similarities) >= self.threshold
