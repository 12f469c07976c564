from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from iros.bench.pairs import DATA_DIR
from iros.cache.embedder import PACKAGED_MODEL, LocalEmbedder
from iros.cache.verifier.model import FEATURES, Verifier
from iros.cache.verifier.rules import same_words, shared_instruction
from iros.config import CacheSettings, EmbedderSettings

DEV = DATA_DIR / "qqp" / "dev.jsonl.gz"
HELD_OUT = 400  # of the last 2,000 dev pairs, which no question of was trained on

# Light rewordings: scored within the near-miss band of the default cut, where verification judges them.
REWORDINGS = [
    ("How do I learn Python?", "How can I learn Python?"),
    ("How do I reset my Gmail password?", "How can I reset my Gmail password?"),
    ("What is the best way to learn Python?", "What's the best way to learn Python?"),
    ("What are the best books on investing?", "Which are the best books about investing?"),
]
# Each close enough for plain cosine at 0.80, and a different question.
HARD_NEGATIVES = {
    "number": ("What was the population of India in 2011?", "What was the population of India in 2001?"),
    "negation": ("Why do cats purr?", "Why don't cats purr?"),
    "entity": (
        "Is the Samsung Galaxy S7 better than the iPhone 7?",
        "Is the Samsung Galaxy S7 better than the Google Pixel?",
    ),
    "question word": ("Who invented the telephone?", "When was the telephone invented?"),
    "order": ("How can I convert 100 USD to INR?", "How can I convert 100 INR to USD?"),
}


@pytest.fixture(scope="module")
def verifier() -> Verifier:
    return Verifier.load()


@pytest.fixture(scope="module")
async def embedder() -> AsyncIterator[LocalEmbedder]:
    # All cores: the test has the machine to itself, unlike a gateway.
    model = LocalEmbedder(
        EmbedderSettings(device="cpu", max_batch=128, timeout_seconds=120), threads=os.cpu_count()
    )
    await model.start()
    yield model
    await model.aclose()


async def cosine(embedder: LocalEmbedder, pairs: list[tuple[str, str]]) -> npt.NDArray[np.float32]:
    v = await embedder.embed([t for pair in pairs for t in pair])
    sims: npt.NDArray[np.float32] = (v[0::2] * v[1::2]).sum(axis=1)
    return sims


@dataclass(frozen=True)
class Decided:
    index: int | None  # the candidate served, or None
    scores: npt.NDArray[np.float64]


def decided(
    verifier: Verifier,
    query: str,
    candidates: list[str],
    sims: list[float],
    query_tokens: npt.NDArray[Any] | None = None,
    candidate_tokens: list[npt.NDArray[Any]] | None = None,
    delta: float = 0.05,
) -> Decided:
    """What the cache decides before any verification (cache/engine.py): the best score against the
    prior's cut for δ."""
    scores, aligned = verifier.scores(query, candidates, sims, query_tokens, candidate_tokens)
    if not len(scores):
        return Decided(None, scores)
    best = int(np.argmax(scores))
    return Decided(best if scores[best] >= verifier.cut_for(delta, aligned) else None, scores)


async def decide(
    verifier: Verifier, embedder: LocalEmbedder, query: str, candidates: list[str]
) -> tuple[Decided, list[float]]:
    """The verifier's decision as the cache makes it: cosines and token embeddings from the model."""
    encoded = await embedder.embed_tokens([query, *candidates])
    assert encoded.tokens is not None
    sims = (encoded.vectors[1:] @ encoded.vectors[0]).tolist()
    projected = [verifier.project(t) for t in encoded.tokens]
    return decided(verifier, query, candidates, sims, projected[0], projected[1:]), sims


async def score(
    verifier: Verifier, embedder: LocalEmbedder, query: str, candidate: str, tokens: bool
) -> float:
    """The verifier's score for one candidate, with the model's token embeddings or on its fallback trees."""
    decision, sims = await decide(verifier, embedder, query, [candidate])
    return float(decision.scores[0]) if tokens else float(verifier.scores(query, [candidate], sims)[0][0])


