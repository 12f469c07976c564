"""Capacity planning: measured current capacity, Holt projections from stored history, Little's law sizing."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest

from iros.analysis.capacity import DAY, MIN_DAYS, current_capacity, projections, recommend
from iros.core.errors import IrosError
from iros.metrics.store import Samples
from iros.metrics.tsdb.db import SQLiteStore

NOW = 1_790_000_000.0 + 12 * 3600  # midday: today's partial traffic must not count as a day
TODAY = math.floor(NOW / DAY) * DAY
LABELS = (("cache", "bypass"), ("model", "fast"), ("outcome", "ok"))


def daily_traffic(store: SQLiteStore, counts: list[int], rng: np.random.Generator) -> None:
    """One response_time_ms sample per request, spread over each day; the last count is yesterday's."""
    for i, n in enumerate(counts):
        day = TODAY - (len(counts) - i) * DAY
        ts = np.sort(day + rng.uniform(0, DAY, n))
        store.append({("response_time_ms", LABELS): Samples(ts, rng.lognormal(5, 0.3, n))})


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    return SQLiteStore(tmp_path / "metrics.db", retention_days=400, raw_retention_hours=24 * 400)


class TestProjections:
    def test_a_linear_trend_is_projected_within_tolerance(self, store: SQLiteStore) -> None:
        """Traffic rising a known amount a day projects 30 and 90 days out within 5%, inside its interval."""
        base, slope, days = 400, 12, 35
        rng = np.random.default_rng(7)
        counts = [int(base + slope * d + rng.normal(0, 8)) for d in range(days)]

        async def run() -> dict[str, object]:
            await store.start()
            daily_traffic(store, counts, rng)
            await store.flush()
            out = await projections(store, NOW, max_concurrent=40)
            await store.close()
            return out

        out = asyncio.run(run())
        growth = out["growth_projections"]
        assert isinstance(growth, dict)
        level = base + slope * (days - 1)  # the trend's value on the last stored day
        for horizon in (30, 90):
            g = growth[f"{horizon}_days"]
            truth = base + slope * (days - 1 + horizon)
            daily = g["daily_requests"]
            assert daily["daily_requests"] == pytest.approx(truth, rel=0.05)
            assert daily["lower"] <= truth <= daily["upper"]
            assert g["expected_growth"] == pytest.approx(truth / level - 1, abs=0.06)
            assert g["capacity_needed"] == math.ceil(40 * (1 + g["expected_growth"]))
        assert growth["90_days"]["expected_growth"] > growth["30_days"]["expected_growth"]

    def test_too_little_history_is_a_clear_422(self, store: SQLiteStore) -> None:
        """Fewer whole days than the model needs is refused as insufficient history, not guessed."""

        async def run() -> None:
            await store.start()
            daily_traffic(store, [100] * (MIN_DAYS - 2), np.random.default_rng(1))
            await store.flush()
            try:
                await projections(store, NOW, max_concurrent=4)
            finally:
                await store.close()

        with pytest.raises(IrosError) as caught:
            asyncio.run(run())
        assert caught.value.status == 422
        assert caught.value.code == "insufficient_history"
        assert f"{MIN_DAYS - 2} whole days" in caught.value.message


class TestCurrentCapacity:
    def test_rates_and_concurrency_come_from_the_store(self, store: SQLiteStore) -> None:
        """Average and peak requests/s and the highest concurrency are read from what was recorded."""
        start = TODAY + 3600
        ts = np.concatenate([start + np.arange(0, 600, 2.0), start + 300 + np.arange(0, 10, 0.1)])
        ts.sort()
        active_ts = start + np.arange(0, 600, 5.0)
        active = np.where((active_ts >= start + 300) & (active_ts < start + 310), 9.0, 2.0)

        async def run() -> dict[str, object]:
            await store.start()
            store.append({("response_time_ms", LABELS): Samples(ts, np.full(ts.size, 120.0))})
            store.append({("active_connections", ()): Samples(active_ts, active)})
            await store.flush()
            out = await current_capacity(store, start, start + 600, max_concurrency=16)
            await store.close()
            return out

        out = asyncio.run(run())
        assert out["requests"] == ts.size
        assert out["avg_requests_per_second"] == pytest.approx(ts.size / 600, rel=0.02)
        # The busiest minute (one-minute windows): a burst of 100 on top of one request every 2 s.
        assert out["peak_requests_per_second"] == pytest.approx((100 + 30) / 60, rel=0.02)
        assert out["max_concurrent_requests"] == 9
        assert out["response_time_ms"]["mean"] == pytest.approx(120.0)


