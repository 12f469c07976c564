"""The system routes: liveness, readiness, the model list, status, the effective config, the OpenAPI
document, and the host's resources.

GET /health                  liveness, no key
GET /ready                   200 when every model has a deployment that answers, else 503; no key
GET /v1/models[/{model}]     the OpenAI model list (client key)
GET /api/system/status       KPIs, version, uptime, admission (client key)
GET /api/system/resources    CPU, memory, disk and GPU of the host and the process (admin key)
GET /api/config              the effective settings, secrets redacted (admin key)
GET /openapi.json            this API's OpenAPI 3.1 document, built from the routes the app has; no key
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iros import __version__
from iros.api.base import AdminAPI
from iros.api.openapi import document
from iros.config import Settings, redacted
from iros.core.admission import Admission
from iros.core.errors import IrosError
from iros.gateway.auth import KeyRing, Role
from iros.metrics.monitor import Monitor
from iros.routing.router import Router


class SystemAPI(AdminAPI):
    def __init__(
        self,
        settings: Settings,
        router: Router,
        admission: Admission,
        keyring: KeyRing,
        monitor: Monitor | None,
    ) -> None:
        super().__init__(keyring)
        self.settings = settings
        self.router = router
        self.admission = admission
        self.monitor = monitor
        self.started_at = time.time()
        self._openapi: bytes | None = None

    def routes(self) -> list[BaseRoute]:
        get = ["GET"]
        routes: list[BaseRoute] = [
            Route("/health", self.health, methods=get),
            Route("/ready", self.ready, methods=get),
            Route("/v1/models", self.models, methods=get),
            Route("/v1/models/{model:path}", self.model, methods=get),
            Route("/api/system/status", self.system_status, methods=get),
            Route("/api/config", self.config, methods=get),
            Route("/openapi.json", self.openapi, methods=get),
        ]
        if self.monitor is not None:
            routes.append(Route("/api/system/resources", self.resources, methods=get))
        return routes

    async def openapi(self, request: Request) -> Response:
        if self._openapi is None:
            # The app's whole route table (request.app is the Starlette app every API's routes join).
            self._openapi = orjson.dumps(document(request.app.routes))
        return Response(self._openapi, media_type="application/json")

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
        admission = self.admission
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

    async def resources(self, request: Request) -> Response:
        self._admin(request)
        monitor = self.monitor
        assert monitor is not None  # the route exists only with monitoring on
        sample = monitor.sampler.latest or await monitor.collector.sample_system()
        out = sample.to_json()
        out["gpu"] = {
            "status": sample.gpu_status,
            "available": bool(sample.gpus),
            "message": None if sample.gpus else "no GPU: NVML found no NVIDIA device or driver",
        }
        out["collection_interval_seconds"] = monitor.metrics.collection_interval_seconds
        return JSONResponse(out)
