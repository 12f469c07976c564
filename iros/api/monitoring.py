"""The dashboard's data (admin key): its layout, the seed's three panels filled in their shapes, and the
traffic panel.

GET /api/monitoring/dashboard/layout                which panels the page draws and the API each calls
GET /api/monitoring/dashboard/overview              metric cards and health
GET /api/monitoring/dashboard/performance?range=24h the response-time trend and distribution
GET /api/monitoring/dashboard/resources?range=1h    CPU, memory and GPU
GET /api/monitoring/dashboard/traffic?range=1h      throughput, error rate and time to first token

Ranges are the dashboard's named ranges (iros.core.timefmt.RANGES). A panel with a `source` is drawn from
that endpoint's widget JSON ({panel id: {"widgets"|"charts": [...]}} in the seed's shape); a panel with
`widgets` lists widgets that each call their own API.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iros.api.base import MonitorAPI
from iros.api.params import SEED_BUCKETS, auto_step, query_points, range_param
from iros.core.errors import IrosError, StoreUnavailable
from iros.core.timefmt import iso
from iros.gateway.auth import KeyRing
from iros.metrics import kpi
from iros.metrics.monitor import Monitor
from iros.metrics.store import Point, Query

TIME_RANGES = ("1h", "1d", "1w", "1m")


def layout(live_interval: float, cache: bool) -> dict[str, Any]:
    """The page's panels in display order."""
    analysis: list[dict[str, Any]] = [
        {
            "type": "recommendation_list",
            "title": "Recommendations",
            "sources": ["/api/analysis/capacity/recommendations", "/api/analysis/bottlenecks"],
        },
        {"type": "model_table", "title": "Model comparison", "source": "/api/analysis/compare/models"},
        {"type": "cost_table", "title": "Cost", "source": "/api/analysis/costs?group_by=key&window=30d"},
    ]
    if cache:
        analysis.append(
            {
                "type": "cache_efficiency",
                "title": "Cache efficiency",
                "source": "/api/analysis/cache/efficiency",
            }
        )
    return {
        "title": "Iros optimization dashboard",
        "time_ranges": list(TIME_RANGES),
        "live": {"websocket": "/ws/metrics", "interval_seconds": live_interval},
        "panels": [
            {
                "id": "system_overview",
                "title": "System overview",
                "source": "/api/monitoring/dashboard/overview",
                "ranged": False,
            },
            {
                "id": "response_performance",
                "title": "Response performance",
                "source": "/api/monitoring/dashboard/performance",
                "ranged": True,
                "default_range": "1d",
            },
            {
                "id": "resource_utilization",
                "title": "Resource utilisation",
                "source": "/api/monitoring/dashboard/resources",
                "ranged": True,
                "default_range": "1h",
            },
            {
                "id": "traffic",
                "title": "Throughput, errors and time to first token",
                "source": "/api/monitoring/dashboard/traffic",
                "ranged": True,
                "default_range": "1h",
            },
            {
                "id": "operations",
                "title": "Alerts and optimization",
                "widgets": [
                    {
                        "type": "alert_list",
                        "title": "Active alerts",
                        "source": "/api/alerts/active",
                        "actions": {
                            "acknowledge": "/api/alerts/{alert_id}/acknowledge",
                            "silence": "/api/alerts/{alert_id}/silence",
                        },
                    },
                    {
                        "type": "action_list",
                        "title": "Recent optimization actions",
                        "source": "/api/analysis/compare/optimizations",
                        "rules": "/api/optimization/rules",
                    },
                ],
            },
            {"id": "analysis", "title": "Analysis", "widgets": analysis},
        ],
    }


def _value(p: Point, attr: str) -> float | None:
    if attr.startswith("p"):
        return p.quantiles.get(int(attr[1:]) / 100)
    value: float | None = getattr(p, attr)
    return value


def _series(points: list[Point], attr: str, scale: float = 1.0) -> list[list[Any]]:
    out: list[list[Any]] = []
    for p in points:
        v = _value(p, attr) if p.count else None
        out.append([iso(p.ts), None if v is None else round(v * scale, 4)])
    return out


