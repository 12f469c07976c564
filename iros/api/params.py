"""The query parameters every history endpoint shares, and the points they answer with.

time_param("2024-01-01", "start")     # 1704067200.0; a bad value is a 400 IrosError naming the parameter
duration_param("5m", "window")        # 300.0
await query_points(store, "response_time_ms", start, end, auto_step(end - start), {"model": "large"})
"""

from __future__ import annotations

import math
from typing import Any

from starlette.requests import Request

from iros.core.errors import IrosError, StoreUnavailable, bad
from iros.core.timefmt import RANGES, DurationError, TimeError, iso, parse_duration, parse_time
from iros.metrics.catalog import METRICS
from iros.metrics.store import MetricsStore, Point, Query

MAX_POINTS = 11_000  # Prometheus' own limit per series; the same for both stores
STEPS = (10.0, 60.0, 300.0, 3600.0, 86400.0)
INTERVALS = {"1m": 60.0, "5m": 300.0, "1h": 3600.0, "1d": 86400.0}
DEFAULT_HISTORY = ("response_time_ms", "cpu_percent", "memory_percent")
SEED_BUCKETS = (0, 500, 1000, 2000, 5000, 10000)
QUANTILES = (0.5, 0.95, 0.99)


def time_param(value: str, param: str) -> float:
    """A time query parameter (timefmt.parse_time); a 400 naming the parameter otherwise."""
    try:
        return parse_time(value)
    except TimeError as exc:
        raise bad(f"{param}={exc}", param) from None


def duration_param(value: str, param: str) -> float:
    """A duration query parameter over 0 (timefmt.parse_duration); a 400 naming the parameter otherwise."""
    try:
        seconds = parse_duration(value)
    except DurationError:
        seconds = 0.0
    if seconds <= 0:
        raise bad(f"{param}={value!r} is not a duration: use seconds or 30s, 5m, 1h, 1d, 1w", param)
    return seconds


def range_param(request: Request, default: str) -> tuple[str, float]:
    """?range= one of the dashboard's named ranges (timefmt.RANGES): its name and seconds."""
    name = request.query_params.get("range", default)
    if name not in RANGES:
        raise bad(f"range must be one of {', '.join(RANGES)}", "range")
    return name, RANGES[name]


def limit_param(request: Request, default: int, high: int) -> int:
    raw = request.query_params.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= high:
        raise IrosError(400, f"limit: a whole number from 1 to {high}", param="limit")
    return int(raw)


def resolve_metric(name: str) -> str:
    """Catalog names, or the same without the unit suffix (response_time, cpu_usage)."""
    if name in METRICS:
        return name
    for suffix in ("_ms", "_percent", "_bytes", "_per_second"):
        if name + suffix in METRICS:
            return name + suffix
    raise bad(f"unknown metric {name!r}; known: {', '.join(METRICS)}", "metric")


def auto_step(span: float) -> float:
    """The finest store resolution that keeps a chart near 300 points."""
    for step in STEPS:
        if span / step <= 300:
            return step
    return STEPS[-1]


def point_json(p: Point) -> dict[str, Any]:
    out: dict[str, Any] = {
        "timestamp": iso(p.ts),
        "count": p.count,
        "sum": round4(p.sum),
        "avg": round4(p.avg),
        "min": round4(p.min),
        "max": round4(p.max),
    }
    for q, v in p.quantiles.items():
        out[f"p{round(q * 100):d}"] = round4(v)
    return out


def round4(value: float | None) -> float | None:
    if value is None or math.isnan(value):
        return None
    return round(value, 4)


async def query_points(
    store: MetricsStore, metric: str, start: float, end: float, step: float, match: dict[str, str]
) -> list[dict[str, Any]]:
    """One metric's points from the store as JSON; 400 for too many points, 503 with the store down."""
    if (end - start) / step > MAX_POINTS:
        raise bad(f"{(end - start) / step:.0f} points asked; at most {MAX_POINTS}: use a larger step", "step")
    query = Query(metric, start, end, step, tuple(sorted(match.items())), QUANTILES)
    try:
        points = await store.query(query)
    except StoreUnavailable as exc:
        raise IrosError(503, f"metric history is unavailable: {exc}", code="store_unavailable") from None
    except ValueError as exc:
        raise bad(str(exc)) from None
    return [point_json(p) for p in points]
