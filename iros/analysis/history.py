"""Reading measured history for analysis: whole-range distributions, per-interval series, trend tests.

Shared by bottlenecks, reports, capacity and troubleshooting, so they all read the store the same way.

dist = await distribution(store, "response_time_ms", start, end, (("outcome", "ok"),))
dist.p95, dist.mean, dist.count
values = await interval_values(store, "cpu_percent", start, end, step=600)
trend(values_now, values_before, lower_is_better=True)   # {"direction": "degrading", "p_value": ...}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from iros.core.errors import IrosError, StoreUnavailable
from iros.metrics.store import MetricsStore, Point, Query

# A 101-point quantile grid per window: windows merge by weighting each grid by its count (1% ranks).
GRID = tuple(i / 100 for i in range(101))
TREND_ALPHA = 0.05
MIN_TREND_VALUES = 4  # per period; fewer and the test cannot reach significance


@dataclass(slots=True)
class Distribution:
    """One metric over a whole range, windows merged."""

    count: int
    sum: float
    min: float | None
    max: float | None
    p50: float | None
    p95: float | None
    p99: float | None

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    def json(self, digits: int = 3) -> dict[str, Any]:
        return {
            "count": self.count,
            "mean": rnd(self.mean, digits),
            "p50": rnd(self.p50, digits),
            "p95": rnd(self.p95, digits),
            "p99": rnd(self.p99, digits),
            "max": rnd(self.max, digits),
        }


def rnd(value: float | None, digits: int = 3) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def window_step(span: float, max_windows: int = 600) -> float:
    """A rollup tier giving at most about max_windows windows.

    Never raw samples: an hour at 3,000 requests/s is 10 million of them per series, while its
    one-minute rollups are 60 rows.
    """
    for step in (60.0, 300.0, 3600.0, 86400.0):
        if span / step <= max_windows:
            return step
    return 86400.0


async def points(
    store: MetricsStore,
    metric: str,
    start: float,
    end: float,
    step: float,
    match: tuple[tuple[str, str], ...] = (),
    quantiles: tuple[float, ...] = (0.5, 0.95),
) -> list[Point]:
    """The store's windows; an unreachable store is a 503 that says so."""
    try:
        return await store.query(Query(metric, start, end, step, tuple(sorted(match)), quantiles))
    except StoreUnavailable as exc:
        raise IrosError(503, f"metric history is unavailable: {exc}", code="store_unavailable") from None
    except ValueError as exc:
        raise IrosError(400, str(exc), code="invalid_parameter") from None


def merge(windows: list[Point]) -> Distribution:
    """Windows' quantile grids, each weighted by its count, read as one distribution."""
    count = sum(p.count for p in windows)
    total = sum(p.sum for p in windows)
    lows = [p.min for p in windows if p.min is not None]
    highs = [p.max for p in windows if p.max is not None]
    values: list[float] = []
    weights: list[float] = []
    for p in windows:
        grid = [v for v in (p.quantiles.get(q) for q in GRID) if v is not None]
        if p.count and grid:
            values += grid
            weights += [p.count / len(grid)] * len(grid)
    if not values:
        return Distribution(count, total, min(lows, default=None), max(highs, default=None), None, None, None)
    order = np.argsort(values)
    v = np.asarray(values)[order]
    cum = np.cumsum(np.asarray(weights)[order])
    cum /= cum[-1]

    def q(x: float) -> float:
        return float(v[min(int(np.searchsorted(cum, x)), v.size - 1)])

    return Distribution(
        count, total, min(lows, default=None), max(highs, default=None), q(0.5), q(0.95), q(0.99)
    )


async def distribution(
    store: MetricsStore,
    metric: str,
    start: float,
    end: float,
    match: tuple[tuple[str, str], ...] = (),
) -> Distribution:
    return merge(await points(store, metric, start, end, window_step(end - start), match, GRID))


async def interval_values(
    store: MetricsStore,
    metric: str,
    start: float,
    end: float,
    step: float,
    match: tuple[tuple[str, str], ...] = (),
    stat: str = "avg",
) -> list[tuple[float, float]]:
    """(window start, value) per window that holds data; stat is avg, max, count, sum, p50 or p95."""
    out = []
    for p in await points(store, metric, start, end, step, match):
        if p.count == 0:
            continue
        if stat == "avg":
            value = p.avg
        elif stat in ("max", "min"):
            value = getattr(p, stat)
        elif stat in ("count", "sum"):
            value = float(getattr(p, stat))
        else:
            value = p.quantiles.get(float(stat[1:]) / 100)
        if value is not None and start - step < p.ts < end:
            out.append((p.ts, float(value)))
    return out


def trend(current: list[float], previous: list[float], lower_is_better: bool) -> dict[str, Any]:
    """improving / stable / degrading by a two-sided Mann-Whitney U test of the two periods' values.

    Stable unless the difference is significant at TREND_ALPHA; the direction is then the medians'.
    """
    if len(current) < MIN_TREND_VALUES or len(previous) < MIN_TREND_VALUES:
        return {
            "direction": "insufficient_data",
            "p_value": None,
            "current_median": rnd(float(np.median(current)) if current else None),
            "previous_median": rnd(float(np.median(previous)) if previous else None),
            "n": [len(current), len(previous)],
        }
    from scipy.stats import mannwhitneyu  # scipy loads in ~0.5 s: only when a trend is tested

    now, before = float(np.median(current)), float(np.median(previous))
    if np.ptp(np.concatenate([current, previous])) == 0:
        p = 1.0
    else:
        p = float(mannwhitneyu(current, previous, alternative="two-sided").pvalue)
    direction = "stable"
    # The medians say which way; where they tie (counts, shares), the means do.
    a, b = (now, before) if now != before else (float(np.mean(current)), float(np.mean(previous)))
    if p < TREND_ALPHA and a != b:
        better = a < b if lower_is_better else a > b
        direction = "improving" if better else "degrading"
    change = (now - before) / abs(before) if before else None
    return {
        "direction": direction,
        "p_value": rnd(p, 6),
        "current_median": rnd(now),
        "previous_median": rnd(before),
        "relative_change": rnd(change, 4),
        "n": [len(current), len(previous)],
        "test": "mann-whitney-u",
    }
