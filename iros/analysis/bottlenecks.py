"""Bottleneck analysis: where requests spend their time, and which resource runs out first.

Reads the stage_ms series (one sample per request per pipeline stage, collector.py) and the system
gauges (sampler.py) over a window of the metrics store.

report = await analyse(store, start, end, max_concurrency=64, cache_hit_rate=0.4)
report["top_bottleneck"]        # {"kind": "stage", "name": "upstream_ttft", "finding": ..., ...}
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from iros.analysis.history import Distribution, distribution, interval_values, rnd, window_step
from iros.metrics.store import MetricsStore

# The seed's stages, each the spans.py laps it is made of. embedding runs inside cache_lookup and
# metering beside the pipeline (the collector's ingest, per response): neither adds to the total.
STAGE_GROUPS: dict[str, tuple[str, ...]] = {
    "queue_wait": ("queue", "upstream_queue"),
    "auth_parsing": ("auth", "parse"),
    "cache_lookup": ("cache",),
    "routing": ("route",),
    "upstream_connect": ("upstream_connect", "retry"),
    "upstream_ttft": ("upstream_ttft",),
    "streaming": ("stream",),
    "respond": ("respond",),
    "unattributed": ("other",),
}
SIDE_STAGES = {"embedding": "cache_lookup", "metering": None}
UPSTREAM = frozenset({"upstream_connect", "upstream_ttft", "streaming"})

# Resource thresholds: beyond these a resource, not a stage, limits throughput.
CPU_SATURATION = 90.0  # % of one core for the process (one event loop), or of the host
MEMORY_PRESSURE = 90.0  # % of host memory
LOOP_LAG_MS = 50.0  # p95 timer lateness
QUEUE_SLOPE_P = 0.05


async def stage_table(store: MetricsStore, start: float, end: float) -> dict[str, Any]:
    """Per stage: p50, p95, mean and share of end-to-end time; shares of pipeline stages sum to 1."""
    stages: dict[str, Distribution] = {}
    for laps in STAGE_GROUPS.values():
        for lap in laps:
            stages[lap] = await distribution(store, "stage_ms", start, end, (("stage", lap),))
    for side in SIDE_STAGES:
        stages[side] = await distribution(store, "stage_ms", start, end, (("stage", side),))
    # Every request has an `other` sample, so its count is the number of requests measured.
    requests = stages["other"].count
    total_ms = sum(stages[lap].sum for laps in STAGE_GROUPS.values() for lap in laps)
    rows = []
    for group, laps in STAGE_GROUPS.items():
        for lap in laps:
            d = stages[lap]
            rows.append(_row(group, lap, d, total_ms, requests, on_path=True))
    for side, within in SIDE_STAGES.items():
        row = _row(side, side, stages[side], total_ms, requests, on_path=False)
        row["within"] = within
        rows.append(row)
    groups = {}
    for group, laps in STAGE_GROUPS.items():
        spent = sum(stages[lap].sum for lap in laps)
        groups[group] = {
            "mean_ms_per_request": rnd(spent / requests if requests else None),
            "share": rnd(spent / total_ms if total_ms else None, 4),
        }
    return {
        "requests": requests,
        "mean_total_ms": rnd(total_ms / requests if requests else None),
        "stages": rows,
        "groups": groups,
    }


def _row(
    group: str, lap: str, d: Distribution, total_ms: float, requests: int, on_path: bool
) -> dict[str, Any]:
    return {
        "stage": group,
        "span": lap,
        "on_request_path": on_path,
        "count": d.count,
        "p50_ms": rnd(d.p50),
        "p95_ms": rnd(d.p95),
        "mean_ms": rnd(d.mean),
        # Per request (a stage some requests skip weighs less), as a share of all requests' time.
        "mean_ms_per_request": rnd(d.sum / requests if requests else None),
        "share": rnd(d.sum / total_ms if total_ms else None, 4),
    }


async def resource_table(
    store: MetricsStore, start: float, end: float, max_concurrency: int
) -> list[dict[str, Any]]:
    """CPU saturation, memory pressure, event-loop lag and queue growth, each from its gauge."""
    out = []
    for name, metric, threshold in (
        ("process_cpu_saturation", "process_cpu_percent", CPU_SATURATION),
        ("host_cpu_saturation", "cpu_percent", CPU_SATURATION),
        ("memory_pressure", "memory_percent", MEMORY_PRESSURE),
        ("event_loop_lag", "event_loop_lag_ms", LOOP_LAG_MS),
    ):
        d = await distribution(store, metric, start, end)
        value = d.p95
        out.append(
            {
                "resource": name,
                "metric": metric,
                "samples": d.count,
                "mean": rnd(d.mean),
                "p95": rnd(value),
                "max": rnd(d.max),
                "threshold": threshold,
                "saturated": value is not None and value >= threshold,
                "severity": rnd(value / threshold if value is not None else None, 3),
            }
        )
    out.append(await _queue_growth(store, start, end, max_concurrency))
    return out


async def _queue_growth(
    store: MetricsStore, start: float, end: float, max_concurrency: int
) -> dict[str, Any]:
    from scipy.stats import linregress  # loaded on first use: it adds ~0.5 s to every start otherwise

    step = window_step(end - start, 300)
    queue = await interval_values(store, "queue_length", start, end, step)
    active = await distribution(store, "active_connections", start, end)
    slope = p = None
    if len(queue) >= 3 and np.ptp([v for _, v in queue]) > 0:
        fit = linregress([t for t, _ in queue], [v for _, v in queue])
        slope, p = float(fit.slope) * 60, float(fit.pvalue)  # requests per minute
    mean_queue = float(np.mean([v for _, v in queue])) if queue else None
    growing = slope is not None and p is not None and slope > 0 and p < QUEUE_SLOPE_P
    busy = active.p95 is not None and active.p95 >= max_concurrency
    return {
        "resource": "queue_growth",
        "metric": "queue_length",
        "samples": len(queue),
        "mean": rnd(mean_queue),
        "slope_per_minute": rnd(slope, 4),
        "p_value": rnd(p, 6),
        "active_p95": rnd(active.p95),
        "max_concurrency": max_concurrency,
        "threshold": 0.0,
        "saturated": bool(growing or (busy and (mean_queue or 0) > 0)),
        "severity": rnd((active.p95 or 0) / max_concurrency if max_concurrency else None, 3),
    }


def _stage_finding(
    name: str, groups: dict[str, Any], table: dict[str, Any], context: dict[str, Any]
) -> tuple[str, str]:
    g = groups[name]
    share, mean = g["share"] or 0.0, g["mean_ms_per_request"] or 0.0
    rows = [r for r in table["stages"] if r["stage"] == name]
    p95 = max((r["p95_ms"] or 0.0) for r in rows) if rows else 0.0
    finding = (
        f"{name} takes {share:.0%} of end-to-end time: {mean:.3f} ms per request on average, "
        f"p95 {p95:.3f} ms, over {table['requests']} requests"
    )
    hit = context.get("cache_hit_rate")
    limit = context.get("max_concurrency")
    if name in ("upstream_ttft", "streaming", "upstream_connect"):
        hit_text = f"the cache hit rate is {hit:.0%}" if hit is not None else "the cache is off"
        rec = (
            f"the model server's time dominates ({share:.0%}); {hit_text}: serving more from the cache "
            f"or routing more traffic to a faster model cuts it, Iros tuning cannot"
        )
    elif name == "queue_wait":
        rec = (
            f"requests wait {mean:.3f} ms for one of {limit} slots: raise server.max_concurrency "
            f"or add replicas (see /api/analysis/capacity/recommendations)"
        )
    elif name == "cache_lookup":
        emb = next((r for r in table["stages"] if r["stage"] == "embedding"), None)
        emb_mean = (emb or {}).get("mean_ms") or 0.0
        rec = (
            f"cache lookups cost {mean:.3f} ms per request, embeddings {emb_mean:.3f} ms per call: "
            f"run the embedder on a GPU or raise the exact-match share"
            if emb_mean
            else f"cache lookups cost {mean:.3f} ms per request: check the cache store's latency"
        )
    elif name == "auth_parsing":
        rec = f"auth and parsing take {mean:.3f} ms per request: look for oversized request bodies"
    else:
        rec = f"{name} costs {mean:.3f} ms per request: profile a request (POST /api/analysis/profile)"
    return finding, rec


def top_bottleneck(
    table: dict[str, Any], resources: list[dict[str, Any]], context: dict[str, Any]
) -> dict[str, Any] | None:
    """A saturated resource first (it limits every stage), else the stage with the largest share."""
    saturated = [r for r in resources if r["saturated"]]
    if saturated:
        worst = max(saturated, key=lambda r: r["severity"] or 0.0)
        value = worst["p95"] if worst["resource"] != "queue_growth" else worst["mean"]
        return {
            "kind": "resource",
            "name": worst["resource"],
            "value": value,
            "finding": _resource_finding(worst),
            "recommendation": _resource_advice(worst),
        }
    groups = {k: v for k, v in table["groups"].items() if v["share"] is not None and k != "unattributed"}
    if not groups:
        return None
    name = max(groups, key=lambda k: groups[k]["share"])
    finding, rec = _stage_finding(name, table["groups"], table, context)
    iros_side = {k: v for k, v in groups.items() if k not in UPSTREAM}
    out: dict[str, Any] = {
        "kind": "stage",
        "name": name,
        "share": groups[name]["share"],
        "mean_ms_per_request": groups[name]["mean_ms_per_request"],
        "finding": finding,
        "recommendation": rec,
    }
    if iros_side and name in UPSTREAM:
        inner = max(iros_side, key=lambda k: iros_side[k]["share"])
        f2, r2 = _stage_finding(inner, table["groups"], table, context)
        out["top_iros_stage"] = {
            "name": inner,
            "share": iros_side[inner]["share"],
            "finding": f2,
            "recommendation": r2,
        }
    return out


def _resource_finding(r: dict[str, Any]) -> str:
    if r["resource"] == "queue_growth":
        return (
            f"the queue grows by {r['slope_per_minute']} requests per minute (p={r['p_value']}), "
            f"{r['active_p95']} of {r['max_concurrency']} slots busy at p95"
        )
    return f"{r['resource']}: {r['metric']} p95 {r['p95']} against a threshold of {r['threshold']}"


def _resource_advice(r: dict[str, Any]) -> str:
    name, p95 = r["resource"], r["p95"] or 0.0
    if name == "process_cpu_saturation":
        # Each worker near 70% of its core leaves room for bursts.
        return (
            f"the process uses {p95:.0f}% of a core: run {math.ceil(p95 / 70)} workers (iros serve --workers)"
        )
    if name == "host_cpu_saturation":
        return f"the host CPU is at {p95:.0f}%: move the embedder or model server off this host, or add hosts"
    if name == "memory_pressure":
        return f"memory is {p95:.0f}% used: lower cache.max_memory_mb or add memory"
    if name == "event_loop_lag":
        return f"timers fire {p95:.1f} ms late at p95: move blocking work off the event loop or add workers"
    need = math.ceil((r["active_p95"] or 0) * 1.25) or 1
    slots = r["max_concurrency"]
    return f"load exceeds the {slots} slots: raise server.max_concurrency to {need} or add replicas"


async def analyse(
    store: MetricsStore, start: float, end: float, max_concurrency: int, cache_hit_rate: float | None = None
) -> dict[str, Any]:
    table = await stage_table(store, start, end)
    resources = await resource_table(store, start, end, max_concurrency)
    context = {"cache_hit_rate": cache_hit_rate, "max_concurrency": max_concurrency}
    top = (
        top_bottleneck(table, resources, context)
        if table["requests"] or any(r["saturated"] for r in resources)
        else None
    )
    return {
        "requests": table["requests"],
        "mean_total_ms": table["mean_total_ms"],
        "stages": table["stages"],
        "stage_groups": table["groups"],
        "resources": resources,
        "top_bottleneck": top,
        "findings": _findings(table, resources),
    }


def _findings(table: dict[str, Any], resources: list[dict[str, Any]]) -> list[str]:
    out = []
    ranked = sorted(
        ((k, v) for k, v in table["groups"].items() if v["share"]), key=lambda kv: -kv[1]["share"]
    )
    for name, g in ranked[:3]:
        out.append(f"{name}: {g['share']:.1%} of end-to-end time ({g['mean_ms_per_request']} ms per request)")
    for r in resources:
        if r["saturated"]:
            out.append(f"{r['resource']} is saturated (p95 {r['p95']}, threshold {r['threshold']})")
    if not table["requests"]:
        out.append("no requests in this window: nothing to attribute")
    return out
