"""Builds the ASGI app: the chat-completions pipeline in front, Starlette routes for the rest.

app = create_app(load_settings("iros.yaml"))
uvicorn.run(app)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from iros import __version__
from iros.admission import Admission
from iros.alert_api import AlertAPI
from iros.alerting import AlertEngine
from iros.analysis_api import AnalysisAPI
from iros.auth import KeyRing, Principal, Role
from iros.bottlenecks import TimedEmbedder
from iros.cache import build_cache
from iros.cache_api import CacheAPI
from iros.config import Settings
from iros.dashboard import DashboardPages, SessionCookieMiddleware, Sessions
from iros.dashboard_api import DashboardAPI
from iros.errors import IrosError
from iros.exposition import mark_worker_gone
from iros.gateway import Gateway
from iros.metrics_api import MetricsAPI
from iros.metrics_dashboard_api import MetricsDashboardAPI
from iros.metrics_live_api import MetricsLiveAPI
from iros.monitor import Monitor
from iros.openapi import document
from iros.optimization_api import OptimizationAPI
from iros.optimizer import Optimizer
from iros.routing import Router
from iros.sqlitefile import IncompatibleFile
from iros.tuning import Tuning

log = logging.getLogger("iros")
CHAT_PATH = "/v1/chat/completions"


class IrosApp:
    """The outer ASGI app: one comparison sends the hot path past all routing."""

    def __init__(
        self,
        settings: Settings,
        gateway: Gateway,
        router: Router,
        keyring: KeyRing,
        monitor: Monitor | None = None,
        optimizer: Optimizer | None = None,
    ) -> None:
        self.settings = settings
        self.optimizer = optimizer
        self.gateway = gateway
        self.router = router
        self.keyring = keyring
        self.monitor = monitor
        self.started_at = time.time()
        self._openapi: bytes | None = None
        routes: list[BaseRoute] = [
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/api/system/status", self.system_status, methods=["GET"]),
            Route("/api/config", self.config, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
        ]
        if monitor is not None:
            routes += MetricsAPI(monitor, keyring).routes()
            routes += MetricsDashboardAPI(monitor, keyring).routes()
            routes += MetricsLiveAPI(monitor, keyring).routes()
            routes += DashboardAPI(monitor, keyring, gateway.cache is not None).routes()
        if gateway.cache is not None:
            routes += CacheAPI(gateway, keyring).routes()
        if optimizer is not None:
            routes += OptimizationAPI(optimizer, keyring).routes()
        # Profiler, bottlenecks, reports (and their scheduler), capacity planning, troubleshooting.
        self.analysis = None
        if monitor is not None:
            audit = optimizer.compare if optimizer is not None else None
            self.analysis = AnalysisAPI(settings, monitor, gateway, keyring, audit)
            routes += self.analysis.routes()
        # Alerting: rules over the live KPIs, notifications through channels (iros/alerting.py).
        self.alerts = None
        if monitor is not None and settings.alerting.enabled:
            self.alerts = _alert_engine(settings, monitor)
            routes += AlertAPI(self.alerts, keyring).routes()
        # The dashboard: its page, login form and assets; its session cookie works on every route.
        sessions = Sessions.for_data_dir(keyring, Path(settings.server.data_dir))
        routes += DashboardPages(keyring, sessions).routes()
        self.routes = Starlette(
            routes=routes,
            middleware=[Middleware(SessionCookieMiddleware, sessions=sessions)],
            exception_handlers={IrosError: _iros_error, HTTPException: _http_error},
            lifespan=self._lifespan,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and (refusal := self._oversized_headers(scope)):
            if scope["type"] == "http":
                reply = Response(refusal.body(), refusal.status, media_type="application/json")
                await reply(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 1009})
            return
        if scope["type"] == "http" and scope["path"] == CHAT_PATH:
            await self.gateway(scope, receive, send)
        else:
            await self.routes(scope, receive, send)

    def _oversized_headers(self, scope: Scope) -> IrosError | None:
        # The HTTP parser (httptools) sets no limit of its own: bound what a request may make us hold.
        headers = scope["headers"]
        server = self.settings.server
        if len(headers) > server.max_headers:
            return IrosError(
                431,
                f"too many request headers: {len(headers)}, at most {server.max_headers}",
                code="headers_too_large",
            )
        size = sum(len(name) + len(value) for name, value in headers)
        if size > server.max_header_bytes:
            return IrosError(
                431,
                f"request headers too large: {size} bytes, at most {server.max_header_bytes}",
                code="headers_too_large",
            )
        return None

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        try:
            await self._start_parts()
        except (sqlite3.Error, OSError) as exc:
            # Once running, a full disk only stops writes (they are retried); at start the stores cannot
            # even open their files, so say plainly what to do rather than leave a bare traceback.
            log.critical(
                "cannot start: the data directory %s is not usable (%s: %s); free space there, fix its "
                "permissions, or set server.data_dir to another place",
                self.settings.server.data_dir,
                type(exc).__name__,
                exc,
            )
            raise
        except IncompatibleFile as exc:
            log.critical("cannot start: %s", exc)
            raise
        # Everything built so far (modules, classes, the app) lives as long as the process: out of the
        # collector's way, a full collection scans only what requests allocate, not tens of ms of heap.
        gc.freeze()
        try:
            yield
        finally:
            await self._stop_parts()

    async def _start_parts(self) -> None:
        if self.monitor is not None:
            await self.monitor.start()
        if self.gateway.cache is not None:
            await asyncio.to_thread(Path(self.settings.server.data_dir).mkdir, parents=True, exist_ok=True)
            await self.gateway.cache.start()
        if self.optimizer is not None:
            await self.optimizer.start()
        if self.analysis is not None:
            await self.analysis.start()
        if self.alerts is not None:
            await self.alerts.start()

    async def _stop_parts(self) -> None:
        if self.alerts is not None:
            await self.alerts.close()
        if self.analysis is not None:
            await self.analysis.close()
        if self.optimizer is not None:
            await self.optimizer.close()
        if self.gateway.cache is not None:
            await self.gateway.cache.close()
        if self.monitor is not None:
            await self.monitor.close()
            mark_worker_gone()
        await self.router.aclose()

    async def openapi(self, request: Request) -> Response:
        if self._openapi is None:
            self._openapi = orjson.dumps(document(self.routes.routes, CHAT_PATH))
        return Response(self._openapi, media_type="application/json")

    def _auth(self, request: Request, need: Role = Role.CLIENT) -> Principal:
        return self.keyring.authenticate(request.headers.get("authorization"), need)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": __version__})

    async def ready(self, request: Request) -> Response:
        deployments = list(self.router.all())
        checks = await asyncio.gather(*(d.backend.ready() for d in deployments))
        models: dict[str, dict[str, Any]] = {}
        for d, check in zip(deployments, checks, strict=True):
            entry = models.setdefault(d.name, {"ready": False, "deployments": []})
            entry["deployments"].append({"deployment": d.label, "ready": check.ready, "detail": check.detail})
            entry["ready"] = entry["ready"] or check.ready
        # Ready when every model has at least one deployment that answers.
        ok = all(m["ready"] for m in models.values())
        return JSONResponse({"ready": ok, "models": models}, status_code=200 if ok else 503)

    def _model_card(self, name: str) -> dict[str, Any]:
        first = self.router.deployments[name][0].settings
        return {
            "id": name,
            "object": "model",
            "created": int(self.started_at),
            "owned_by": "iros",
            "group": first.group,
            "tags": first.tags,
            "deployments": len(self.router.deployments[name]),
        }

    async def models(self, request: Request) -> Response:
        self._auth(request)
        return JSONResponse({"object": "list", "data": [self._model_card(n) for n in self.router.names]})

    async def model(self, request: Request) -> Response:
        self._auth(request)
        name = request.path_params["model"]
        if name not in self.router.deployments:
            raise IrosError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return JSONResponse(self._model_card(name))

    async def system_status(self, request: Request) -> Response:
        self._auth(request)
        admission = self.gateway.admission
        status, kpis = "unknown", None
        if self.monitor is not None:
            report = self.monitor.current(300.0)
            status, kpis = report["status"], report["kpis"]
        return JSONResponse(
            {
                "status": status,
                "kpis": kpis,
                "version": __version__,
                "uptime_seconds": round(time.time() - self.started_at, 3),
                "active_requests": admission.active,
                "queued_requests": admission.queued,
                "max_concurrency": admission.limit,
                "max_queue": admission.max_queue,
                "models": self.router.names,
            }
        )

    async def config(self, request: Request) -> Response:
        self._auth(request, Role.ADMIN)
        return JSONResponse(redacted(self.settings))


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective settings, with every key and secret replaced by a marker."""
    data = settings.model_dump(mode="json")
    for kind in ("api_keys", "admin_keys"):
        data["auth"][kind] = [
            {"name": k["name"], "key_env": k["key_env"], "key": "***"} for k in data["auth"][kind]
        ]
    return data


