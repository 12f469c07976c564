"""Exports for a Prometheus + Grafana stack: the dashboard's panels and the alert rules, over the metrics
Iros exposes at /metrics (names from catalog.py).

    iros export grafana -o iros-dashboard.json        # import in Grafana, pick the Prometheus data source
    iros export prometheus-rules -o iros-rules.yml    # rule_files: in prometheus.yml; promtool check rules

An alert rule translates when every part of its condition has a PromQL twin: the live KPIs over the
last minute, windowed functions over catalog series, arithmetic, comparisons, and/or/not. What has no
twin (a maximum over a histogram, feedback counts) is listed as skipped with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from iros import conditions as cond
from iros.alert_rules import build_rules, configured_rules, rules_as_data
from iros.catalog import METRICS
from iros.config import Settings

DS = {"type": "prometheus", "uid": "${datasource}"}
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
        "cpu_usage_avg": hist_avg(m["cpu_usage_percent"].prom, {}, window),
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


def _window(seconds: float) -> str:
    return cond.format_duration(seconds).replace(" ", "")


def window_promql(ref: cond.WindowRef) -> str:
    metric, match = ref.query()
    d = METRICS[metric]
    labels: dict[str, Any] = dict(match)
    w = _window(ref.seconds)
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


# --- alert rules --------------------------------------------------------------------------------------
def _rule_dicts(settings: Settings) -> list[dict[str, Any]]:
    """The rules the alert engine would run with this configuration: target rules, alert_rules and the
    live_alerting block, built by the engine's own code so the export never disagrees with it."""
    if not settings.alerting.enabled:
        return []
    rules = build_rules(settings.alerting, settings.performance_targets, None, configured_rules(settings))
    return rules_as_data(rules)


def prometheus_rules(settings: Settings) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """(the rule file, the rules skipped with why)."""
    rules: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    seen: set[str] = set()
    window = _window(settings.alerting.kpi_window_seconds)
    for rule in _rule_dicts(settings):
        name = str(rule.get("name", "unnamed"))
        if name in seen:
            continue
        seen.add(name)
        try:
            parsed = cond.parse_condition(str(rule["condition"]))
            expr = to_promql(parsed.tree, window=window)
        except (Untranslatable, cond.ConditionError, KeyError) as exc:
            skipped.append({"name": name, "reason": str(exc)})
            continue
        seconds = parsed.for_seconds
        if rule.get("duration") is not None:
            seconds = max(seconds, cond.parse_duration(rule["duration"]))
        out: dict[str, Any] = {"alert": name, "expr": expr}
        if seconds:
            out["for"] = _window(seconds)
        out["labels"] = {"severity": str(rule.get("severity", "warning")), "source": "iros"}
        out["annotations"] = {
            "summary": f"{name}: {rule['condition']}",
            "description": f"Iros rule {name} ({rule['condition']}); value {{{{ $value }}}}",
        }
        rules.append(out)
    return {"groups": [{"name": "iros", "rules": rules}]}, skipped


# --- Grafana ------------------------------------------------------------------------------------------
def _target(expr: str, legend: str, ref: str = "A", **extra: Any) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, **extra}


def _thresholds(target: Any, higher_is_worse: bool, scale: float = 1.0) -> dict[str, Any]:
    warn, crit = target.warning_threshold * scale, target.critical_threshold * scale
    if higher_is_worse:
        steps = [
            {"color": "green", "value": None},
            {"color": "orange", "value": warn},
            {"color": "red", "value": crit},
        ]
    else:
        steps = [
            {"color": "red", "value": None},
            {"color": "orange", "value": crit},
            {"color": "green", "value": warn},
        ]
    return {"mode": "absolute", "steps": steps}


class _Grid:
    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0
        self.row_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(self._panel("row", title, 24, 1, collapsed=False, panels=[]))
        self.y += 1

    def add(self, kind: str, title: str, w: int, h: int, **extra: Any) -> None:
        if self.x + w > 24:
            self._newline()
        panel = self._panel(kind, title, w, h, datasource=DS, **extra)
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def _newline(self) -> None:
        self.y += self.row_h
        self.x, self.row_h = 0, 0

    def _panel(self, kind: str, title: str, w: int, h: int, **extra: Any) -> dict[str, Any]:
        return {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "gridPos": {"x": self.x, "y": self.y, "w": w, "h": h},
            **extra,
        }


def _unit(unit: str, thresholds: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, **extra}
    if thresholds:
        defaults["thresholds"] = thresholds
        defaults["color"] = {"mode": "thresholds"}
    return {"defaults": defaults, "overrides": []}


