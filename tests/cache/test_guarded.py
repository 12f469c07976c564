"""Candidates the shared-instruction rule flags are calibrated apart: never served on the prior, nor
because the rest of the traffic earned a low cut; served once their own verified outcomes allow it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iros.cache.build import build_cache
from iros.cache.calibration import Outcome
from iros.cache.engine import ResponseCache
from iros.config import load_settings
from tests.conftest import cache_plan, completion

# One instruction, its input reworded with a synonym: the rule flags it like two different inputs.
CACHED = "Is this review friendly? The meal was wonderful and the waiters were kind."
ASKED = "Is this review friendly? The food was wonderful and the waiters were kind."
REVIEW = "Is this review friendly? The food was wonderful and the staff were kind."
OTHER_REVIEW = "Is this review friendly? The food was cold and the staff were rude."


@pytest.fixture
async def cache(tmp_path: Path) -> AsyncIterator[ResponseCache]:
    overrides = {"server": {"data_dir": str(tmp_path)}, "cache": {"embedder": {"skip_after_ms": None}}}
    built = build_cache(load_settings(None, overrides).cache, tmp_path)
    await built.start()
    assert await built.semantic_started(120)
    yield built
    await built.close()


def verified(cache: ResponseCache, guarded: bool, n: int = 200) -> None:
    """n right outcomes at low scores, as another worker's verification would have sent them."""
    p = cache_plan(cache, CACHED)
    cache.calibration.add(
        Outcome(p.namespace, p.model, 0.01 + 0.001 * i, True, 1.0, False, guarded) for i in range(n)
    )


async def store(cache: ResponseCache, *texts: str) -> None:
    for text in texts:
        await cache.store_now(cache_plan(cache, text), completion(f"about {text}"), 0.0, "m")


async def test_a_flagged_candidate_waits_for_its_own_outcomes(cache: ResponseCache) -> None:
    await store(cache, CACHED)
    assert await cache.lookup(cache_plan(cache, ASKED)) is None  # cold: refused
    verified(cache, guarded=False)  # the open scope's cut comes down to 0.01: not the flagged one's
    assert await cache.lookup(cache_plan(cache, ASKED)) is None
    report = cache.verification_report()
    flagged = [s for s in report["scopes"] if s["guarded"]]
    assert all(s["cut"] is None for s in flagged)
    verified(cache, guarded=True)
    hit = await cache.lookup(cache_plan(cache, ASKED))
    assert hit is not None and hit.kind == "semantic_hit" and hit.entry.prompt == CACHED
    (scope,) = [s for s in cache.verification_report()["scopes"] if s["guarded"]]
    assert scope["calibrated"] and scope["prior_cut"] is None and scope["cut"] is not None


async def test_a_flagged_near_miss_is_judged_in_its_own_scope(cache: ResponseCache) -> None:
    await store(cache, REVIEW)
    asked = cache_plan(cache, OTHER_REVIEW)
    assert await cache.lookup(asked) is None
    assert asked.verify is not None and asked.verify.guarded and not asked.verify.served