class MonitoringAPI(MonitorAPI):
    def __init__(self, monitor: Monitor, keyring: KeyRing, cache: bool) -> None:
        super().__init__(monitor, keyring)
        self.cache = cache

    def routes(self) -> list[BaseRoute]:
        get = ["GET"]
        return [
            Route("/api/monitoring/dashboard/layout", self.layout, methods=get),
            Route("/api/monitoring/dashboard/overview", self.dashboard_overview, methods=get),
            Route("/api/monitoring/dashboard/performance", self.dashboard_performance, methods=get),
            Route("/api/monitoring/dashboard/resources", self.dashboard_resources, methods=get),
            Route("/api/monitoring/dashboard/traffic", self.traffic, methods=get),
        ]

    # --- the seed's three panels, filled ----------------------------------------------------------

    async def dashboard_overview(self, request: Request) -> Response:
        self._admin(request)
        report = self.monitor.current(300.0)
        flat = {**kpi.flatten(report), "system_health_status": report["status"]}
        targets = self.monitor.settings.performance_targets
        widgets = []
        for title, metric, fmt, target_name, scale in (
            ("Average Response Time", "response_time_avg", "milliseconds", "response_time_ms", 1.0),
            ("CPU Usage", "cpu_usage_avg", "percentage", "cpu_usage_percent", 1.0),
            ("Cache Hit Rate", "cache_hit_rate", "percentage", "cache_hit_rate", 100.0),
        ):
            target = targets.get(target_name)
            value = flat.get(metric)
            widgets.append(
                {
                    "type": "metric_card",
                    "title": title,
                    "metric": metric,
                    "format": fmt,
                    "target": target.target * scale if target else None,
                    "warning_threshold": target.warning_threshold * scale if target else None,
                    "critical_threshold": target.critical_threshold * scale if target else None,
                    "value": None if value is None else round(value * scale, 3),
                    "level": report["kpis"].get(target_name, {}).get("level", "no_data"),
                }
            )
        widgets.append(
            {
                "type": "status_indicator",
                "title": "System Health",
                "metric": "system_health_status",
                "value": report["status"],
                "kpis": report["kpis"],
            }
        )
        return JSONResponse({"system_overview": {"widgets": widgets}, "timestamp": report["timestamp"]})

    async def dashboard_performance(self, request: Request) -> Response:
        self._admin(request)
        name, span = range_param(request, "24h")
        end = time.time()
        start = end - span
        step = auto_step(span)
        points = await query_points(
            self.monitor.store, "response_time_ms", start, end, step, {"outcome": "ok"}
        )
        distribution = await self._distribution(start, end)
        return JSONResponse(
            {
                "response_performance": {
                    "charts": [
                        {
                            "type": "time_series",
                            "title": "Response Time Trend",
                            "metrics": ["response_time_p50", "response_time_p95", "response_time_p99"],
                            "time_range": name,
                            "step_seconds": step,
                            "series": {
                                f"response_time_{q}": [[p["timestamp"], p[q]] for p in points]
                                for q in ("p50", "p95", "p99")
                            },
                        },
                        {
                            "type": "histogram",
                            "title": "Response Time Distribution",
                            "metric": "response_time_distribution",
                            "buckets": list(SEED_BUCKETS),
                            "time_range": name,
                            **distribution,
                        },
                    ]
                }
            }
        )

    async def _distribution(self, start: float, end: float) -> dict[str, Any]:
        """Counts per seed bucket, read off the store's quantiles (2% rank resolution), summed over
        windows."""
        qs = tuple(i / 50 for i in range(51))
        step = auto_step(end - start)
        query = Query("response_time_ms", start, end, step, (("outcome", "ok"),), qs)
        try:
            points = await self.monitor.store.query(query)
        except StoreUnavailable as exc:
            raise IrosError(503, f"metric history is unavailable: {exc}", code="store_unavailable") from None
        edges = (*SEED_BUCKETS[1:], math.inf)
        counts = [0.0] * len(edges)
        for p in points:
            values = [v for v in (p.quantiles.get(q) for q in qs) if v is not None]
            if not values:
                continue
            below = 0.0
            for i, edge in enumerate(edges):
                share = sum(1 for v in values if v <= edge) / len(values)
                counts[i] += p.count * share - below
                below = p.count * share
        labels = [f"{lo}-{hi}" for lo, hi in itertools.pairwise(SEED_BUCKETS)]
        labels.append(f"{SEED_BUCKETS[-1]}+")
        return {"labels": labels, "counts": [round(c) for c in counts], "unit": "ms"}

    async def dashboard_resources(self, request: Request) -> Response:
        self._admin(request)
        name, span = range_param(request, "1h")
        end = time.time()
        start = end - span
        step = auto_step(span)
        cpu, memory = await asyncio.gather(
            query_points(self.monitor.store, "cpu_percent", start, end, step, {}),
            query_points(self.monitor.store, "memory_percent", start, end, step, {}),
        )
        sample = self.monitor.sampler.latest
        gpu = sample.gpu_utilization if sample else None
        return JSONResponse(
            {
                "resource_utilization": {
                    "charts": [
                        {
                            "type": "multi_line",
                            "title": "CPU and Memory Usage",
                            "metrics": ["cpu_usage", "memory_usage"],
                            "time_range": name,
                            "step_seconds": step,
                            "series": {
                                "cpu_usage": [[p["timestamp"], p["avg"]] for p in cpu],
                                "memory_usage": [[p["timestamp"], p["avg"]] for p in memory],
                            },
                        },
                        {
                            "type": "gauge",
                            "title": "GPU Utilization",
                            "metric": "gpu_utilization",
                            "max_value": 100,
                            "value": gpu,
                            "available": gpu is not None,
                            "label": None if gpu is not None else "no GPU",
                            "gpus": [g["index"] for g in (sample.to_json()["gpus"] if sample else [])],
                        },
                    ]
                }
            }
        )

    async def layout(self, request: Request) -> Response:
        self._admin(request)
        return JSONResponse(layout(self.monitor.metrics.live_interval_seconds, self.cache))

    async def _query(
        self, metric: str, start: float, end: float, step: float, match: dict[str, str], qs: tuple[float, ...]
    ) -> list[Point]:
        query = Query(metric, start, end, step, tuple(sorted(match.items())), qs)
        try:
            return await self.monitor.store.query(query)
        except StoreUnavailable as exc:
            raise IrosError(503, f"metric history is unavailable: {exc}", code="store_unavailable") from None

    async def traffic(self, request: Request) -> Response:
        self._admin(request)
        name, span = range_param(request, "1h")
        end = time.time()
        start = end - span
        step = auto_step(span)
        everything, ok, ttft = await asyncio.gather(
            self._query("response_time_ms", start, end, step, {}, ()),
            self._query("response_time_ms", start, end, step, {"outcome": "ok"}, ()),
            self._query("ttft_ms", start, end, step, {}, (0.5, 0.95)),
        )
        ok_counts = {p.ts: p.count for p in ok}
        throughput = [[iso(p.ts), round(p.count / step, 4)] for p in everything]
        errors = [
            [iso(p.ts), round(100 * (p.count - ok_counts.get(p.ts, 0)) / p.count, 4) if p.count else None]
            for p in everything
        ]
        target = self.monitor.settings.performance_targets.get("error_rate")
        common = {"time_range": name, "step_seconds": step}
        return JSONResponse(
            {
                "traffic": {
                    "charts": [
                        {
                            "type": "time_series",
                            "title": "Throughput",
                            "metrics": ["throughput_rps"],
                            "unit": "requests/s",
                            "series": {"throughput_rps": throughput},
                            **common,
                        },
                        {
                            "type": "time_series",
                            "title": "Error rate",
                            "metrics": ["error_rate"],
                            "unit": "%",
                            "target": target.target * 100 if target else None,
                            "series": {"error_rate": errors},
                            **common,
                        },
                        {
                            "type": "time_series",
                            "title": "Time to first token",
                            "metrics": ["ttft_p50", "ttft_p95"],
                            "unit": "ms",
                            "series": {"ttft_p50": _series(ttft, "p50"), "ttft_p95": _series(ttft, "p95")},
                            **common,
                        },
                    ]
                }
            }
        )
