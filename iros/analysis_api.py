"""The seed's analysis API: profiler, bottlenecks, reports, capacity planning, troubleshooting.

All of it needs the admin key: it shows every tenant's traffic and runs requests on the server's behalf.

api = AnalysisAPI(settings, monitor, gateway, keyring)
routes += api.routes(); await api.start() ... await api.close()     # the report scheduler
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iros import bottlenecks, capacity, reports, troubleshoot
from iros.auth import AdminAPI, KeyRing
from iros.config import Settings
from iros.errors import IrosError, bad
from iros.gateway import Gateway
from iros.metrics_api import parse_duration, parse_time
from iros.monitor import Monitor
from iros.profiler import RequestProfiler

MAX_BODY = 64 * 1024
MAX_SPAN = 400 * 86400.0  # the longest window any view reads

# Issue-5's optimizer registers its audit here (an async callable returning JSON-able data).
OptimizerAudit = Callable[[], Awaitable[Any]]


class AnalysisAPI(AdminAPI):
    def __init__(
        self,
        settings: Settings,
        monitor: Monitor,
        gateway: Gateway,
        keyring: KeyRing,
        optimizer_audit: OptimizerAudit | None = None,
    ) -> None:
        super().__init__(keyring)
        self.settings = settings
        self.monitor = monitor
        self.store = monitor.store
        self.gateway = gateway
        self.optimizer_audit = optimizer_audit
        self.profiler = RequestProfiler(gateway)
        self.reports = reports.ReportStore(
            Path(settings.server.data_dir) / "reports.db", keep=settings.reports.keep
        )
        self.scheduler = reports.ReportScheduler(
            self._generate, self.reports, settings.reports.check_interval_seconds
        )

    def routes(self) -> list[BaseRoute]:
        get = ["GET"]
        perf = "/api/analysis/performance"
        return [
            Route("/api/analysis/profile", self.profile, methods=["POST"]),
            Route("/api/analysis/profile/results/{session_id}", self.profile_results, methods=get),
            Route("/api/analysis/bottlenecks", self.bottlenecks, methods=get),
            Route("/api/analysis/reports/{kind}", self.generate_report, methods=["POST"]),
            Route("/api/analysis/reports/{kind}/latest", self.latest_report, methods=get),
            Route("/api/analysis/reports/{kind}/history", self.report_history, methods=get),
            Route("/api/analysis/capacity", self.capacity, methods=get),
            Route("/api/analysis/capacity/projections", self.projections, methods=get),
            Route("/api/analysis/capacity/recommendations", self.recommendations, methods=get),
            Route(f"{perf}/response-time", self.response_time, methods=get),
            Route(f"{perf}/models", self.models, methods=get),
            Route(f"{perf}/optimizations", self.optimizations, methods=get),
            Route(f"{perf}/cpu", self.cpu, methods=get),
            Route(f"{perf}/memory", self.memory, methods=get),
            Route(f"{perf}/gpu", self.gpu, methods=get),
            Route("/api/analysis/compare/models", self.compare_models, methods=get),
        ]

    async def start(self) -> None:
        if self.settings.reports.enabled:
            self.scheduler.start()

    async def close(self) -> None:
        await self.scheduler.close()

    async def _fresh(self) -> None:
        # Requests answered a moment ago are still in the collector's queue: take them in and write.
        await self.monitor.collector.ingest()
        await self.store.flush()

    def _range(self, request: Request, default_span: float) -> tuple[float, float]:
        """?start=&end= (ISO or unix seconds), or ?window=1h ending now."""
        params = request.query_params
        end = parse_time(params["end"], "end") if params.get("end") else time.time()
        if params.get("start"):
            start = parse_time(params["start"], "start")
        else:
            start = end - (
                parse_duration(params["window"], "window") if params.get("window") else default_span
            )
        if start >= end:
            raise bad("start must be before end", "start")
        if end - start > MAX_SPAN:
            raise bad(f"the window is at most {MAX_SPAN / 86400:.0f} days", "start")
        return start, end

    # --- profiler -----------------------------------------------------------------------------
    async def profile(self, request: Request) -> Response:
        self._admin(request)
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise IrosError(413, f"the body is over {MAX_BODY} bytes", code="body_too_large")
        try:
            body = orjson.loads(raw or b"{}")
        except orjson.JSONDecodeError:
            raise bad('the body is not JSON: send {"query": "...", "enable_profiling": true}') from None
        if not isinstance(body, dict):
            raise bad("the body must be a JSON object")
        unknown = set(body) - {"query", "enable_profiling", "model", "stream"}
        if unknown:
            raise bad(f"unknown field(s): {', '.join(sorted(unknown))}", sorted(unknown)[0])
        for name in ("enable_profiling", "stream"):
            if name in body and not isinstance(body[name], bool):
                raise bad(f"{name} must be true or false", name)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise bad("model must be a string", "model")
        auth = request.headers.get("authorization", "").encode("latin-1")
        session_id = await self.profiler.run(
            body.get("query"),  # type: ignore[arg-type]  # checked inside
            auth,
            model,
            stream=body.get("stream", False),
            enable_profiling=body.get("enable_profiling", True),
        )
        result = self.profiler.results(session_id)
        return JSONResponse(
            {
                "session_id": session_id,
                "status": "completed",
                "total_ms": result["total_ms"],
                "results": f"/api/analysis/profile/results/{session_id}",
            }
        )

    async def profile_results(self, request: Request) -> Response:
        self._admin(request)
        return JSONResponse(self.profiler.results(request.path_params["session_id"]))

    # --- bottlenecks --------------------------------------------------------------------------
    def _hit_rate(self) -> float | None:
        cache = self.gateway.cache
        if cache is None:
            return None
        counts = cache.counts
        lookups = counts.get("hit", 0) + counts.get("semantic_hit", 0) + counts.get("miss", 0)
        return (counts.get("hit", 0) + counts.get("semantic_hit", 0)) / lookups if lookups else None

    async def bottlenecks(self, request: Request) -> Response:
        self._admin(request)
        start, end = self._range(request, 3600.0)
        await self._fresh()
        report = await bottlenecks.analyse(
            self.store, start, end, self.gateway.admission.limit, self._hit_rate()
        )
        return JSONResponse({"start": start, "end": end, **report})

    # --- reports ------------------------------------------------------------------------------
    async def _generate(self, kind: str, end: float) -> dict[str, Any]:
        return await reports.build_report(
            kind, self.store, end, self.settings.performance_targets, self.gateway.admission.limit
        )

    @staticmethod
    def _kind(request: Request) -> str:
        kind = request.path_params["kind"]
        if kind not in reports.KINDS:
            raise IrosError(404, f"no {kind!r} report: daily or weekly", param="kind", code="not_found")
        return str(kind)

    async def generate_report(self, request: Request) -> Response:
        self._admin(request)
        kind = self._kind(request)
        end = (
            parse_time(request.query_params["end"], "end") if request.query_params.get("end") else time.time()
        )
        await self._fresh()
        report = await self._generate(kind, end)
        await self.reports.save(report)
        return JSONResponse(report)

    async def latest_report(self, request: Request) -> Response:
        self._admin(request)
        kind = self._kind(request)
        report = await self.reports.latest(kind)
        if report is None:
            raise IrosError(
                404, f"no {kind} report yet: POST /api/analysis/reports/{kind} makes one", code="no_report"
            )
        return JSONResponse(report)

    async def report_history(self, request: Request) -> Response:
        self._admin(request)
        return JSONResponse({"reports": await self.reports.history(self._kind(request))})

    # --- capacity -----------------------------------------------------------------------------
    async def _current(self, request: Request) -> dict[str, Any]:
        start, end = self._range(request, 86400.0)
        await self._fresh()
        admission = self.gateway.admission
        return await capacity.current_capacity(self.store, start, end, admission.limit, admission.active)

    async def capacity(self, request: Request) -> Response:
        self._admin(request)
        return JSONResponse({"capacity_planning": {"current_capacity": await self._current(request)}})

    async def projections(self, request: Request) -> Response:
        self._admin(request)
        current = await self._current(request)
        growth = await capacity.projections(self.store, time.time(), current["max_concurrent_requests"])
        return JSONResponse({"capacity_planning": {"current_capacity": current, **growth}})

    async def recommendations(self, request: Request) -> Response:
        self._admin(request)
        current = await self._current(request)
        try:
            growth = await capacity.projections(self.store, time.time(), current["max_concurrent_requests"])
        except IrosError as exc:
            if exc.code != "insufficient_history":
                raise
            growth = None
        target = self.settings.performance_targets.get("response_time_ms")
        plan = capacity.recommend(
            current, growth, target.target if target else 2000.0, self.gateway.admission.limit
        )
        return JSONResponse({"current_capacity": current, "recommendations": plan})

    # --- troubleshooting ----------------------------------------------------------------------
    async def response_time(self, request: Request) -> Response:
        self._admin(request)
        start, end = self._range(request, 3600.0)
        out = await troubleshoot.response_time(
            self.store, start, end, self.settings.performance_targets, self.gateway.admission.limit
        )
        return JSONResponse(out)

    async def models(self, request: Request) -> Response:
        self._admin(request)
        start, end = self._range(request, 3600.0)
        return JSONResponse(await troubleshoot.models(self.store, start, end, self.monitor.accuracy))

    async def compare_models(self, request: Request) -> Response:
        self._admin(request)
        start, end = self._range(request, 3600.0)
        return JSONResponse(await troubleshoot.compare_models(self.store, start, end, self.monitor.accuracy))

    async def optimizations(self, request: Request) -> Response:
        self._admin(request)
        start, end = self._range(request, 3600.0)
        out = await troubleshoot.optimizations(self.store, start, end, self.optimizer_audit)
        return JSONResponse(out)

    async def cpu(self, request: Request) -> Response:
        self._admin(request)
        start, end = self._range(request, 3600.0)
        return JSONResponse(await troubleshoot.cpu(self.store, start, end, self.settings.performance_targets))

    async def memory(self, request: Request) -> Response:
        self._admin(request)
        start, end = self._range(request, 3600.0)
        return JSONResponse(await troubleshoot.memory(self.store, start, end))

    async def gpu(self, request: Request) -> Response:
        self._admin(request)
        start, end = self._range(request, 3600.0)
        status = self.monitor.sampler.latest.gpu_status if self.monitor.sampler.latest else "unknown"
        return JSONResponse(await troubleshoot.gpu(self.store, start, end, status))
