"""Troubleshooting views: response time, models, optimizations, CPU, memory, GPU, each with findings.

Every figure is read from the metrics store over [start, end); every finding is a sentence built from
those figures, compared with the previous period of the same length where a trend is claimed.

out = await response_time(store, start, end, targets)
out["findings"]     # ["p95 is 2410 ms, over the 2000 ms target", "model slow: p95 ..."]
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from iros.analysis import bottlenecks
from iros.analysis.history import TREND_ALPHA, distribution, interval_values, rnd, trend, window_step
from iros.config import Target
from iros.core.errors import StoreUnavailable
from iros.metrics.store import MetricsStore

OK = (("outcome", "ok"),)
# The optimizer's comparison of its actions (Optimizer.compare), when there is an optimizer.
Audit = Callable[[], Awaitable[list[dict[str, Any]]]]


async def _labels(store: MetricsStore, metric: str, label: str, start: float, end: float) -> list[str]:
    try:
        return await store.label_values(metric, label, start, end)
    except StoreUnavailable:
        return []


async def _trend(
    store: MetricsStore,
    metric: str,
    start: float,
    end: float,
    match: tuple[tuple[str, str], ...] = (),
    lower_is_better: bool = True,
    stat: str = "avg",
) -> dict[str, Any]:
    span = end - start
    step = window_step(span, 200)
    now = [v for _, v in await interval_values(store, metric, start, end, step, match, stat)]
    before = [v for _, v in await interval_values(store, metric, start - span, start, step, match, stat)]
    return trend(now, before, lower_is_better)


async def response_time(
    store: MetricsStore, start: float, end: float, targets: dict[str, Target], max_concurrency: int
) -> dict[str, Any]:
    overall = await distribution(store, "response_time_ms", start, end, OK)
    by_model = {
        m: (await distribution(store, "response_time_ms", start, end, (("model", m), *OK))).json(1)
        for m in await _labels(store, "response_time_ms", "model", start, end)
    }
    by_cache = {
        c: (await distribution(store, "response_time_ms", start, end, (("cache", c), *OK))).json(1)
        for c in await _labels(store, "response_time_ms", "cache", start, end)
    }
    stages = await bottlenecks.stage_table(store, start, end)
    tr = await _trend(store, "response_time_ms", start, end, OK, stat="p95")
    findings = []
    target = targets.get("response_time_ms")
    if overall.count and overall.p95 is not None:
        if target is not None:
            verdict = "over" if overall.p95 > target.target else "within"
            findings.append(f"p95 is {overall.p95:.1f} ms, {verdict} the {target.target:g} ms target")
        slowest = max(
            (m for m in by_model if by_model[m]["p95"] is not None),
            key=lambda m: by_model[m]["p95"],
            default=None,
        )
        if slowest is not None and len(by_model) > 1:
            findings.append(f"slowest model is {slowest}: p95 {by_model[slowest]['p95']} ms")
        hits = [
            by_cache[c]["mean"] for c in by_cache if c.endswith("hit") and by_cache[c]["mean"] is not None
        ]
        miss = by_cache.get("miss", {}).get("mean")
        if hits and miss:
            findings.append(f"cache hits average {min(hits):.1f} ms against {miss:.1f} ms for misses")
        groups = {k: v for k, v in stages["groups"].items() if v["share"]}
        if groups:
            top = max(groups, key=lambda k: groups[k]["share"])
            findings.append(f"{top} takes the largest share of response time: {groups[top]['share']:.0%}")
        if tr["direction"] in ("improving", "degrading"):
            findings.append(
                f"p95 is {tr['direction']} against the previous period: median of intervals "
                f"{tr['previous_median']} -> {tr['current_median']} ms (p={tr['p_value']})"
            )
    else:
        findings.append("no answered requests in this window")
    return {
        "overall": overall.json(1),
        "target_ms": target.target if target else None,
        "by_model": by_model,
        "by_cache": by_cache,
        "stage_groups": stages["groups"],
        "trend": tr,
        "findings": findings,
    }


async def models(
    store: MetricsStore, start: float, end: float, accuracy: dict[str, float | None]
) -> dict[str, Any]:
    """Per model: traffic, errors, latency, time to first token, time per token, quality."""
    names = await _labels(store, "response_time_ms", "model", start, end)
    table: dict[str, dict[str, Any]] = {}
    for m in names:
        every = await distribution(store, "response_time_ms", start, end, (("model", m),))
        errors = await distribution(
            store, "response_time_ms", start, end, (("model", m), ("outcome", "server_error"))
        )
        ok = await distribution(store, "response_time_ms", start, end, (("model", m), *OK))
        ttft = await distribution(store, "ttft_ms", start, end, (("model", m),))
        tpot = await distribution(store, "tpot_ms", start, end, (("model", m),))
        tokens = await distribution(store, "completion_tokens", start, end, (("model", m),))
        relevance = await distribution(store, "relevance", start, end, (("model", m),))
        satisfaction = await distribution(store, "user_satisfaction", start, end, (("model", m),))
        table[m] = {
            "requests": every.count,
            "error_rate": rnd(errors.count / every.count if every.count else None, 5),
            "response_time_ms": ok.json(1),
            "ttft_ms": ttft.json(1),
            "tpot_ms": tpot.json(3),
            "output_tokens_per_second": rnd(tokens.sum / (ok.sum / 1000) if ok.sum else None, 2),
            "relevance": rnd(relevance.mean, 3),
            "user_satisfaction": rnd(satisfaction.mean, 3),
            "accuracy": accuracy.get(m),
        }
    return {"models": table, "findings": _model_findings(table)}


def _model_findings(table: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    timed = {
        m: t["response_time_ms"]["p50"] for m, t in table.items() if t["response_time_ms"]["p50"] is not None
    }
    if timed:
        fast, slow = min(timed, key=timed.__getitem__), max(timed, key=timed.__getitem__)
        out.append(f"fastest model is {fast} (p50 {timed[fast]} ms)")
        if slow != fast:
            out.append(
                f"slowest model is {slow} (p50 {timed[slow]} ms, {timed[slow] / max(timed[fast], 1e-9):.1f}x)"
            )
    failing = {m: t["error_rate"] for m, t in table.items() if t["error_rate"]}
    if failing:
        worst = max(failing, key=failing.__getitem__)
        out.append(f"{worst} fails most: {failing[worst]:.1%} of its requests end in a server error")
    if not table:
        out.append("no requests in this window")
    return out


async def compare_models(
    store: MetricsStore, start: float, end: float, accuracy: dict[str, float | None]
) -> dict[str, Any]:
    """Models side by side, each tested against the fastest one on per-interval median latency."""
    from scipy.stats import mannwhitneyu  # scipy loads on first use, not with every server start

    base = await models(store, start, end, accuracy)
    table = base["models"]
    step = window_step(end - start, 200)
    series = {
        m: [
            v
            for _, v in await interval_values(
                store, "response_time_ms", start, end, step, (("model", m), *OK), "p50"
            )
        ]
        for m in table
    }
    timed = {
        m: t["response_time_ms"]["p50"] for m, t in table.items() if t["response_time_ms"]["p50"] is not None
    }
    ranking = sorted(timed, key=timed.__getitem__)
    comparisons = []
    if ranking:
        fastest = ranking[0]
        for m in ranking[1:]:
            a, b = series[m], series[fastest]
            p = None
            if len(a) >= 3 and len(b) >= 3 and np.ptp(a + b) > 0:
                p = float(mannwhitneyu(a, b, alternative="two-sided").pvalue)
            comparisons.append(
                {
                    "model": m,
                    "against": fastest,
                    "p50_ratio": rnd(timed[m] / timed[fastest] if timed[fastest] else None, 3),
                    "p_value": rnd(p, 6),
                    "significant": p is not None and p < TREND_ALPHA,
                    "intervals": [len(a), len(b)],
                }
            )
    # Accuracy per second of latency: the trade-off routing weighs.
    value = {m: t["accuracy"] / (timed[m] / 1000) for m, t in table.items() if t["accuracy"] and timed.get(m)}
    return {
        "models": table,
        "ranking_by_p50": ranking,
        "comparisons": comparisons,
        "best_accuracy_per_second": max(value, key=value.__getitem__) if value else None,
        "findings": base["findings"],
    }


async def optimizations(
    store: MetricsStore, start: float, end: float, audit: Audit | None = None
) -> dict[str, Any]:
    """What each optimization measurably did: cache hits, failover and retries, streaming."""
    hit = await distribution(store, "response_time_ms", start, end, (("cache", "hit"), *OK))
    semantic = await distribution(store, "response_time_ms", start, end, (("cache", "semantic_hit"), *OK))
    miss = await distribution(store, "response_time_ms", start, end, (("cache", "miss"), *OK))
    retry = await distribution(store, "stage_ms", start, end, (("stage", "retry"),))
    requests = await distribution(store, "stage_ms", start, end, (("stage", "other"),))
    ttft = await distribution(store, "ttft_ms", start, end)
    served = hit.count + semantic.count
    saved = (miss.mean - (hit.sum + semantic.sum) / served) * served if served and miss.mean else None
    findings = []
    if served:
        findings.append(
            f"{served} answers came from the cache ({served / max(served + miss.count, 1):.0%} of lookups), "
            + (
                f"saving about {saved / 1000:.1f} s of model time"
                if saved
                else "with no miss to compare against"
            )
        )
    if retry.count:
        findings.append(
            f"{retry.count} requests ({retry.count / max(requests.count, 1):.1%}) needed a retry or "
            "failover, "
            f"waiting {retry.mean or 0:.1f} ms on average in backoff"
        )
    if ttft.count:
        findings.append(f"streamed answers showed their first token after {ttft.p50 or 0:.1f} ms at p50")
    if not findings:
        findings.append("no optimization took effect in this window")
    out: dict[str, Any] = {
        "cache": {
            "exact_hits": hit.json(1),
            "semantic_hits": semantic.json(1),
            "misses": miss.json(1),
            "model_time_saved_seconds": rnd(saved / 1000 if saved else None, 3),
        },
        "retries": {"requests": retry.count, "backoff_ms": retry.json(1)},
        "streaming": {"ttft_ms": ttft.json(1)},
        "findings": findings,
        "optimizer_audit": None,
    }
    if audit is not None:
        out["optimizer_audit"] = await audit()
    return out


async def cpu(store: MetricsStore, start: float, end: float, targets: dict[str, Target]) -> dict[str, Any]:
    from scipy.stats import pearsonr

    host = await distribution(store, "cpu_percent", start, end)
    proc = await distribution(store, "process_cpu_percent", start, end)
    usage = await distribution(store, "cpu_usage_percent", start, end)
    per_response = await distribution(store, "cpu_per_response_percent", start, end)
    step = window_step(end - start, 300)
    load = dict(await interval_values(store, "process_cpu_percent", start, end, step))
    rate = dict(await interval_values(store, "response_time_ms", start, end, step, (), "count"))
    common = sorted(set(load) & set(rate))
    corr = None
    if len(common) >= 3 and np.ptp([load[t] for t in common]) > 0 and np.ptp([rate[t] for t in common]) > 0:
        corr = float(pearsonr([rate[t] for t in common], [load[t] for t in common]).statistic)
    peak_at = max(load, key=load.__getitem__) if load else None
    tr = await _trend(store, "process_cpu_percent", start, end)
    findings = []
    target = targets.get("cpu_usage_percent")
    if usage.mean is not None and target is not None:
        verdict = "over" if usage.mean > target.target else "within"
        findings.append(
            f"Iros used {usage.mean:.2f}% of the machine's CPU on average, "
            f"{verdict} the {target.target:g}% target"
        )
    if per_response.mean is not None:
        findings.append(f"CPU time per response averages {per_response.mean:.2f}% of its response time")
    if proc.p95 is not None:
        findings.append(f"the Iros process used {proc.p95:.1f}% of a core at p95 (host {host.p95 or 0:.1f}%)")
    if corr is not None:
        kind = "follows request rate" if corr > 0.5 else "is not driven by request rate"
        findings.append(f"process CPU {kind} (Pearson r={corr:.2f} over {len(common)} intervals)")
    if tr["direction"] in ("improving", "degrading"):
        findings.append(f"process CPU is {tr['direction']} against the previous period (p={tr['p_value']})")
    if not findings:
        findings.append("no CPU samples in this window")
    return {
        "host_cpu_percent": host.json(2),
        "process_cpu_percent": proc.json(2),
        "cpu_usage_percent": usage.json(3),
        "cpu_per_response_percent": per_response.json(3),
        "load_correlation": rnd(corr, 3),
        "peak_interval": peak_at,
        "trend": tr,
        "findings": findings,
    }


async def memory(store: MetricsStore, start: float, end: float) -> dict[str, Any]:
    from scipy.stats import linregress

    host = await distribution(store, "memory_percent", start, end)
    rss = await distribution(store, "process_memory_bytes", start, end)
    step = window_step(end - start, 300)
    series = await interval_values(store, "process_memory_bytes", start, end, step)
    slope = p = None
    if len(series) >= 3 and np.ptp([v for _, v in series]) > 0:
        fit = linregress([t for t, _ in series], [v for _, v in series])
        slope, p = float(fit.slope) * 3600 / 2**20, float(fit.pvalue)  # MiB per hour
    findings = []
    if rss.count and rss.mean is not None and rss.max is not None:
        findings.append(
            f"Iros resident memory {rss.mean / 2**20:.0f} MiB on average, {rss.max / 2**20:.0f} MiB at most"
        )
    if host.p95 is not None:
        findings.append(f"host memory {host.p95:.1f}% used at p95")
    if slope is not None and p is not None and p < TREND_ALPHA and slope > 0:
        findings.append(
            f"resident memory grows {slope:.2f} MiB per hour (p={p:.3g}): watch for a leak or cache growth"
        )
    elif slope is not None:
        findings.append(f"resident memory is flat ({slope:+.2f} MiB per hour, p={p:.3g})")
    if not findings:
        findings.append("no memory samples in this window")
    return {
        "host_memory_percent": host.json(2),
        "process_memory_mib": {
            k: rnd(v / 2**20, 1) if isinstance(v, float) else v for k, v in rss.json().items()
        },
        "growth_mib_per_hour": rnd(slope, 3),
        "growth_p_value": rnd(p, 6),
        "findings": findings,
    }


async def gpu(store: MetricsStore, start: float, end: float, status: str) -> dict[str, Any]:
    gpus = await _labels(store, "gpu_utilization_percent", "gpu", start, end)
    table = {}
    for g in gpus:
        util = await distribution(store, "gpu_utilization_percent", start, end, (("gpu", g),))
        mem = await distribution(store, "gpu_memory_percent", start, end, (("gpu", g),))
        table[g] = {"utilization_percent": util.json(2), "memory_percent": mem.json(2)}
    findings = []
    for g, t in table.items():
        u, m = t["utilization_percent"], t["memory_percent"]
        findings.append(
            f"GPU {g}: {u['mean']}% busy on average ({u['p95']}% p95), memory {m['max']}% at most"
        )
    if not table:
        findings.append(f"no GPU samples in this window (NVML status: {status})")
    return {"available": bool(table), "nvml_status": status, "gpus": table, "findings": findings}
