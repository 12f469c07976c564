"""KPIs: the seed's indicators computed from a window of per-series sketches, and health from targets.

sketches = window(collector.frames, since=now - 60)
report = compute(sketches, 60, targets, system=sampler.latest, accuracy={"large": 0.92})
report["response"]["response_time_p95"], report["status"]   # "healthy" | "degraded" | "critical"
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from iros.config import Target
from iros.core.timefmt import iso
from iros.metrics.sampler import SystemMetrics
from iros.metrics.sketch import Sketch
from iros.metrics.store import SeriesKey

Sketches = dict[SeriesKey, Sketch]

# performance_targets keys that name a KPI under another name.
TARGET_ALIASES = {"response_time_ms": "response_time_avg", "cpu_usage_percent": "cpu_usage_avg"}
LEVELS = ("ok", "warning", "critical")
STATUS = {"ok": "healthy", "warning": "degraded", "critical": "critical"}


def window(frames: Iterable[Any], since: float) -> Sketches:
    """Merge the frames at or after `since` into one sketch per series."""
    out: Sketches = {}
    for frame in frames:
        if frame.at < since:
            continue
        for key, sketch in frame.series.items():
            merged = out.get(key)
            if merged is None:
                merged = out[key] = Sketch()
            merged.merge(sketch)
    return out


def select(sketches: Sketches, name: str, **match: str | tuple[str, ...]) -> Sketch:
    """One sketch merging every series of `name` whose labels match (a value or a tuple of values)."""
    out = Sketch()
    for (metric, labels), sketch in sketches.items():
        if metric != name:
            continue
        have = dict(labels)
        if all(have.get(k) in v if isinstance(v, tuple) else have.get(k) == v for k, v in match.items()):
            out.merge(sketch)
    return out


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def response_kpis(s: Sketches, seconds: float, match: Mapping[str, str] | None = None) -> dict[str, Any]:
    m = dict(match or {})
    everything = select(s, "response_time_ms", **m)
    ok = select(s, "response_time_ms", **m, outcome="ok")
    server_errors = select(s, "response_time_ms", **m, outcome="server_error").count
    hits = select(s, "response_time_ms", **m, cache=("hit", "exact_hit", "semantic_hit")).count
    lookups = hits + select(s, "response_time_ms", **m, cache="miss").count
    overhead = select(s, "overhead_ms", **m)
    # The CPU KPI is the gateway's utilisation over the window (a gauge, no model label); CPU time per
    # response is its own figure: a cache hit is nearly all CPU however idle the gateway is.
    cpu = select(s, "cpu_usage_percent", **m)
    cpu_per_response = select(s, "cpu_per_response_percent", **m)
    return {
        "count": everything.count,
        "throughput_rps": _r(everything.count / seconds if seconds else None),
        "response_time_avg": _r(ok.avg),
        "response_time_p50": _r(ok.quantile(0.5)),
        "response_time_p95": _r(ok.quantile(0.95)),
        "response_time_p99": _r(ok.quantile(0.99)),
        "response_time_max": _r(ok.max if ok.count else None),
        "overhead_avg_ms": _r(overhead.avg, 4),
        "overhead_p95_ms": _r(overhead.quantile(0.95), 4),
        "cpu_usage_avg": _r(cpu.avg),
        "cpu_per_response_avg": _r(cpu_per_response.avg),
        "error_rate": _r(_ratio(everything.count - ok.count, everything.count), 5),
        "availability": _r(None if not everything.count else 1 - server_errors / everything.count, 5),
        "cache_hit_rate": _r(_ratio(hits, lookups), 4),
        "cache_hits": hits,
        "cache_lookups": lookups,
    }


def experience_kpis(s: Sketches, response_time_avg: float | None) -> dict[str, Any]:
    ttft = select(s, "ttft_ms")
    tpot = select(s, "tpot_ms")
    gaps = select(s, "stream_max_gap_ms")
    stalls = select(s, "stream_stalls")
    streams_with_stall = stalls.count - select_at_most(stalls, 0)
    satisfaction = select(s, "user_satisfaction")
    relevance = select(s, "relevance")
    scores = [x for x in (satisfaction.avg, relevance.avg) if x is not None]
    efficiency = None
    if ttft.avg is not None and response_time_avg:
        # How much earlier than the whole answer the first content arrives, as a share of the wait.
        efficiency = max(0.0, 1 - ttft.avg / response_time_avg)
    return {
        "ttft_avg_ms": _r(ttft.avg),
        "ttft_p50_ms": _r(ttft.quantile(0.5)),
        "ttft_p95_ms": _r(ttft.quantile(0.95)),
        "progressive_delivery_efficiency": _r(efficiency, 4),
        "tpot_avg_ms": _r(tpot.avg, 4),
        "tpot_p95_ms": _r(tpot.quantile(0.95), 4),
        "streams": ttft.count,
        "stream_max_gap_avg_ms": _r(gaps.avg),
        "stream_max_gap_p95_ms": _r(gaps.quantile(0.95)),
        "streams_with_stall": streams_with_stall,
        "streaming_continuity": _r(_ratio(ttft.count - streams_with_stall, ttft.count), 4),
        "user_satisfaction": _r(satisfaction.avg, 4),
        "feedback_count": satisfaction.count,
        "relevance": _r(relevance.avg, 4),
        "content_quality_score": _r(sum(scores) / len(scores) if scores else None, 4),
    }


def select_at_most(sketch: Sketch, limit: float) -> int:
    """How many values are <= limit (exact for 0: zeros have their own bucket)."""
    if sketch.count == 0:
        return 0
    if limit <= 0:
        return sketch.zeros
    raise ValueError("only limit 0 is exact")


def business_kpis(s: Sketches, seconds: float) -> dict[str, Any]:
    prompt, completion = select(s, "prompt_tokens"), select(s, "completion_tokens")
    return {
        "prompt_tokens": int(prompt.sum),
        "completion_tokens": int(completion.sum),
        "tokens_per_second": _r((prompt.sum + completion.sum) / seconds if seconds else None),
        "content_bytes": int(select(s, "content_length_bytes").sum),
    }


def model_kpis(
    s: Sketches, seconds: float, model: str, accuracy: float | None, total: int, system: SystemMetrics | None
) -> dict[str, Any]:
    """The seed's ModelMetrics for one model."""
    r = response_kpis(s, seconds, {"model": model})
    ok = select(s, "response_time_ms", model=model, outcome="ok")
    satisfaction = select(s, "user_satisfaction", model=model)
    ttft = select(s, "ttft_ms", model=model)
    tpot = select(s, "tpot_ms", model=model)
    prompt, completion = select(s, "prompt_tokens", model=model), select(s, "completion_tokens", model=model)
    share = r["count"] / total if total else None
    return {
        "model_id": model,
        "response_time": r["response_time_avg"],
        "response_time_p95": r["response_time_p95"],
        "accuracy_score": accuracy,
        "resource_usage": {
            "cpu_percent": r["cpu_per_response_avg"],
            # Memory and GPU are shared by all models in one process: each model is charged its share of use.
            "memory_bytes": int(system.process_memory_bytes * share)
            if system and share is not None
            else None,
            "gpu_percent": _r(system.gpu_utilization * share)
            if system and system.gpu_utilization is not None and share is not None
            else None,
        },
        "usage_count": r["count"],
        "usage_share": _r(share, 4),
        "error_rate": r["error_rate"],
        "user_preference_score": _r(satisfaction.avg, 4),
        "ttft_avg_ms": _r(ttft.avg),
        "tpot_avg_ms": _r(tpot.avg, 4),
        "tokens": {"prompt": int(prompt.sum), "completion": int(completion.sum)},
        "throughput_rps": r["throughput_rps"],
        "successful": ok.count,
    }


