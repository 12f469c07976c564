"""Capacity planning: what one Iros carries now, how load grows, and how many replicas it will need.

current = await current_capacity(store, start, end, admission_limit=64)
growth = await projections(store, now, current["max_concurrent_requests"])   # Holt's linear trend
plan = recommend(current, growth, target_ms=2000, max_concurrency=64)         # Little's law
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from iros.analysis.history import distribution, interval_values, points, rnd
from iros.core.errors import IrosError
from iros.metrics.store import MetricsStore

if TYPE_CHECKING:
    import pandas as pd

DAY = 86400.0
MIN_DAYS = 7  # daily points a trend needs before it says anything about 30 or 90 days
HISTORY_DAYS = 180
HORIZONS = (30, 90)
PI_ALPHA = 0.05  # 95% prediction intervals
TARGET_CPU = 0.7  # a worker's event loop planned at 70% of its core, leaving room for bursts


def peak_step(span: float) -> float:
    """Windows for peak requests/s: the one-minute rollups up to a week, hours beyond."""
    return 60.0 if span <= 7 * DAY else 3600.0


async def current_capacity(
    store: MetricsStore, start: float, end: float, max_concurrency: int, in_flight: int = 0
) -> dict[str, Any]:
    """The seed's current_capacity, measured over [start, end)."""
    step = peak_step(end - start)
    counts = await interval_values(store, "response_time_ms", start, end, step, stat="count")
    total = sum(c for _, c in counts)
    # Average over the part of the window that has data: a server up for ten minutes of a day is
    # not averaged over the whole day.
    covered = end - max(start, counts[0][0]) if counts else 0.0
    avg_rps = total / covered if covered > 0 else 0.0
    # The window holding `end` is only partly over: its rate is over the part that has passed.
    peak_rps = max((c / max(min(step, end - ts), 1.0) for ts, c in counts), default=0.0)
    active = await distribution(store, "active_connections", start, end)
    latency = await distribution(store, "response_time_ms", start, end, (("outcome", "ok"),))
    cpu = await distribution(store, "cpu_percent", start, end)
    memory = await distribution(store, "memory_percent", start, end)
    process_cpu = await distribution(store, "process_cpu_percent", start, end)
    # CPU per answered request as the collector attributes it (the event loop's CPU shared among the
    # responses by their Iros time): unlike process CPU over request rate, idle work is not charged.
    per_response = await distribution(store, "cpu_per_response_percent", start, end)
    cpu_ms = (
        per_response.mean / 100 * latency.mean if per_response.mean is not None and latency.mean else None
    )
    gpu = await distribution(store, "gpu_utilization_percent", start, end)
    # The in-flight gauge is sampled every few seconds and misses short bursts; the time requests spent
    # in each window over the window's length is its mean concurrency (Little's law), never missed.
    busy = await interval_values(store, "response_time_ms", start, end, step, stat="sum")
    peak_busy = max((ms / 1000 / max(min(step, end - ts), 1.0) for ts, ms in busy), default=0.0)
    mean_concurrency = sum(ms for _, ms in busy) / 1000 / covered if covered > 0 else 0.0
    max_concurrent = max(int(active.max or 0), in_flight, math.ceil(peak_busy))
    return {
        "max_concurrent_requests": max_concurrent,
        "configured_max_concurrency": max_concurrency,
        "mean_concurrent_requests": rnd(mean_concurrency, 4),
        "sampled_max_in_flight": int(active.max or 0),
        "avg_requests_per_second": rnd(avg_rps, 4),
        "peak_requests_per_second": rnd(peak_rps, 4),
        "peak_window_seconds": step,
        "requests": int(total),
        "response_time_ms": latency.json(),
        "cpu_ms_per_request": rnd(cpu_ms, 4),
        "resource_utilization": {
            "cpu": rnd(cpu.mean / 100 if cpu.mean is not None else None, 4),
            "memory": rnd(memory.mean / 100 if memory.mean is not None else None, 4),
            "gpu": rnd(gpu.mean / 100 if gpu.mean is not None else None, 4),
            "process_cpu_cores": rnd(process_cpu.mean / 100 if process_cpu.mean is not None else None, 4),
        },
        "resource_peaks": {
            "cpu": rnd(cpu.max / 100 if cpu.max is not None else None, 4),
            "memory": rnd(memory.max / 100 if memory.max is not None else None, 4),
            "gpu": rnd(gpu.max / 100 if gpu.max is not None else None, 4),
        },
        "window": {"start": start, "end": end, "covered_seconds": rnd(covered, 1)},
    }