def grafana_dashboard(settings: Settings) -> dict[str, Any]:
    """The dashboard's panels as a Grafana dashboard over Iros's Prometheus metrics."""
    t = settings.performance_targets
    g = _Grid()
    w = "$__rate_interval"
    rt_avg, cpu_avg = kpi_promql("response_time_avg", "5m"), kpi_promql("cpu_usage_avg", "5m")
    hit, err = kpi_promql("cache_hit_rate", "5m"), kpi_promql("error_rate", "5m")

    g.row("System overview")
    g.add(
        "stat",
        "Average Response Time",
        6,
        5,
        targets=[_target(rt_avg, "avg")],
        fieldConfig=_unit("ms", _thresholds(t["response_time_ms"], True)),
        description=f"target {t['response_time_ms'].target:g} ms",
    )
    g.add(
        "stat",
        "CPU Usage",
        6,
        5,
        targets=[_target(cpu_avg, "cpu")],
        fieldConfig=_unit("percent", _thresholds(t["cpu_usage_percent"], True)),
        description=f"CPU per response; target {t['cpu_usage_percent'].target:g} %",
    )
    g.add(
        "stat",
        "Cache Hit Rate",
        6,
        5,
        targets=[_target(f"100 * {hit}", "hit rate")],
        fieldConfig=_unit("percent", _thresholds(t["cache_hit_rate"], False, 100)),
        description=f"target {t['cache_hit_rate'].target * 100:g} %",
    )
    levels = []
    for i, (expr, target, worse) in enumerate(
        (
            (rt_avg, t["response_time_ms"], True),
            (cpu_avg, t["cpu_usage_percent"], True),
            (hit, t["cache_hit_rate"], False),
            (err, t["error_rate"], True),
        )
    ):
        cmp = ">=" if worse else "<="
        warn, crit = target.warning_threshold, target.critical_threshold
        level = f"(({expr} {cmp} bool {warn:g}) + ({expr} {cmp} bool {crit:g}))"
        levels.append(f'label_replace({level}, "kpi", "{i}", "", "")')
    health_map = [
        {
            "type": "value",
            "options": {
                "0": {"text": "healthy", "color": "green"},
                "1": {"text": "degraded", "color": "orange"},
                "2": {"text": "critical", "color": "red"},
            },
        }
    ]
    g.add(
        "stat",
        "System Health",
        6,
        5,
        targets=[_target(f"max({' or '.join(levels)})", "health")],
        fieldConfig=_unit("none", None, mappings=health_map, noValue="no data"),
    )

    g.row("Response performance")
    g.add(
        "timeseries",
        "Response Time Trend",
        16,
        8,
        timeFrom="24h",
        targets=[
            _target(hist_quantile(RT, q, {"outcome": "ok"}, w, 1000), f"p{round(q * 100)}", chr(65 + i))
            for i, q in enumerate((0.5, 0.95, 0.99))
        ],
        fieldConfig=_unit("ms"),
    )
    buckets = _target(
        f'sum by (le) (increase({RT}_bucket{{outcome="ok",le=~"0.5|1.0|2.0|5.0|10.0|\\\\+Inf"}}[$__range]))',
        "{{le}}",
        format="heatmap",
        instant=True,
    )
    g.add(
        "bargauge",
        "Response Time Distribution",
        8,
        8,
        targets=[buckets],
        description="cumulative responses at or under 500, 1000, 2000, 5000, 10000 ms and all",
        fieldConfig=_unit("short"),
        options={"displayMode": "basic", "orientation": "horizontal"},
    )

    g.row("Resource utilisation")
    g.add(
        "timeseries",
        "CPU and Memory Usage",
        16,
        8,
        timeFrom="1h",
        fieldConfig=_unit("percent"),
        targets=[
            _target(f"max({METRICS['cpu_percent'].prom})", "cpu", "A"),
            _target(f"max({METRICS['memory_percent'].prom})", "memory", "B"),
        ],
    )
    g.add(
        "gauge",
        "GPU Utilization",
        8,
        8,
        targets=[_target(kpi_promql("gpu_utilization"), "gpu")],
        fieldConfig=_unit("percent", None, min=0, max=100, noValue="no GPU"),
    )

    g.row("Throughput, errors and time to first token")
    g.add(
        "timeseries",
        "Throughput",
        8,
        7,
        fieldConfig=_unit("reqps"),
        targets=[_target(hist_rate(RT, {}, w), "requests/s")],
    )
    g.add(
        "timeseries",
        "Error rate",
        8,
        7,
        fieldConfig=_unit("percentunit"),
        targets=[_target(kpi_promql("error_rate", w), "error rate")],
    )
    ttft = METRICS["ttft_ms"]
    g.add(
        "timeseries",
        "Time to first token",
        8,
        7,
        fieldConfig=_unit("ms"),
        targets=[
            _target(hist_quantile(ttft.prom, q, {}, w, 1000), f"p{round(q * 100)}", chr(65 + i))
            for i, q in enumerate((0.5, 0.95))
        ],
    )

    g.row("Alerts, models and cache")
    g.add(
        "alertlist",
        "Active alerts",
        8,
        8,
        options={
            "stateFilter": {"firing": True, "pending": True},
            "alertInstanceLabelFilter": 'source="iros"',
        },
    )
    g.add(
        "table",
        "Model comparison",
        8,
        8,
        fieldConfig=_unit("short"),
        targets=[
            _target(
                "1000 * histogram_quantile(0.95, sum by (le, model) "
                f'(rate({RT}_bucket{{outcome="ok"}}[5m])))',
                "{{model}}",
                "A",
                instant=True,
                format="table",
            ),
            _target(f"sum by (model) (rate({RT}_count[5m]))", "{{model}}", "B", instant=True, format="table"),
        ],
        transformations=[{"id": "merge", "options": {}}],
    )
    g.add(
        "timeseries",
        "Cache efficiency",
        8,
        8,
        fieldConfig=_unit("short"),
        targets=[
            _target(f"sum by (kind) (rate(iros_cache_hits_total[{w}]))", "hits {{kind}}", "A"),
            _target(f"sum(rate(iros_cache_misses_total[{w}]))", "misses", "B"),
        ],
    )
    g._newline()
    return {
        "title": "Iros optimization",
        "uid": "iros-optimization",
        "tags": ["iros"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-24h", "to": "now"},
        "timepicker": {"refresh_intervals": ["5s", "10s", "30s", "1m"]},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                }
            ]
        },
        "annotations": {"list": []},
        "panels": g.panels,
    }