def system_kpis(system: SystemMetrics | None) -> dict[str, Any]:
    if system is None:
        return {}
    return {
        "cpu_percent": system.cpu_utilization,
        "memory_percent": system.memory_utilization,
        "gpu_utilization": system.gpu_utilization,
        "gpu_status": system.gpu_status,
        "disk_usage_percent": system.disk_usage,
        "process_cpu_percent": system.process_cpu_percent,
        "process_memory_bytes": system.process_memory_bytes,
        "network_rx_bytes_per_second": _r(system.network_io["rx_bytes_per_second"], 1),
        "network_tx_bytes_per_second": _r(system.network_io["tx_bytes_per_second"], 1),
        "active_connections": system.active_connections,
        "queue_length": system.queue_length,
        "sampled_at": iso(system.timestamp.timestamp()),
    }


def level(value: float | None, target: Target) -> str | None:
    """ok / warning / critical for one KPI; the thresholds' order says which direction is worse."""
    if value is None:
        return None
    higher_is_worse = target.critical_threshold >= target.target
    if higher_is_worse:
        if value >= target.critical_threshold:
            return "critical"
        return "warning" if value >= target.warning_threshold else "ok"
    if value <= target.critical_threshold:
        return "critical"
    return "warning" if value <= target.warning_threshold else "ok"


def assess(flat: Mapping[str, Any], targets: Mapping[str, Target]) -> tuple[str, dict[str, Any]]:
    """Health from performance_targets: healthy, degraded (a warning) or critical; KPIs without data
    do not count."""
    kpis: dict[str, Any] = {}
    worst = "ok"
    for name, target in targets.items():
        value = flat.get(TARGET_ALIASES.get(name, name))
        lvl = level(value, target)
        kpis[name] = {
            "value": value,
            "target": target.target,
            "warning_threshold": target.warning_threshold,
            "critical_threshold": target.critical_threshold,
            "level": lvl or "no_data",
            "meets_target": None if value is None else level(value, _as_target(target)) == "ok",
        }
        if lvl is not None and LEVELS.index(lvl) > LEVELS.index(worst):
            worst = lvl
    return STATUS[worst], kpis


def _as_target(target: Target) -> Target:
    # "meets target" is the same test with the target itself as the warning line.
    return Target(
        target=target.target, warning_threshold=target.target, critical_threshold=target.critical_threshold
    )


def compute(
    s: Sketches,
    seconds: float,
    targets: Mapping[str, Target],
    system: SystemMetrics | None,
    accuracy: Mapping[str, float | None],
    sections: Iterable[str] = ("business", "user_journey", "model_performance"),
) -> dict[str, Any]:
    response = response_kpis(s, seconds)
    out: dict[str, Any] = {
        "timestamp": iso(time.time()),
        "window_seconds": seconds,
        "response": response,
        "system": system_kpis(system),
    }
    on = set(sections)
    if "user_journey" in on:
        out["user_experience"] = experience_kpis(s, response["response_time_avg"])
    if "business" in on:
        out["business"] = business_kpis(s, seconds)
    if "model_performance" in on:
        out["models"] = {
            m: model_kpis(s, seconds, m, accuracy.get(m), response["count"], system) for m in accuracy
        }
    out["status"], out["kpis"] = assess(flatten(out), targets)
    return out


def flatten(report: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar KPIs of a report under one namespace (for targets, alert rules, live filters)."""
    flat: dict[str, Any] = {}
    for section in ("response", "user_experience", "business", "system"):
        for key, value in (report.get(section) or {}).items():
            if isinstance(value, int | float | str) or value is None:
                flat[key] = value
    return flat
