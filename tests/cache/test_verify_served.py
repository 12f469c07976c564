"""A served hit drawn for verification: its call runs in the background, after the client's answer,
and is judged or counted as lost; nothing waits on it, not even the cache's close."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from iros.cache.build import build_cache
from iros.cache.calibration import Pending
from iros.cache.engine import ResponseCache
from iros.config import load_settings
from tests.conftest import cache_plan, completion

CACHED = "What are the health benefits of drinking green tea?"


@pytest.fixture
async def cache(tmp_path: Path) -> AsyncIterator[ResponseCache]:
    overrides = {"server": {"data_dir": str(tmp_path)}, "cache": {"verification": {"judge": "exact"}}}
    built = build_cache(load_settings(None, overrides).cache, tmp_path)
    await built.start()
    plan = cache_plan(built, CACHED)
    await built.store_now(plan, completion("Green tea has antioxidants."), 0.0, "m")
    yield built
    await built.close()


def pending(cache: ResponseCache) -> Pending:
    plan = cache_plan(cache, CACHED)
    return Pending(plan.namespace, plan.model, plan.key, 0.9, True, 1.0)


async def settled(cache: ResponseCache, key: str) -> dict[str, Any]:
    for _ in range(200):
        report = cache.verification_report()
        if report[key]:
            return report
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {key} after 2 s: {cache.verification_report()}")


async def test_a_fresh_answer_that_agrees_is_a_right_served_outcome(cache: ResponseCache) -> None:
    async def fresh() -> dict[str, Any]:
        return completion("Green tea has antioxidants.")

    cache.verify_served(pending(cache), fresh)
    report = await settled(cache, "judged_right")
    assert report["judged_wrong"] == 0 and report["verification_tokens"] == 18
    (scope,) = report["scopes"]
    assert scope["verified"] == scope["verified_hits"] == 1 and scope["wrong_hits"] == 0


async def test_a_verification_call_that_fails_is_lost_not_judged(cache: ResponseCache) -> None:
    async def fresh() -> dict[str, Any]:
        raise RuntimeError("upstream down")

    cache.verify_served(pending(cache), fresh)
    report = await settled(cache, "lost")
    assert report["judged_right"] == report["judged_wrong"] == 0 and report["verification_tokens"] == 0


async def test_closing_the_cache_does_not_wait_for_a_verification_call(cache: ResponseCache) -> None:
    started = asyncio.Event()

    async def fresh() -> dict[str, Any]:
        started.set()
        await asyncio.sleep(3600)  # an upstream that never answers
        return completion("never")

    cache.verify_served(pending(cache), fresh)
    await started.wait()
    await asyncio.wait_for(cache.close(), timeout=30)