async def daily_requests(store: MetricsStore, now: float, days: int = HISTORY_DAYS) -> pd.Series:
    """Requests per whole UTC day, oldest first, missing days inside the range as 0."""
    import pandas as pd  # pandas and scipy load on first use, not with every server start

    end = math.floor(now / DAY) * DAY  # today is not over: it would read as a drop
    start = end - days * DAY
    windows = await points(store, "response_time_ms", start, end, DAY, quantiles=())
    by_day = {int(p.ts // DAY): p.count for p in windows if start <= p.ts < end and p.count}
    if not by_day:
        return pd.Series(dtype=float)
    first, last = min(by_day), int(end // DAY) - 1
    index = pd.date_range(pd.Timestamp(first * DAY, unit="s"), periods=last - first + 1, freq="D")
    return pd.Series([float(by_day.get(d, 0)) for d in range(first, last + 1)], index=index)


def forecast(history: pd.Series, horizons: tuple[int, ...] = HORIZONS) -> dict[str, Any]:
    """Holt's linear trend (ETS with additive error and trend), with prediction intervals."""
    import pandas as pd
    from scipy.stats import linregress, norm
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    if len(history) < MIN_DAYS:
        raise IrosError(
            422,
            f"insufficient history: {len(history)} whole days of traffic stored, {MIN_DAYS} needed for a "
            "growth projection (metrics_collection keeps the history; come back once it has a week)",
            code="insufficient_history",
        )
    y = pd.Series(history.to_numpy(dtype=float))
    with warnings.catch_warnings():
        # Short or flat series warn about convergence; the fit is still the best the data allows.
        warnings.simplefilter("ignore")
        fit = ETSModel(y, error="add", trend="add").fit(disp=False)
        frame = fit.get_prediction(start=len(y), end=len(y) + max(horizons) - 1).summary_frame(alpha=PI_ALPHA)
    level = float(np.asarray(fit.level)[-1])
    out: dict[str, Any] = {
        "model": "holt_linear_trend",
        "interval": "ets, widened by the slope's standard error",
        "history_days": len(y),
        "current_daily_requests": rnd(level, 2),
        "trend_per_day": rnd(float(np.asarray(fit.slope)[-1]), 4),
        "prediction_interval": 1 - PI_ALPHA,
        "horizons": {},
    }
    # ETS intervals treat the fitted slope as known; over 90 days its estimation error dominates. Its
    # standard error (least squares on the same days) widens them by h * se at horizon h.
    se_slope = float(linregress(np.arange(len(y)), y.to_numpy()).stderr) if len(y) > 2 else 0.0
    z = float(norm.ppf(1 - PI_ALPHA / 2))
    for h in horizons:
        row = frame.iloc[h - 1]
        mean = float(row["mean"])
        half = z * math.hypot((float(row["pi_upper"]) - mean) / z, h * se_slope)
        out["horizons"][h] = {
            "daily_requests": rnd(mean, 2),
            "lower": rnd(max(mean - half, 0.0), 2),
            "upper": rnd(mean + half, 2),
        }
    return out


async def projections(store: MetricsStore, now: float, max_concurrent: int) -> dict[str, Any]:
    """The seed's growth_projections: expected growth and the concurrency it will need."""
    fc = forecast(await daily_requests(store, now))
    level = fc["current_daily_requests"] or 0.0
    growth: dict[str, Any] = {}
    for h in HORIZONS:
        f = fc["horizons"][h]
        expected = f["daily_requests"] / level - 1 if level > 0 else None
        upper = f["upper"] / level - 1 if level > 0 else None
        lower = f["lower"] / level - 1 if level > 0 else None
        growth[f"{h}_days"] = {
            "expected_growth": rnd(expected, 4),
            "growth_interval": [rnd(lower, 4), rnd(upper, 4)],
            "capacity_needed": math.ceil(max_concurrent * (1 + expected)) if expected is not None else None,
            "capacity_needed_upper": math.ceil(max_concurrent * (1 + upper)) if upper is not None else None,
            "daily_requests": f,
        }
    return {
        "growth_projections": growth,
        "model": {k: v for k, v in fc.items() if k != "horizons"},
        "basis_max_concurrent_requests": max_concurrent,
    }


def recommend(
    current: dict[str, Any],
    growth: dict[str, Any] | None,
    target_ms: float,
    max_concurrency: int,
) -> dict[str, Any]:
    """Replicas and concurrency for the projected peak at the target latency (Little's law: L = λW)."""
    peak = current["peak_requests_per_second"] or 0.0
    avg = current["avg_requests_per_second"] or 0.0
    latency = current["response_time_ms"]
    w_mean = (latency["mean"] or 0.0) / 1000
    w_p95 = (latency["p95"] or latency["mean"] or 0.0) / 1000
    cores = current["resource_utilization"]["process_cpu_cores"]
    # One instance's ceiling: slots over time in a slot, and CPU per request at the planned load.
    slot_bound = max_concurrency / w_mean if w_mean > 0 else None
    cpu_ms = current.get("cpu_ms_per_request")
    # Core-seconds per request: the collector's attribution when present, else process CPU over rate.
    cpu_per_request = cpu_ms / 1000 if cpu_ms else (cores / avg if cores and avg > 0 else None)
    cpu_bound = TARGET_CPU / cpu_per_request if cpu_per_request else None
    limits = [x for x in (slot_bound, cpu_bound) if x]
    per_instance = min(limits) if limits else None
    scenarios = {"current": peak}
    if growth is not None:
        for key, g in growth["growth_projections"].items():
            hi = g["growth_interval"][1]
            scenarios[key] = peak * (1 + (g["expected_growth"] or 0.0))
            scenarios[f"{key}_upper"] = peak * (1 + (hi if hi is not None else 0.0))
    plans = {}
    for name, rate in scenarios.items():
        concurrency = rate * w_mean
        replicas = max(1, math.ceil(rate / per_instance)) if per_instance else None
        plans[name] = {
            "requests_per_second": rnd(rate, 4),
            "concurrent_requests": rnd(concurrency, 3),
            "replicas": replicas,
            # In flight per replica at p95 latency: the slots each needs so the queue stays empty.
            "max_concurrency_per_replica": math.ceil(rate / replicas * w_p95) + 1 if replicas else None,
            "concurrency_at_target": rnd(rate * target_ms / 1000, 3),
        }
    findings = []
    if per_instance:
        bound = "CPU" if cpu_bound and per_instance == cpu_bound else "concurrency slots"
        findings.append(
            f"one instance carries about {per_instance:.1f} requests/s, limited by {bound} "
            f"(mean latency {w_mean * 1000:.1f} ms, {max_concurrency} slots"
            + (f", {cpu_per_request * 1000:.3f} core-ms per request)" if cpu_per_request else ")")
        )
    if w_mean * 1000 > target_ms:
        findings.append(
            f"mean latency {w_mean * 1000:.0f} ms is over the {target_ms:.0f} ms target: more replicas "
            "do not shorten the model's time; see /api/analysis/bottlenecks"
        )
    if growth is None:
        findings.append("no growth projection yet (insufficient history): sized for the current peak only")
    return {
        "target_latency_ms": target_ms,
        "method": "littles_law",
        "measured": {
            "peak_requests_per_second": peak,
            "mean_response_time_ms": rnd(w_mean * 1000),
            "p95_response_time_ms": rnd(w_p95 * 1000),
            "cpu_cores_per_request_per_second": rnd(cpu_per_request, 6),
        },
        "instance_throughput_rps": rnd(per_instance, 3),
        "instance_limits": {"slots_rps": rnd(slot_bound, 3), "cpu_rps": rnd(cpu_bound, 3)},
        "scenarios": plans,
        "findings": findings,
    }
