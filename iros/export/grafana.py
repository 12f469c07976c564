"""The dashboard's panels as a Grafana dashboard, over the metrics Iros exposes at /metrics.

iros export grafana -o iros-dashboard.json        # import in Grafana, pick the Prometheus data source
"""

from __future__ import annotations

from typing import Any

from iros.config import Settings, Target
from iros.export.promql import RT, hist_quantile, hist_rate, kpi_promql
from iros.metrics.catalog import METRICS

DS = {"type": "prometheus", "uid": "${datasource}"}


def _target(expr: str, legend: str, ref: str = "A", **extra: Any) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, **extra}


def _thresholds(target: Target, higher_is_worse: bool, scale: float = 1.0) -> dict[str, Any]:
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
        description=f"Iros's CPU, share of the machine; target {t['cpu_usage_percent'].target:g} %",
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
