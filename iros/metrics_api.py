"""The metrics and monitoring API: the seed's /api/metrics/*, /api/system/resources,
/api/monitoring/dashboard/*, /api/feedback, /metrics, /ws/metrics and the SSE stream.

Reading metrics needs the admin key (they show every tenant's traffic); feedback takes a client key.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from datetime import UTC, date, datetime
from typing import Any

import orjson
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from iros import kpi
from iros.auth import KeyRing, Role
from iros.catalog import METRICS
from iros.errors import IrosError
from iros.live import HubFull
from iros.monitor import Monitor
from iros.types import Point, Query, StoreUnavailable

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


def bad(message: str, param: str | None = None) -> IrosError:
    return IrosError(400, message, param=param, code="invalid_parameter")


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


class MetricsAPI:
    def __init__(self, monitor: Monitor, keyring: KeyRing) -> None:
        self.monitor = monitor
        self.keyring = keyring

    def routes(self) -> list[BaseRoute]:
        get = ["GET"]
        return [
            Route("/metrics", self.prometheus, methods=get),
            Route("/api/metrics/current", self.current, methods=get),
            Route("/api/metrics/historical", self.historical, methods=get),
            Route("/api/metrics/aggregated", self.aggregated, methods=get),
            Route("/api/metrics/performance", self.performance, methods=get),
            Route("/api/metrics/models/{model_id:path}", self.model, methods=get),
            Route("/api/metrics/stream", self.stream, methods=get),
            Route("/api/metrics/store", self.store_status, methods=get),
            Route("/api/system/resources", self.resources, methods=get),
            Route("/api/monitoring/dashboard/overview", self.dashboard_overview, methods=get),
            Route("/api/monitoring/dashboard/performance", self.dashboard_performance, methods=get),
            Route("/api/monitoring/dashboard/resources", self.dashboard_resources, methods=get),
            Route("/api/feedback", self.feedback, methods=["POST"]),
            WebSocketRoute("/ws/metrics", self.websocket),
        ]

    def _admin(self, request: Request) -> None:
        self.keyring.authenticate(request.headers.get("authorization"), Role.ADMIN)

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
        history = await self._query(
            "response_time_ms", start, end, step, {"model": model_id, "outcome": "ok"}
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

    async def _query(
        self, metric: str, start: float, end: float, step: float, match: dict[str, str]
    ) -> list[dict[str, Any]]:
        if (end - start) / step > MAX_POINTS:
            raise bad(
                f"{(end - start) / step:.0f} points asked; at most {MAX_POINTS}: use a larger step", "step"
            )
        query = Query(metric, start, end, step, tuple(sorted(match.items())), _QUANTILES)
        try:
            points = await self.monitor.store.query(query)
        except StoreUnavailable as exc:
            raise IrosError(503, f"metric history is unavailable: {exc}", code="store_unavailable") from None
        except ValueError as exc:
            raise bad(str(exc)) from None
        return [point_json(p) for p in points]

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
        results = await asyncio.gather(*(self._query(m, start, end, step, matches[m]) for m in metrics))
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
        points = await self._query(metric, start, end, step, self._match(request, metric))
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
        points = await self._query("response_time_ms", start, end, step, {"outcome": "ok"})
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
            self._query("cpu_percent", start, end, step, {}),
            self._query("memory_percent", start, end, step, {}),
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

    # --- live ---------------------------------------------------------------------------------
    async def stream(self, request: Request) -> Response:
        self._admin(request)
        keys = _keys(request.query_params.get("metrics"))
        hub = self.monitor.hub
        if len(hub.subscribers) >= 200:
            raise IrosError(503, "too many live subscribers; try again later", code="too_many_subscribers")

        async def events() -> AsyncIterator[dict[str, str]]:
            async with hub.subscribe(keys) as sub:
                while True:
                    data = await sub.get()
                    yield {"event": "metrics", "data": data.decode()}

        return EventSourceResponse(events(), ping=15, send_timeout=10)

    async def websocket(self, websocket: WebSocket) -> None:
        try:
            self.keyring.authenticate(websocket.headers.get("authorization"), Role.ADMIN)
        except IrosError:
            await websocket.close(code=1008, reason="admin key required (Authorization: Bearer ...)")
            return
        await websocket.accept()
        try:
            async with self.monitor.hub.subscribe(_keys(websocket.query_params.get("metrics"))) as sub:
                reader = asyncio.create_task(self._read_filters(websocket, sub.set_filter))
                try:
                    while not reader.done():
                        getter = asyncio.ensure_future(sub.get())
                        await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                        if getter.done():
                            await websocket.send_text(getter.result().decode())
                        else:
                            getter.cancel()
                finally:
                    reader.cancel()
        except HubFull as exc:
            await websocket.close(code=1013, reason=str(exc))
        except WebSocketDisconnect:
            pass

    async def _read_filters(
        self, websocket: WebSocket, set_filter: Callable[[list[str] | None], None]
    ) -> None:
        """Clients narrow what they receive: {"subscribe": ["response_time_p95", "models"]}."""
        while True:
            try:
                text = await websocket.receive_text()
            except (WebSocketDisconnect, RuntimeError):
                return
            try:
                message = orjson.loads(text)
                keys = message["subscribe"]
                if keys is not None and not (
                    isinstance(keys, list) and all(isinstance(k, str) for k in keys)
                ):
                    raise TypeError
            except (orjson.JSONDecodeError, KeyError, TypeError):
                await websocket.send_text(
                    orjson.dumps(
                        {
                            "type": "error",
                            "message": 'send {"subscribe": ["metric", ...]} or {"subscribe": null}',
                        }
                    ).decode()
                )
                continue
            set_filter(keys)
            await websocket.send_text(orjson.dumps({"type": "subscribed", "metrics": keys}).decode())


def _keys(raw: str | None) -> list[str] | None:
    return [k.strip() for k in raw.split(",") if k.strip()] if raw else None


async def _maybe_await(value: Any) -> Any:
    if asyncio.iscoroutine(value):
        return await value
    return value
