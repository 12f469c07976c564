"""The semantic cache never makes an answer slower than a miss: with the embedder behind, a lookup is
skipped (counted), exact hits are still served, and an answer is still stored for exact hits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iros.cache.build import build_cache
from iros.cache.engine import ResponseCache
from iros.config import load_settings
from tests.conftest import cache_plan, completion

LONG = "Tell me everything about the Roman empire, its emperors and its provinces. " * 60


@pytest.fixture(scope="module")
async def cache(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ResponseCache]:
    data_dir = tmp_path_factory.mktemp("skip-cache")
    # skip_after_ms 0: any wait behind a running batch is too long; δ 0.3: the prior alone serves a
    # paraphrase (at the default 0.05 a cold cache serves almost nothing until verification says so).
    overrides = {
        "server": {"data_dir": str(data_dir)},
        "cache": {"embedder": {"skip_after_ms": 0}, "max_false_hit_rate": 0.3},
    }
    built = build_cache(load_settings(None, overrides).cache, Path(data_dir))
    await built.start()
    assert await built.semantic_started(120)
    yield built
    await built.close()


async def busy(cache: ResponseCache) -> asyncio.Future[object]:
    """Keep the embedder busy with long texts (after one call, so that it knows its cost)."""
    assert cache.embedder is not None
    await cache.embedder.embed(["how fast are you?"])
    work = asyncio.ensure_future(cache.embedder.embed([LONG] * 16))
    await asyncio.sleep(0.01)  # the batch is running now
    return work


async def test_a_lookup_behind_a_busy_embedder_is_skipped_at_once(cache: ResponseCache) -> None:
    """While the embedder works on a long batch, a semantic lookup is a miss at once, counted as
    skipped in the stats, instead of waiting for the batch."""
    before = (await cache.stats())["skipped"]
    work = await busy(cache)
    started = time.perf_counter()
    hit = await cache.lookup(cache_plan(cache, "What is the capital of France?"))
    waited = time.perf_counter() - started
    assert hit is None and not work.done()
    await work
    stats = await cache.stats()
    assert stats["skipped"] == before + 1 and stats["misses"] >= 1
    assert waited < 0.5


async def test_exact_hits_are_served_while_the_embedder_is_busy(cache: ResponseCache) -> None:
    """An answer stored while the embedder is behind is kept for exact hits, which need no embedding."""
    asked = cache_plan(cache, "How tall is the Eiffel tower?")
    work = await busy(cache)
    assert await cache.lookup(asked) is None
    await cache.store_now(asked, completion("330 metres"), 10.0, "m")
    hit = await cache.lookup(cache_plan(cache, "How tall is the Eiffel tower?"))
    assert hit is not None and hit.kind == "hit"
    await work


async def test_an_idle_embedder_serves_semantic_hits(cache: ResponseCache) -> None:
    """With the embedder idle nothing is skipped: a paraphrase of a stored question is a semantic hit."""
    stored = cache_plan(cache, "What are the health benefits of drinking green tea?")
    assert await cache.lookup(stored) is None
    await cache.store_now(stored, completion("many"), 10.0, "m")
    before = (await cache.stats())["skipped"]
    hit = await cache.lookup(cache_plan(cache, "What are some health benefits of drinking green tea?"))
    assert hit is not None and hit.kind == "semantic_hit"
    assert (await cache.stats())["skipped"] == before


async def test_an_embedding_past_the_lookup_timeout_is_a_skipped_miss(cache: ResponseCache) -> None:
    """A lookup whose embedding takes longer than lookup_timeout_ms (a model starved of CPU) stops
    waiting: a miss, counted as skipped."""
    settings = cache.settings.embedder
    before, limit = (await cache.stats())["skipped"], settings.lookup_timeout_ms
    settings.lookup_timeout_ms = 0.001
    try:
        assert await cache.lookup(cache_plan(cache, "Which river runs through Vienna?")) is None
    finally:
        settings.lookup_timeout_ms = limit
    assert (await cache.stats())["skipped"] == before + 1