class TestPackaged:
    @pytest.mark.e2e
    def test_loads_without_scikit_learn_or_torch(self) -> None:
        """The packaged verifier loads and scores with numpy alone."""
        code = (
            "import sys; from iros.cache.verifier.model import Verifier; v = Verifier.load(); "
            "v.scores('How do I learn Python?', ['How can I learn Python?'], [0.95]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'torch', 'scipy')))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]"

    def test_parameters_describe_themselves(self, verifier: Verifier) -> None:
        """The file names its features, embedding model, rule and the leave-one-domain-out figures."""
        assert verifier.model == PACKAGED_MODEL
        # One rule: the gate is the cache's default similarity threshold, the cut follows from δ.
        assert verifier.similarity_threshold == CacheSettings().similarity_threshold
        assert verifier.neighbours >= 1 and verifier.tokens is not None
        assert verifier.cut_for(0.05) == pytest.approx(0.95) == verifier.threshold
        assert verifier.cut_for(0.2) == pytest.approx(0.8) and verifier.cut_for(0.2, tokens=False) == 0.8
        lodo = verifier.metrics["leave_one_domain_out"]
        assert set(lodo) == {"qqp", "mrpc", "sick", "sts"}
        for figures in lodo.values():
            assert figures["prior"]["hits"] >= figures["prior"]["false_hits"] >= 0
            assert {"cosine_best_at_0.95", "cosine_best_at_same_precision", "met"} <= set(figures)
        # The tune API's floor: a curve of precision by similarity gate.
        gates = [p["similarity_threshold"] for p in verifier.curve]
        assert gates == sorted(gates) and CacheSettings().similarity_threshold in gates

    def test_refuses_parameters_for_other_features(self, verifier: Verifier) -> None:
        """A verifier.json written for another feature list is an error, not wrong scores."""
        params = {**verifier.params, "features": [*FEATURES[:-1], "something_else"]}
        with pytest.raises(ValueError, match="features"):
            Verifier(params)


class TestDecisions:
    async def test_rewordings_rank_above_the_hard_negatives(
        self, verifier: Verifier, embedder: LocalEmbedder
    ) -> None:
        """Rewordings of one question score above every near question that asks something else (but
        "who invented" / "when was it invented", which the trees cannot tell), with token embeddings
        and without: a cut that verification brings down serves the rewordings before any of those."""
        told = {k: v for k, v in HARD_NEGATIVES.items() if k != "question word"}
        for tokens in (True, False):
            worst = min([await score(verifier, embedder, q, c, tokens) for q, c in REWORDINGS])
            best_wrong = max([await score(verifier, embedder, q, c, tokens) for q, c in told.values()])
            assert worst > best_wrong > 0, (tokens, worst, best_wrong)

    @pytest.mark.parametrize("kind", HARD_NEGATIVES)
    async def test_rejects_what_cosine_would_serve(
        self, verifier: Verifier, embedder: LocalEmbedder, kind: str
    ) -> None:
        """A near question that asks something else is not served though its cosine passes 0.80, and
        scores below every rewording."""
        q, c = HARD_NEGATIVES[kind]
        decision, (s,) = await decide(verifier, embedder, q, [c])
        assert s >= 0.80, s
        assert decision.index is None, decision
        # Asked the other way round, the same answer; and the same without token embeddings.
        assert (await decide(verifier, embedder, c, [q]))[0].index is None
        assert decided(verifier, q, [c], [s]).index is None
        if kind != "question word":  # "who invented" / "when was it invented": the trees cannot tell
            assert decision.scores[0] < 0.7, decision

    @pytest.mark.parametrize(
        ("query", "candidate"),
        [
            ("What is the future of e- commerce in India?", "What is the future of e-commerce in India?"),
            ("how do i learn python", "How do I learn Python?"),
            ("What\u2019s a monad?", "What's a monad ?"),
        ],
    )
    def test_the_same_words_are_served_at_any_bound(
        self, verifier: Verifier, query: str, candidate: str
    ) -> None:
        """Case, spacing and sentence punctuation do not change what is asked: the same words are
        served even at the strictest δ, whatever the trees would say."""
        for tokens in (None, np.ones((3, 4), np.float32)):
            scores, _ = verifier.scores(
                query, [candidate], [0.99], tokens, [tokens] if tokens is not None else None
            )
            assert scores[0] >= verifier.cut_for(0.001)

    @pytest.mark.parametrize(
        ("query", "candidate"),
        [
            ("What is 2+2?", "What is 2-2?"),
            ("Is -5 prime?", "Is 5 prime?"),
            ("What is 3.5 squared?", "What is 35 squared?"),
            ("Is x < y?", "Is x > y?"),
            ("日本語の質問です", "中文问题"),
            ("???", "..."),
        ],
    )
    def test_symbols_that_change_the_question_are_not_punctuation(
        self, verifier: Verifier, query: str, candidate: str
    ) -> None:
        """An operator, a sign or a decimal point is part of the question, words of any script are words,
        and punctuation alone is no words: not the same words, and the trees' score stays under the
        default cut."""
        assert not same_words(query, candidate)
        assert verifier.scores(query, [candidate], [0.98])[0][0] < verifier.cut_for(0.05)

    async def test_picks_the_right_one_of_several(self, verifier: Verifier, embedder: LocalEmbedder) -> None:
        """Among near candidates the one that asks the same question is chosen, whatever its rank."""
        query = "How can I get a visa for Canada?"
        candidates = ["How can I get a visa for Australia?", "How do I get a visa for Canada?"]
        decision, sims = await decide(verifier, embedder, query, candidates)
        assert int(np.argmax(decision.scores)) == 1, (decision, sims)

    def test_batch_form_matches_single_calls(self, verifier: Verifier) -> None:
        """Without tokens, scoring several candidates at once agrees with scoring each alone, at the
        fallback cut."""
        query = "How do I learn Python?"
        candidates = ["How can I learn Python?", "How do I learn Java?", "Why learn Python?"]
        sims = [0.96, 0.85, 0.82]
        many, aligned = verifier.scores(query, candidates, sims)
        single = [verifier.scores(query, [c], [s])[0][0] for c, s in zip(candidates, sims, strict=True)]
        assert np.allclose(many, single)
        assert not aligned  # no token embeddings: the fallback trees scored, held to their own cut
        assert verifier.scores(query, [], [])[0].shape == (0,)
        assert decided(verifier, query, [], []).index is None


class TestSharedInstruction:
    @pytest.mark.parametrize(
        ("query", "candidate"),
        [
            (
                "Is this review friendly? The food was wonderful and the staff were kind.",
                "Is this review friendly? The food was cold and the staff were rude.",
            ),
            ("Translate to French: I like cheese", "Translate to French: I like bread"),
            (
                "The food was great. Is this review friendly?",
                "The service was slow. Is this review friendly?",
            ),
            (
                "The food was great.\n\nSummarize the text above in one line.",
                "The service was slow.\n\nSummarize the text above in one line.",
            ),
            (
                'Does this sentence sound sarcastic: "Great, another Monday"',
                'Does this sentence sound sarcastic: "Lovely weather for ducks"',
            ),
            ("A man is playing a guitar", "A man is not playing a guitar"),
        ],
    )
    def test_one_instruction_with_other_inputs_is_flagged(self, query: str, candidate: str) -> None:
        """A question, a clause before a colon, a sentence or a line both prompts share, and inputs that
        differ around it (or a negation on one side only): flagged, both ways round."""
        assert shared_instruction(query, candidate) and shared_instruction(candidate, query)

    @pytest.mark.parametrize(
        ("query", "candidate"),
        [
            (
                "The poll conducted between Oct. 24 and Nov. 2 had a margin of error of 2 percentage points.",
                "The telephone survey had a margin of error of 2 percentage points.",
            ),
            (
                "El Watan, an Algerian newspaper, reported that the kidnappers put up fierce resistance.",
                "El Watan, an Algerian newspaper, reported that the kidnappers fiercely resisted.",
            ),
            (
                "Raising funds has been complicated by the U.S. crackdown on charities, the delegates said.",
                "Raising funds has been complicated by the U.S. crackdown on charities, his men said.",
            ),
            (
                "The robot launches at 2:05 p.m. on Sunday from Florida",
                "The robot launches at 2:05 p.m. on Sunday from Texas",
            ),
            (
                "Why would a guy avoid telling a girl that he is single?",
                "Why would a guy avoid telling a female that he is single?",
            ),
        ],
    )
    def test_a_sentence_reworded_inside_is_left_to_the_trees(self, query: str, candidate: str) -> None:
        """Shared words that are only the start or end of one sentence (up to a comma, a dash, the period
        of an abbreviation or a time's colon) are no instruction: the trees judge the rewording."""
        assert not shared_instruction(query, candidate) and not shared_instruction(candidate, query)


class TestFeatures:
    @pytest.mark.parametrize(
        ("query", "candidate"),
        [
            ("", ""),
            ("???", "..."),
            ("What is 2+2?", ""),
            ("Qu'est-ce que c'est ? 日本語の質問です", "🙂🙂"),
            ("Why " * 500, "How " * 3),
            ("1 2 3 4 5 6", "7 8 9"),
        ],
    )
    def test_finite_for_any_text(self, verifier: Verifier, query: str, candidate: str) -> None:
        """Odd, empty or huge texts still give one finite value per feature and a score in [0, 1]."""
        x = verifier.features(query, candidate, 0.5)
        assert x.shape == (len(FEATURES),)
        assert np.all(np.isfinite(x))
        assert 0.0 <= verifier.scores(query, [candidate], [0.5])[0][0] <= 1.0

    def test_under_a_millisecond(self, verifier: Verifier) -> None:
        """Scoring a new query against a cached question takes well under a millisecond."""
        cached = "How can I get a visa for Canada?"
        decided(verifier, "warm up", [cached], [0.9])
        times = []
        for i in range(300):
            started = time.perf_counter()
            decided(verifier, f"How do I get a visa for country number {i}?", [cached], [0.9])
            times.append(time.perf_counter() - started)
        assert float(np.median(times)) < 0.001


def _held_out() -> list[dict[str, Any]]:
    with gzip.open(DEV, "rt", encoding="utf-8") as f:
        lines = f.readlines()
    return [json.loads(line) for line in lines[-HELD_OUT:]]


@pytest.mark.skipif(not DEV.exists(), reason="needs ../shared/data/qqp/dev.jsonl.gz")
async def test_held_out_pairs_beat_plain_cosine(verifier: Verifier, embedder: LocalEmbedder) -> None:
    """On dev pairs kept out of training, served as the cache benchmark serves them (every `a` cached,
    every `b` asks its nearest neighbour), the verifier is more precise than cosine at equal recall."""
    pairs = _held_out()
    cached = sorted({p["a"] for p in pairs})
    position = {t: i for i, t in enumerate(cached)}
    queries = [p for p in pairs if p["b"] not in position]  # the exact cache answers the others
    keys = await embedder.embed_tokens(cached)
    asks = await embedder.embed_tokens([p["b"] for p in queries])
    assert keys.tokens is not None and asks.tokens is not None
    sims = asks.vectors @ keys.vectors.T
    nearest = sims.argmax(axis=1)
    similarity = sims[np.arange(len(queries)), nearest]
    truth = np.array([p["label"] == 1 and nearest[i] == position[p["a"]] for i, p in enumerate(queries)])
    positives = sum(p["label"] == 1 for p in queries)
    scores = np.array(
        [
            verifier.scores(
                p["b"],
                [cached[nearest[i]]],
                [float(similarity[i])],
                verifier.project(asks.tokens[i]),
                [verifier.project(keys.tokens[nearest[i]])],
            )[0][0]
            if similarity[i] >= verifier.similarity_threshold
            else 0.0
            for i, p in enumerate(queries)
        ]
    )

    def precision_at(score: npt.NDArray[np.floating[Any]], recall: float) -> float:
        order = np.argsort(-score, kind="stable")
        true = np.cumsum(truth[order])
        i = int(np.searchsorted(true / positives, recall))
        return float(true[i] / (i + 1))

    recalls = (0.1, 0.2, 0.3, 0.4)
    mine = [precision_at(scores, r) for r in recalls]
    plain = [precision_at(similarity, r) for r in recalls]
    assert np.mean(mine) > np.mean(plain), (mine, plain)
