"""PromQL twins of what Iros computes itself: the live KPIs, windowed functions over catalog series, and
whole parsed conditions (arithmetic, comparisons, and/or/not; `not` pushed into the comparisons, since
PromQL has no boolean not), over the metrics Iros exposes at /metrics (names from catalog.py).

kpi_promql("error_rate", "5m")          # the KPI over the last five minutes
to_promql(parse_condition("cache_hit_rate < 0.5").tree)

What has no twin (a maximum over a histogram, feedback counts) raises Untranslatable with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from iros.conditions import parse as cond
from iros.core.timefmt import format_duration
from iros.metrics.catalog import METRICS

RT = "iros_request_duration_seconds"
HITS = "hit|exact_hit|semantic_hit"
LIVE_WINDOW = "1m"  # bare KPIs read the live report's default window


class Untranslatable(Exception):
    """A condition part with no PromQL twin; the message says which and why."""


# --- PromQL building blocks -------------------------------------------------------------------------
def _selector(labels: Mapping[str, str | tuple[str, ...]]) -> str:
    parts = []
    for k, v in sorted(labels.items()):
        if isinstance(v, tuple):
            parts.append(f'{k}=~"{"|".join(v)}"')
        elif v.startswith("!"):
            parts.append(f'{k}!="{v[1:]}"')
        else:
            parts.append(f'{k}="{v}"')
    return "{" + ",".join(parts) + "}" if parts else ""


def _scaled(expr: str, scale: float) -> str:
    return expr if scale == 1 else f"{scale:g} * {expr}"


def hist_avg(prom: str, labels: Mapping[str, Any], window: str, scale: float = 1.0) -> str:
    sel = _selector(labels)
    return _scaled(f"(sum(rate({prom}_sum{sel}[{window}])) / sum(rate({prom}_count{sel}[{window}])))", scale)


def hist_quantile(prom: str, q: float, labels: Mapping[str, Any], window: str, scale: float = 1.0) -> str:
    sel = _selector(labels)
    return _scaled(f"histogram_quantile({q:g}, sum by (le) (rate({prom}_bucket{sel}[{window}])))", scale)


def hist_rate(prom: str, labels: Mapping[str, Any], window: str) -> str:
    return f"sum(rate({prom}_count{_selector(labels)}[{window}]))"


def _ratio(part: str, whole: str) -> str:
    return f"({part} / {whole})"


def kpi_promql(name: str, window: str = LIVE_WINDOW) -> str:
    """The PromQL twin of a live KPI (kpi.flatten's names), in the KPI's own unit."""
    ok = {"outcome": "ok"}
    m = METRICS
    fixed: dict[str, str] = {
        "count": f"sum(increase({RT}_count[{window}]))",
        "throughput_rps": hist_rate(RT, {}, window),
        "response_time_avg": hist_avg(RT, ok, window, 1000),
        "cpu_usage_avg": f"sum(avg_over_time({m['cpu_usage_percent'].prom}[{window}]))",
        "cpu_per_response_avg": hist_avg(m["cpu_per_response_percent"].prom, {}, window),
        "error_rate": _ratio(hist_rate(RT, {"outcome": "!ok"}, window), hist_rate(RT, {}, window)),
        "availability": "(1 - "
        + _ratio(hist_rate(RT, {"outcome": "server_error"}, window), hist_rate(RT, {}, window))
        + ")",
        "cache_hit_rate": _ratio(
            hist_rate(RT, {"cache": tuple(HITS.split("|"))}, window),
            hist_rate(RT, {"cache": (*HITS.split("|"), "miss")}, window),
        ),
        "ttft_avg_ms": hist_avg(m["ttft_ms"].prom, {}, window, 1000),
        "tpot_avg_ms": hist_avg(m["tpot_ms"].prom, {}, window, 1000),
        "overhead_avg_ms": hist_avg(m["overhead_ms"].prom, {}, window, 1000),
        "gpu_utilization": f"avg({m['gpu_utilization_percent'].prom})",
        # Gauges the cache's verification exposes at scrape time (cache/exposition.py).
        "cache_false_hit_rate_upper": 'max(iros_cache_false_hit_rate{bound="upper"})',
        "cache_max_false_hit_rate": "max(iros_cache_max_false_hit_rate)",
    }
    if name in fixed:
        return fixed[name]
    for prefix, metric, labels in (
        ("response_time_", "response_time_ms", ok),
        ("ttft_", "ttft_ms", {}),
        ("tpot_", "tpot_ms", {}),
        ("overhead_", "overhead_ms", {}),
    ):
        rest = name.removeprefix(prefix).removesuffix("_ms")
        if name.startswith(prefix) and rest[:1] == "p" and rest[1:].isdigit():
            q = int(rest[1:]) / 100
            return hist_quantile(m[metric].prom, q, labels, window, m[metric].scale)
    if name in m and m[name].kind == "gauge":
        return _scaled(f"max({m[name].prom})", 1 / m[name].scale)
    raise Untranslatable(f"the KPI {name!r} has no PromQL twin")


def promql_duration(seconds: float) -> str:
    return format_duration(seconds)


def window_promql(ref: cond.WindowRef) -> str:
    metric, match = ref.query()
    d = METRICS[metric]
    labels: dict[str, Any] = dict(match)
    w = promql_duration(ref.seconds)
    f = ref.func
    if d.kind == "response":
        if f == "avg":
            return hist_avg(d.prom, labels, w, d.scale)
        if f == "rate":
            return hist_rate(d.prom, labels, w)
        if f == "count":
            return f"sum(increase({d.prom}_count{_selector(labels)}[{w}]))"
        if f == "sum":
            return _scaled(f"sum(increase({d.prom}_sum{_selector(labels)}[{w}]))", d.scale)
        if f.startswith("p"):
            return hist_quantile(d.prom, int(f[1:]) / (1000 if len(f) == 4 else 100), labels, w, d.scale)
        raise Untranslatable(f"{ref.text()}: a histogram keeps no {f}")
    sel = f"{d.prom}{_selector(labels)}[{w}]"
    over = {"avg": "avg_over_time", "min": "min_over_time", "max": "max_over_time"}
    if f in over:
        return _scaled(f"max({over[f]}({sel}))", 1 / d.scale)
    if f.startswith("p"):
        q = int(f[1:]) / (1000 if len(f) == 4 else 100)
        return _scaled(f"max(quantile_over_time({q:g}, {sel}))", 1 / d.scale)
    raise Untranslatable(f"{ref.text()}: {f} of a gauge has no meaning")


_NEGATE = {">": "<=", ">=": "<", "<": ">=", "<=": ">", "==": "!=", "!=": "=="}


def to_promql(node: Any, negate: bool = False, window: str = LIVE_WINDOW) -> str:
    """A condition tree (conditions.parse_condition(...).tree) as one PromQL expression."""
    if isinstance(node, cond.Number):
        return f"{node.value:g}"
    if isinstance(node, cond.KpiRef):
        return kpi_promql(node.name, window)
    if isinstance(node, cond.WindowRef):
        return window_promql(node)
    if isinstance(node, cond.Arith):
        return f"({to_promql(node.left, window=window)} {node.op} {to_promql(node.right, window=window)})"
    if isinstance(node, cond.Compare):
        op = _NEGATE[node.op] if negate else node.op
        return f"{to_promql(node.left, window=window)} {op} {to_promql(node.right, window=window)}"
    if isinstance(node, cond.Logic):
        op = {"and": "or", "or": "and"}[node.op] if negate else node.op
        return "(" + f" {op} ".join(to_promql(i, negate, window) for i in node.items) + ")"
    if isinstance(node, cond.Not):
        return to_promql(node.item, not negate, window)
    raise Untranslatable(f"{type(node).__name__} has no PromQL twin")
