"""The seed's three dashboard panels, filled: /api/monitoring/dashboard/{overview,performance,resources}.

routes += MetricsDashboardAPI(monitor, keyring).routes()
GET /api/monitoring/dashboard/performance?range=24h   (ranges: metrics_api.RANGES; admin key)

The layout and the traffic panel are in dashboard_api.py.
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

from iros import kpi
from iros.errors import IrosError, bad
from iros.metrics_api import RANGES, SEED_BUCKETS, MonitorAPI, auto_step, query_points
from iros.types import Query, StoreUnavailable


class MetricsDashboardAPI(MonitorAPI):
    def routes(self) -> list[BaseRoute]:
        get = ["GET"]
        return [
            Route("/api/monitoring/dashboard/overview", self.dashboard_overview, methods=get),
            Route("/api/monitoring/dashboard/performance", self.dashboard_performance, methods=get),
            Route("/api/monitoring/dashboard/resources", self.dashboard_resources, methods=get),
        ]

    # --- dashboard widget data (the seed's shapes, filled) -------------------------------------
    def _range_param(self, request: Request, default: str) -> tuple[str, float]:
        name = request.query_params.get("range", default)
        if name not in RANGES:
            raise bad(f"range must be one of {', '.join(RANGES)}", "range")
        return name, RANGES[name]

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
        name, span = self._range_param(request, "24h")
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
        name, span = self._range_param(request, "1h")
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
