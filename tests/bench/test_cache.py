"""`iros bench cache-quality`, `cache-latency` and `workload` on tiny inputs: the documented figures, sane."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from iros.bench.cache import cache_latency, cache_quality
from iros.bench.pairs import DEFAULT_PAIRS, Pair, best_fixed_threshold, label_groups, read_pairs
from iros.bench.workload import SHARES, build_stream, run_workload
from iros.cache.base import Embedder
from iros.cache.embedder import build_embedder
from iros.config import EmbedderSettings

pytestmark = pytest.mark.skipif(not DEFAULT_PAIRS.exists(), reason=f"{DEFAULT_PAIRS} is not here")


class Shared:
    """One loaded model for every bench here: start and close are the fixture's, not the cache's."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim

    async def start(self) -> None:
        return None

    async def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        return await self.inner.embed(texts)

    async def embed_tokens(self, texts: list[str]) -> Any:
        return await self.inner.embed_tokens(texts)  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        return None

    @property
    def batches(self) -> int:
        return int(getattr(self.inner, "batches", 0))


@pytest.fixture(scope="module")
def pairs() -> list[Pair]:
    return read_pairs(DEFAULT_PAIRS, 300)


@pytest.fixture(scope="module")
async def embedder() -> AsyncIterator[Shared]:
    inner = build_embedder(EmbedderSettings())
    await inner.start()
    yield Shared(inner)
    await inner.aclose()


def test_pairs_are_read_gzipped_or_plain(tmp_path: Path) -> None:
    plain = tmp_path / "pairs.jsonl"
    plain.write_text('{"a": "x", "b": "y", "label": 1}\n\n{"a": "p", "b": "q", "label": 0}\n')
    assert read_pairs(plain) == [Pair("x", "y", 1), Pair("p", "q", 0)]
    assert len(read_pairs(DEFAULT_PAIRS, 5)) == 5


def test_the_stream_mixes_repeats_paraphrases_and_one_offs(pairs: list[Pair]) -> None:
    stream, bases = build_stream(pairs, 400, seed=3)
    assert len(stream) == 400 and 0 < bases <= 40
    kinds = {ask.kind for ask in stream}
    assert kinds == set(SHARES)
    assert stream == build_stream(pairs, 400, seed=3)[0]  # a fixed seed, a fixed stream
    one_offs = [ask.text for ask in stream if ask.kind == "one_off"]
    assert len(set(one_offs)) == len(one_offs)


async def test_cache_quality_follows_the_label_graph_per_domain(
    pairs: list[Pair], embedder: Shared, tmp_path: Path
) -> None:
    """Each pair file is its own domain: every question asked once, hits split into right and wrong by
    the labels, and the best fixed cosine threshold reported beside the cache's figures."""
    domains = {"first": pairs[:80], "second": pairs[80:160]}
    result = await cache_quality(domains, tmp_path, embedder=embedder)
    assert set(result["domains"]) == {"first", "second"}
    for name, figures in result["domains"].items():
        chosen = domains[name]
        stored = {p.a for p in chosen}
        assert figures["entries"] == len(stored)
        assert figures["questions"] == len({p.b for p in chosen} - stored)
        assert figures["lookup_ms_batched"]["n"] == figures["questions"]
        assert 0 <= figures["false_hits"] <= figures["hits"] <= figures["questions"]
        assert figures["answerable"] <= figures["questions"]
        assert figures["false_hits_per_question"] == round(figures["false_hits"] / figures["questions"], 4)
        baseline = figures["fixed_threshold_at_0.95"]
        assert baseline["recall"] is not None and 0 <= baseline["recall"] <= 1
    assert result["prior_cut"] is not None and result["max_false_hit_rate"] == 0.05


