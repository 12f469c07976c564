"""The metrics API: the seed's /api/metrics/*, /api/system/resources, /api/feedback and /metrics, and
the query parameters every history endpoint shares (parse_time, parse_duration, auto_step, ...).
The dashboard panels are in metrics_dashboard_api.py, /ws/metrics and the SSE stream in metrics_live_api.py.

routes += MetricsAPI(monitor, keyring).routes()
parse_time("2024-01-01", "start")   # 1704067200.0; a bad value raises a 400 IrosError naming the param

Reading metrics needs the admin key (they show every tenant's traffic); feedback takes a client key.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import asdict
from datetime import UTC, date, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iros.auth import AdminAPI, KeyRing
from iros.catalog import METRICS
from iros.errors import IrosError, bad
from iros.monitor import Monitor
from iros.types import MetricsStore, Point, Query, StoreUnavailable

MAX_POINTS = 11_000  # Prometheus' own limit per series; the same for both stores
STEPS = (10.0, 60.0, 300.0, 3600.0, 86400.0)
INTERVALS = {"1m": 60.0, "5m": 300.0, "1h": 3600.0, "1d": 86400.0}
RANGES = {
    "1h": 3600.0,
    "1d": 86400.0,
    "24h": 86400.0,
    "1w": 7 * 86400.0,
    "7d": 7 * 86400.0,
    "1m": 30 * 86400.0,
}
DEFAULT_HISTORY = ("response_time_ms", "cpu_percent", "memory_percent")
SEED_BUCKETS = (0, 500, 1000, 2000, 5000, 10000)
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_QUANTILES = (0.5, 0.95, 0.99)


def parse_time(value: str, param: str) -> float:
    """ISO dates (midnight UTC), ISO datetimes (UTC unless they say otherwise) or unix seconds."""
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            return datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise bad(
            f"{param}={value!r} is not a date: use 2024-01-01, 2024-01-01T10:00:00Z or unix seconds", param
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_duration(value: str, param: str) -> float:
    match = _DURATION.match(value.strip())
    if not match or float(match.group(1)) <= 0:
        raise bad(f"{param}={value!r} is not a duration: use seconds or 30s, 5m, 1h, 1d, 1w", param)
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def resolve_metric(name: str) -> str:
    """Catalog names, or the same without the unit suffix (response_time, cpu_usage)."""
    if name in METRICS:
        return name
    for suffix in ("_ms", "_percent", "_bytes", "_per_second"):
        if name + suffix in METRICS:
            return name + suffix
    raise bad(f"unknown metric {name!r}; known: {', '.join(METRICS)}", "metric")


def auto_step(span: float) -> float:
    """The finest store resolution that keeps a chart near 300 points."""
    for step in STEPS:
        if span / step <= 300:
            return step
    return STEPS[-1]


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def point_json(p: Point) -> dict[str, Any]:
    out: dict[str, Any] = {
        "timestamp": iso(p.ts),
        "count": p.count,
        "sum": _round(p.sum),
        "avg": _round(p.avg),
        "min": _round(p.min),
        "max": _round(p.max),
    }
    for q, v in p.quantiles.items():
        out[f"p{round(q * 100):d}"] = _round(v)
    return out


def _round(value: float | None) -> float | None:
    if value is None or math.isnan(value):
        return None
    return round(value, 4)


async def query_points(
    store: MetricsStore, metric: str, start: float, end: float, step: float, match: dict[str, str]
) -> list[dict[str, Any]]:
    """One metric's points from the store as JSON; 400 for too many points, 503 with the store down."""
    if (end - start) / step > MAX_POINTS:
        raise bad(f"{(end - start) / step:.0f} points asked; at most {MAX_POINTS}: use a larger step", "step")
    query = Query(metric, start, end, step, tuple(sorted(match.items())), _QUANTILES)
    try:
        points = await store.query(query)
    except StoreUnavailable as exc:
        raise IrosError(503, f"metric history is unavailable: {exc}", code="store_unavailable") from None
    except ValueError as exc:
        raise bad(str(exc)) from None
    return [point_json(p) for p in points]


class MonitorAPI(AdminAPI):
    """Routes that read the Monitor; subclasses add routes(). `_admin` is the check most of them need."""

    def __init__(self, monitor: Monitor, keyring: KeyRing) -> None:
        super().__init__(keyring)
        self.monitor = monitor


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
            Route("/api/system/resources", self.resources, methods=get),
            Route("/api/feedback", self.feedback, methods=["POST"]),
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
        seconds = parse_duration(raw, "window") if raw else default
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
        end = parse_time(params["end"], "end") if params.get("end") else time.time()
        start = parse_time(params["start"], "start") if params.get("start") else end - default_span
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
        step = parse_duration(raw_step, "step") if raw_step else auto_step(end - start)
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

    # --- system -------------------------------------------------------------------------------
    async def resources(self, request: Request) -> Response:
        self._admin(request)
        sample = self.monitor.sampler.latest or await self.monitor.collector.sample_system()
        out = sample.to_json()
        out["gpu"] = {
            "status": sample.gpu_status,
            "available": bool(sample.gpus),
            "message": None if sample.gpus else "no GPU: NVML found no NVIDIA device or driver",
        }
        out["collection_interval_seconds"] = self.monitor.metrics.collection_interval_seconds
        return JSONResponse(out)

    # --- feedback -----------------------------------------------------------------------------
    async def feedback(self, request: Request) -> Response:
        self.keyring.authenticate(request.headers.get("authorization"))
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            raise bad('the body must be JSON: {"request_id": "...", "score": 0.0-1.0}') from None
        if not isinstance(body, dict):
            raise bad("the body must be a JSON object with request_id and score")
        request_id, score = body.get("request_id"), body.get("score")
        if not isinstance(request_id, str) or not request_id:
            raise bad("request_id is required: the x-iros-request-id header of the response", "request_id")
        if isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1:
            raise bad("score must be a number from 0 (useless) to 1 (perfect)", "score")
        try:
            model = self.monitor.collector.feedback(request_id, float(score))
        except KeyError:
            raise IrosError(
                404,
                f"no recent response has request_id {request_id!r} (feedback is kept for the last "
                "100,000 responses of this process)",
                param="request_id",
                code="request_not_found",
            ) from None
        except ValueError as exc:
            raise IrosError(409, str(exc), param="request_id", code="feedback_exists") from None
        except PermissionError as exc:
            raise IrosError(404, str(exc), code="feedback_disabled") from None
        return JSONResponse({"request_id": request_id, "score": score, "model": model, "accepted": True})


async def _maybe_await(value: Any) -> Any:
    if asyncio.iscoroutine(value):
        return await value
    return value
