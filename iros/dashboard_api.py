"""The dashboard's layout and its traffic panel, beside the seed's three panels in metrics_dashboard_api.py.

GET /api/monitoring/dashboard/layout   which panels the page draws and the API each widget calls
GET /api/monitoring/dashboard/traffic  throughput, error rate and time to first token over a range

    curl -H "Authorization: Bearer $ADMIN" localhost:8080/api/monitoring/dashboard/traffic?range=1h

A panel with a `source` is drawn from that endpoint's widget JSON ({panel id: {"widgets"|"charts": [...]}}
in the seed's shape); a panel with `widgets` lists widgets that each call their own API.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iros.auth import KeyRing
from iros.errors import IrosError
from iros.metrics_api import RANGES, MonitorAPI, auto_step, iso
from iros.monitor import Monitor
from iros.types import Point, Query, StoreUnavailable

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


class DashboardAPI(MonitorAPI):
    def __init__(self, monitor: Monitor, keyring: KeyRing, cache: bool) -> None:
        super().__init__(monitor, keyring)
        self.cache = cache

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/api/monitoring/dashboard/layout", self.layout, methods=["GET"]),
            Route("/api/monitoring/dashboard/traffic", self.traffic, methods=["GET"]),
        ]

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
        name = request.query_params.get("range", "1h")
        if name not in RANGES:
            raise IrosError(
                400, f"range must be one of {', '.join(RANGES)}", param="range", code="invalid_parameter"
            )
        end = time.time()
        start = end - RANGES[name]
        step = auto_step(RANGES[name])
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