async def _iros_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, IrosError)
    return Response(exc.body(), status_code=exc.status, media_type="application/json", headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error = IrosError(
            404, f"no route {request.url.path}; the API is under /v1 and /api", code="not_found"
        )
    elif exc.status_code == 405:
        error = IrosError(
            405,
            f"{request.method} is not allowed on {request.url.path}",
            code="method_not_allowed",
            headers=dict(exc.headers or {}),
        )
    else:
        error = IrosError(exc.status_code, str(exc.detail), code="http_error")
    return await _iros_error(request, error)


def _alert_engine(settings: Settings, monitor: Monitor) -> AlertEngine:
    engine = AlertEngine.build(settings, monitor)
    # Every live message (/ws/metrics, SSE) carries the active alerts; transitions go out as they happen.
    build = monitor.hub.build
    monitor.hub.build = lambda: {**build(), "alerts": engine.summary()}
    return engine


def create_app(settings: Settings, router: Router | None = None) -> IrosApp:
    server = settings.server
    # The live settings the tuning API and the optimizer change; selection reads its preferences there.
    tuning = Tuning(settings)
    router = router or Router(
        settings.models,
        optimization=settings.optimization,
        live=tuning,
        queue_timeout=server.queue_timeout_seconds,
    )
    router.selector.live = tuning
    keyring = KeyRing(settings.auth)
    admission = Admission(server.max_concurrency, server.max_queue, server.queue_timeout_seconds)
    cache = build_cache(settings.cache, Path(settings.server.data_dir)) if settings.cache.enabled else None
    gateway = Gateway(settings, router, keyring, admission, cache)
    tuning.bind(admission, cache)
    gateway.tuning = tuning
    monitor = None
    if settings.metrics_collection.enabled:
        monitor = Monitor(settings, admission)
        gateway.observers.append(monitor.collector.observe)
        if cache is not None and cache.embedder is not None:
            # Each embedding call's time becomes the `embedding` stage of bottleneck analysis.
            cache.embedder = TimedEmbedder(cache.embedder, monitor.collector.note_stage)
    optimizer = Optimizer(settings, tuning, router, gateway=gateway, monitor=monitor)
    return IrosApp(settings, gateway, router, keyring, monitor, optimizer)


def worker_app() -> IrosApp:
    """The app of one worker under `iros serve --workers N` (uvicorn imports and calls this)."""
    import sys

    from iros.config import load_settings

    overrides = orjson.loads(os.environ.get("IROS_WORKER_OVERRIDES", "{}"))
    settings = load_settings(os.environ.get("IROS_CONFIG") or None, overrides)
    logging.basicConfig(
        level=settings.server.log_level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)-7s %(name)s[{os.getpid()}]: %(message)s",
    )
    return create_app(settings)