class TestRecommendations:
    def current(self, peak: float, avg: float, mean_ms: float, cores: float | None) -> dict[str, object]:
        return {
            "peak_requests_per_second": peak,
            "avg_requests_per_second": avg,
            "response_time_ms": {"mean": mean_ms, "p95": mean_ms * 1.5},
            "resource_utilization": {"process_cpu_cores": cores},
        }

    def test_replicas_follow_littles_law_and_the_cpu_limit(self) -> None:
        """Concurrency is rate times latency; replicas are the projected rate over one instance's limit."""
        peak, avg, mean_ms, cores, slots = 300.0, 100.0, 200.0, 0.5, 64
        growth = {
            "growth_projections": {
                "30_days": {"expected_growth": 0.2, "growth_interval": [0.1, 0.3]},
                "90_days": {"expected_growth": 0.5, "growth_interval": [0.3, 0.8]},
            }
        }
        plan = recommend(
            self.current(peak, avg, mean_ms, cores), growth, target_ms=2000, max_concurrency=slots
        )
        cpu_rps = 0.7 / (cores / avg)  # one worker planned at 70% of its core
        slot_rps = slots / (mean_ms / 1000)
        assert plan["instance_throughput_rps"] == pytest.approx(min(cpu_rps, slot_rps), rel=1e-3)
        for name, rate in (("current", peak), ("90_days", peak * 1.5), ("90_days_upper", peak * 1.8)):
            s = plan["scenarios"][name]
            assert s["requests_per_second"] == pytest.approx(rate)
            assert s["concurrent_requests"] == pytest.approx(rate * mean_ms / 1000, rel=1e-3)
            assert s["replicas"] == math.ceil(rate / min(cpu_rps, slot_rps))
        assert plan["scenarios"]["90_days_upper"]["replicas"] > plan["scenarios"]["current"]["replicas"]

    def test_without_projection_it_sizes_for_the_current_peak_and_says_so(self) -> None:
        """With no growth model the plan covers the measured peak only, and a finding states it."""
        plan = recommend(self.current(10.0, 5.0, 3000.0, None), None, target_ms=2000, max_concurrency=8)
        assert list(plan["scenarios"]) == ["current"]
        assert any("insufficient history" in f for f in plan["findings"])
        assert any("over the 2000 ms target" in f for f in plan["findings"])


class TestGpu:
    def test_gpu_figures_come_from_the_per_gpu_series(self, store: SQLiteStore) -> None:
        """GPU samples give capacity's GPU utilisation and the GPU view's per-device findings."""
        from iros.analysis.troubleshoot import gpu

        start = TODAY + 7200
        ts = start + np.arange(0, 300, 5.0)
        busy = np.linspace(20, 80, ts.size)

        async def run() -> tuple[dict[str, object], dict[str, object]]:
            await store.start()
            for index, values in (("0", busy), ("1", busy / 2)):
                label = (("gpu", index),)
                store.append({("gpu_utilization_percent", label): Samples(ts, values)})
                store.append({("gpu_memory_percent", label): Samples(ts, np.full(ts.size, 30.0))})
            await store.flush()
            current = await current_capacity(store, start, start + 300, max_concurrency=4)
            view = await gpu(store, start, start + 300, "ok")
            await store.close()
            return current, view

        current, view = asyncio.run(run())
        mean = float(np.concatenate([busy, busy / 2]).mean())
        assert current["resource_utilization"]["gpu"] == pytest.approx(mean / 100, rel=0.01)
        assert view["available"] and set(view["gpus"]) == {"0", "1"}
        assert view["gpus"]["0"]["utilization_percent"]["mean"] == pytest.approx(busy.mean(), rel=0.01)
        assert any(f.startswith("GPU 1:") for f in view["findings"])