def test_label_groups_join_chains_and_the_baseline_is_chosen_in_hindsight() -> None:
    """Texts joined through a chain of label-1 pairs, or with the same words, share a group; the fixed
    threshold is the one with the most recall at the precision asked."""
    groups = label_groups([Pair("a", "b", 1), Pair("b", "c", 1), Pair("c", "d", 0)])
    assert groups["a"] == groups["c"] != groups["d"]
    # One sentence twice, cased and punctuated otherwise, in pairs no label joins: one question,
    # except by the labels alone.
    repeated = [Pair("The act of testing.", "x", 0), Pair("the act of testing", "y", 0)]
    assert label_groups(repeated)["The act of testing."] == label_groups(repeated)["the act of testing"]
    strict = label_groups(repeated, strict=True)
    assert strict["The act of testing."] != strict["the act of testing"]
    best = best_fixed_threshold([0.9, 0.8, 0.7, 0.6], [True, True, False, True], 4, 0.75)
    assert best == {"threshold": 0.6, "precision": 0.75, "recall": 0.75}
    assert best_fixed_threshold([0.9, 0.8], [True, False], 2, 1.0)["recall"] == 0.5


async def test_cache_latency_reports_hits_and_throughput(
    pairs: list[Pair], embedder: Shared, tmp_path: Path
) -> None:
    result = await cache_latency(
        pairs, tmp_path, entries=40, exact_lookups=200, levels=(1, 8), duration=0.5, embedder=embedder
    )
    assert result["exact_hit_ms"]["n"] == 200 and 0 < result["exact_hit_ms"]["p50"] < 50
    semantic = result["semantic_hit_ms"]["n"] + result["semantic_miss_ms"]["n"]
    assert 0 < semantic <= 40
    assert [row["concurrency"] for row in result["throughput"]] == [1, 8]
    for row in result["throughput"]:
        assert row["lookups"] > 0 and row["lookups_per_s"] > 0 and 0 <= row["skipped"] <= row["lookups"]
        # Lookups the embedder was too far behind for are skipped; the others share model calls.
        assert row["mean_batch"] is None or row["mean_batch"] >= 1
    lone = result["throughput"][0]
    assert lone["skipped"] < lone["lookups"] // 2  # a lone caller never waits behind another
    assert set(result["met"]) == {"exact_hit_p50_ms", "semantic_hit_p50_ms", "semantic_miss_p50_ms"}


@pytest.mark.e2e
def test_workload_through_the_gateway_with_and_without_the_cache(pairs: list[Pair]) -> None:
    result: dict[str, Any] = run_workload(pairs, requests=80, concurrency=8, profile="lightweight")
    assert result["requests"] == 80
    assert result["errors"] == {"cache_on": 0, "cache_off": 0}
    hits = result["hits"]
    assert hits["exact"] + hits["semantic"] + hits["miss"] == 80
    assert hits["exact"] > 0  # repeats of popular questions are served from the cache
    # Beyond the ideal only by serving a wrong answer.
    assert 0 < result["hit_rate"] <= (result["ceilings"]["ideal"] or 0) + result["false_hit_rate"] + 1e-9
    assert 0 <= result["false_hit_rate"] <= 1
    # Hits take milliseconds, the model hundreds: the cached run is faster on average.
    assert result["cache_on"]["mean_ms"] < result["cache_off"]["mean_ms"]
    assert result["server_cache_stats"]["verifier"] is True


@pytest.mark.e2e
def test_workload_by_meaning_reports_cold_and_warm_halves(pairs: list[Pair]) -> None:
    """Every text once through `iros serve` against an upstream that answers by label group: the two
    halves add up to the stream, hits are split by the labels, verification's figures come back."""
    from iros.bench.meaning import run_meaning_workload

    result = run_meaning_workload(pairs[:150], requests=60, concurrency=4)
    assert result["questions"] == 60 and result["errors"] == 0
    assert result["cold"]["questions"] + result["warm"]["questions"] == 60
    for half in (result["cold"], result["warm"]):
        assert 0 <= half["false_hits"] <= half["semantic_hits"] <= half["questions"]
        assert half["answerable"] <= half["questions"]
    assert result["verification"]["max_false_hit_rate"] == 0.05
    assert set(result["met"]) == {"warm_precision", "warm_recall_vs_fixed"}
