"""The seed's metrics API (admin key: the metrics show every tenant's traffic).

GET /metrics                                Prometheus exposition
GET /api/metrics/current?window=60s         KPIs and the last responses, from the live window
GET /api/metrics/historical?metric=&start=&end=&step=
GET /api/metrics/aggregated?interval=1h&metric=
GET /api/metrics/performance                GET /api/metrics/models/{id}      GET /api/metrics/store

routes += MetricsAPI(monitor, keyring).routes()
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iros.api.base import MonitorAPI
from iros.api.params import (
    DEFAULT_HISTORY,
    INTERVALS,
    auto_step,
    duration_param,
    query_points,
    resolve_metric,
    time_param,
)
from iros.core.errors import IrosError, bad
from iros.core.timefmt import iso
from iros.metrics.catalog import METRICS


class MetricsAPI(MonitorAPI):
    def routes(self) -> list[BaseRoute]:
        get = ["GET"]
        return [
            Route("/metrics", self.prometheus, methods=get),
            Route("/api/metrics/current", self.current, methods=get),
            Route("/api/metrics/historical", self.historical, methods=get),
            Route("/api/metrics/aggregated", self.aggregated, methods=get),
            Route("/api/metrics/performance", self.performance, methods=get),
            Route("/api/metrics/models/{model_id:path}", self.model, methods=get),
            Route("/api/metrics/store", self.store_status, methods=get),
        ]

    # --- Prometheus ---------------------------------------------------------------------------
    async def prometheus(self, request: Request) -> Response:
        self._admin(request)
        self.monitor.collector.refresh_load()
        body, content_type = self.monitor.exposition.render()
        return Response(body, media_type=content_type)

    # --- current and KPI views ----------------------------------------------------------------
    def _window(self, request: Request, default: float = 60.0) -> float:
        raw = request.query_params.get("window")
        seconds = duration_param(raw, "window") if raw else default
        if seconds > 300:
            raise bad(
                "window is at most 300 seconds (5m) here; use /api/metrics/historical for more", "window"
            )
        return seconds

    async def current(self, request: Request) -> Response:
        self._admin(request)
        report = self.monitor.current(self._window(request))
        # The seed's ResponseMetrics of the last few responses, as recorded.
        report["recent_responses"] = [asdict(m) for m in list(self.monitor.collector.recent)[-10:]]
        return JSONResponse(report)

    async def performance(self, request: Request) -> Response:
        self._admin(request)
        report = self.monitor.current(self._window(request, 300.0))
        return JSONResponse(
            {
                "timestamp": report["timestamp"],
                "window_seconds": report["window_seconds"],
                "status": report["status"],
                "kpis": report["kpis"],
                "response": report["response"],
                "user_experience": report.get("user_experience"),
            }
        )

    async def model(self, request: Request) -> Response:
        self._admin(request)
        model_id = request.path_params["model_id"]
        if not self.monitor.collector.per_model:
            raise IrosError(
                404,
                "per-model metrics are off (metrics_collection.custom_metrics.model_performance_metrics)",
                code="model_metrics_disabled",
            )
        if model_id not in self.monitor.accuracy:
            raise IrosError(
                404, f"the model {model_id!r} does not exist", param="model_id", code="model_not_found"
            )
        report = self.monitor.current(self._window(request, 300.0))
        out = dict(report["models"][model_id])
        out["window_seconds"] = report["window_seconds"]
        end = time.time()
        start = end - 86400
        step = auto_step(end - start)
        history = await query_points(
            self.monitor.store, "response_time_ms", start, end, step, {"model": model_id, "outcome": "ok"}
        )
        out["history"] = {"metric": "response_time_ms", "step_seconds": step, "points": history}
        return JSONResponse(out)

    # --- history ------------------------------------------------------------------------------
    def _range(self, request: Request, default_span: float) -> tuple[float, float]:
        params = request.query_params
        end = time_param(params["end"], "end") if params.get("end") else time.time()
        start = time_param(params["start"], "start") if params.get("start") else end - default_span
        if start >= end:
            raise bad(f"start ({iso(start)}) must be before end ({iso(end)})", "start")
        return start, end

    def _match(self, request: Request, metric: str) -> dict[str, str]:
        allowed = METRICS[metric].labels
        match: dict[str, str] = {}
        for label in ("model", "cache", "outcome", "gpu"):
            value = request.query_params.get(label)
            if value is None:
                continue
            if label not in allowed:
                raise bad(f"{metric} has no {label!r} label (it has: {', '.join(allowed) or 'none'})", label)
            match[label] = value
        return match

    async def historical(self, request: Request) -> Response:
        self._admin(request)
        start, end = self._range(request, 3600.0)
        raw_step = request.query_params.get("step")
        step = duration_param(raw_step, "step") if raw_step else auto_step(end - start)
        names = request.query_params.get("metric")
        metrics = (
            [resolve_metric(n.strip()) for n in names.split(",") if n.strip()] if names else DEFAULT_HISTORY
        )
        matches = {m: self._match(request, m) if names else {} for m in metrics}
        results = await asyncio.gather(
            *(query_points(self.monitor.store, m, start, end, step, matches[m]) for m in metrics)
        )
        return JSONResponse(
            {
                "start": iso(start),
                "end": iso(end),
                "step_seconds": step,
                "source": self.monitor.store.name,
                "series": {
                    m: {"unit": METRICS[m].unit, "match": matches[m], "points": points}
                    for m, points in zip(metrics, results, strict=True)
                },
            }
        )

    async def aggregated(self, request: Request) -> Response:
        self._admin(request)
        interval = request.query_params.get("interval", "1h")
        allowed = self.monitor.metrics.aggregation_intervals
        if interval not in allowed:
            raise bad(
                f"interval must be one of {', '.join(allowed)} (metrics_collection.aggregation_intervals)",
                "interval",
            )
        step = INTERVALS[interval]
        metric = resolve_metric(request.query_params.get("metric", "response_time_ms"))
        start, end = self._range(request, step * 48)
        start = math.floor(start / step) * step
        points = await query_points(
            self.monitor.store, metric, start, end, step, self._match(request, metric)
        )
        return JSONResponse(
            {
                "metric": metric,
                "unit": METRICS[metric].unit,
                "interval": interval,
                "start": iso(start),
                "end": iso(end),
                "source": self.monitor.store.name,
                "points": points,
            }
        )

    async def store_status(self, request: Request) -> Response:
        self._admin(request)
        store = self.monitor.store
        detail: dict[str, Any] = {"backend": store.name}
        stats = getattr(store, "stats", None)
        health = getattr(store, "health", None)
        if callable(stats):
            detail["stats"] = await _maybe_await(stats())
        if callable(health):
            detail["health"] = await _maybe_await(health())
        return JSONResponse(detail)


async def _maybe_await(value: Any) -> Any:
    if asyncio.iscoroutine(value):
        return await value
    return value
