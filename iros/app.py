"""Assembly: the one place that builds Iros's parts and joins them, and the outer ASGI app.

app = create_app(load_settings("iros.yaml"))    # check_settings first: conditions parse, profiles exist
uvicorn.run(app)

Every part gets what it needs through its constructor, built here in dependency order; nothing is
attached to a part after it is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

from iros.alerting.engine import AlertEngine
from iros.alerting.rules import condition_problem
from iros.api.alerts import AlertAPI
from iros.api.analysis import AnalysisAPI, OptimizationComparisonAPI
from iros.api.feedback import FeedbackAPI
from iros.api.live import MetricsLiveAPI
from iros.api.metrics import MetricsAPI
from iros.api.monitoring import MonitoringAPI
from iros.api.optimization import CacheTuningAPI, OptimizationAPI
from iros.api.state import StateAPI
from iros.api.system import SystemAPI
from iros.backends.simulation import PROFILES
from iros.cache.build import build_cache
from iros.cache.engine import ResponseCache
from iros.cache.shared_calibration import SharedCalibration
from iros.conditions.parse import ConditionError
from iros.config import ConfigError, Settings
from iros.core.admission import Admission
from iros.core.errors import IrosError
from iros.core.heap import Heap
from iros.core.periodic import every
from iros.core.schema import OPERATIONS
from iros.core.sqlitefile import IncompatibleFile
from iros.dashboard.pages import DashboardPages, SessionCookieMiddleware
from iros.gateway.auth import KeyRing
from iros.gateway.budgets import Budgets
from iros.gateway.keyguard import KeyGuardMiddleware
from iros.gateway.pipeline import Gateway
from iros.gateway.ratelimit import RateLimiter
from iros.gateway.sessions import Sessions
from iros.gateway.spend import SQLiteSpendStore
from iros.metrics.exposition import mark_worker_gone
from iros.metrics.monitor import Monitor
from iros.optimization.optimizer import Optimizer, compile_rule
from iros.optimization.tuning import KNOBS, Tuning
from iros.otel.env import OtelEnv
from iros.otel.export import Telemetry
from iros.routing.router import Router
from iros.server.guards import RequestGuard, bounded_body
from iros.state.lease import Leadership
from iros.state.sync import SharedState, build_state

log = logging.getLogger("iros")
REFREEZE_SECONDS = 5.0  # how often the heap checks for modules loaded since it was frozen (a length compared)


def check_settings(settings: Settings) -> None:
    """What the settings cannot check by themselves, because it needs the parts: every alert condition
    and optimizer trigger parses, every simulated profile exists. Raises ConfigError, in load_settings'
    format, naming each bad field."""
    problems = []
    for i, model in enumerate(settings.models):
        if model.backend == "simulated" and model.profile not in PROFILES:
            problems.append(
                f"models[{i}]: unknown simulated profile {model.profile!r}; known: {', '.join(PROFILES)}"
            )
    blocks = [("alerting", settings.alerting.alert_rules)]
    if settings.live_alerting is not None:
        blocks.append(("live_alerting", settings.live_alerting.alert_rules))
    for block, rules in blocks:
        for i, rule in enumerate(rules):
            if problem := condition_problem(rule):
                problems.append(f"{block}.alert_rules[{i}].condition: {problem}")
    for i, trigger in enumerate(settings.optimization.auto_optimization.optimization_rules):
        try:
            compile_rule(trigger)
        except ConditionError as exc:
            where = f"optimization.auto_optimization.optimization_rules[{i}].trigger"
            problems.append(f"{where}: {exc.message}")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


class IrosApp:
    """The outer ASGI app: the request guard (iros/server/guards.py), then one comparison sends the hot
    path past all routing; the lifespan starts and stops the parts in order."""

    def __init__(
        self,
        settings: Settings,
        gateway: Gateway,
        routes: list[BaseRoute],
        *,
        monitor: Monitor | None,
        cache: ResponseCache | None,
        optimizer: Optimizer,
        analysis: AnalysisAPI | None,
        alerts: AlertEngine | None,
        telemetry: Telemetry | None = None,
        shared: SharedState | None = None,
        leadership: Leadership | None = None,
    ) -> None:
        self.settings = settings
        self.gateway = gateway
        self.router = gateway.router
        self.monitor = monitor
        self.cache = cache
        self.optimizer = optimizer
        self.analysis = analysis
        self.alerts = alerts
        self.telemetry = telemetry
        self._settling: asyncio.Task[None] | None = None
        self.heap = Heap()
        self._refreezing: asyncio.Task[None] | None = None
        self.shared = shared
        self.leadership = leadership
        self.routes = Starlette(
            routes=routes,
            # Wrong keys and sign-ins slow their address (the gateway checks the same guard inline).
            middleware=[
                Middleware(KeyGuardMiddleware, guard=gateway.guard),
                Middleware(SessionCookieMiddleware),
            ],
            exception_handlers={IrosError: _iros_error, HTTPException: _http_error},
            lifespan=self._lifespan,
        )
        self.guard = RequestGuard(settings.server, open_mode=settings.auth.open)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and (refusal := self.guard.check(scope)):
            if scope["type"] == "http":
                reply = Response(
                    refusal.body(), refusal.status, media_type="application/json", headers=refusal.headers
                )
                await reply(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 1009 if refusal.status == 431 else 1008})
            return
        if scope["type"] == "http" and scope["path"] in OPERATIONS:
            await self.gateway(scope, receive, send)  # the gateway bounds the body itself
        elif scope["type"] == "http":
            await self.routes(scope, bounded_body(receive, self.settings.server.max_body_bytes), send)
        else:
            await self.routes(scope, receive, send)

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
        # Libraries loaded on first use (analysis, reports) are frozen once they are in (core/heap.py).
        self.heap.freeze()
        self._refreezing = asyncio.create_task(every(REFREEZE_SECONDS, self.heap.refreeze, log, "heap"))
        try:
            yield
        finally:
            await self._stop_parts()

    async def _start_parts(self) -> None:
        if self.telemetry is not None:
            await self.telemetry.start()
        if self.monitor is not None:
            await self.monitor.start()
        if self.cache is not None:
            await asyncio.to_thread(Path(self.settings.server.data_dir).mkdir, parents=True, exist_ok=True)
            await self.cache.start()
        if self.gateway.budgets is not None:
            await self.gateway.budgets.start()
        await self.optimizer.start()
        if self.analysis is not None:
            await self.analysis.start()
        if self.alerts is not None:
            await self.alerts.start()
        # Last: the first sync applies the cluster's documents to the parts started above.
        if self.shared is not None:
            await self.shared.start()
        if self.leadership is not None:
            await self.leadership.start()

        if self.monitor is not None:
            self._settling = asyncio.create_task(self._settle(self.monitor))

    async def _settle(self, monitor: Monitor) -> None:
        # The CPU KPI is the gateway's load: it counts once start-up work (the embedding model) is over.
        if self.cache is not None:
            await self.cache.semantic_started(within=600.0)
        monitor.collector.started()

    async def _stop_parts(self) -> None:
        if self.leadership is not None:
            await self.leadership.close()  # released: another worker takes over at once
        if self._settling is not None:
            self._settling.cancel()
        if self._refreezing is not None:
            self._refreezing.cancel()
        if self.alerts is not None:
            await self.alerts.close()
        if self.analysis is not None:
            await self.analysis.close()
        await self.optimizer.close()
        if self.gateway.budgets is not None:
            await self.gateway.budgets.close()
        if self.cache is not None:
            await self.cache.close()
        if self.monitor is not None:
            await self.monitor.close()
            mark_worker_gone()
        if self.telemetry is not None:
            await self.telemetry.close()
        if self.shared is not None:
            await self.shared.close()  # last: the parts above publish until they stop
        await self.router.aclose()


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


def create_app(settings: Settings) -> IrosApp:
    check_settings(settings)
    server = settings.server
    data_dir = Path(server.data_dir)
    keyring = KeyRing(settings.auth, Sessions.for_data_dir(data_dir))
    admission = Admission(server.max_concurrency, server.max_queue, server.queue_timeout_seconds)
    # Every worker of every replica in step (iros/state/): live settings, rules, alert state, rate
    # limits, the live numbers; one evaluator of alert and optimizer rules, elected by a lease.
    backend = build_state(settings)
    shared = SharedState(backend)
    intervals = [settings.optimization.auto_optimization.evaluation_interval_seconds]
    if settings.alerting.enabled and settings.metrics_collection.enabled:
        intervals.append(settings.alerting.evaluation_interval_seconds)
    leadership = Leadership(backend, "evaluator", ttl=min(intervals))
    monitor = Monitor(settings, admission, shared=shared) if settings.metrics_collection.enabled else None
    cache = None
    if settings.cache.enabled:
        # Each embedding call's time becomes the `embedding` stage of bottleneck analysis.
        note_stage = monitor.collector.note_stage if monitor is not None else None
        cache = build_cache(settings.cache, data_dir, note_stage)
        if monitor is not None:
            cache.on_skip = monitor.exposition.cache_skipped.inc
        # One calibration for every worker: each judges outcomes on its own traffic, all cut on them all.
        cache.verification.share_outcome = SharedCalibration(cache.calibration, shared).publish
    # The live settings the tuning API and the optimizer change; selection reads its preferences there.
    tuning = Tuning(settings, admission, cache)
    for name in KNOBS:
        if tuning.available(name):
            shared.register(
                f"tuning:{name}", partial(tuning.shared_value, name), partial(tuning.apply_shared, name)
            )

    async def share_tuning(source: str, changed: dict[str, dict[str, object]]) -> None:
        for name in changed:
            await shared.publish(f"tuning:{name}")

    tuning.listeners.append(share_tuning)
    router = Router(
        settings.models,
        optimization=settings.optimization,
        live=tuning,
        queue_timeout=server.queue_timeout_seconds,
    )
    limiter = RateLimiter(
        settings.auth.burst,
        shared=backend,
        workers=monitor.cluster.workers if monitor is not None else lambda: 1,  # for limit / N
        on_fallback=monitor.exposition.state_fallbacks.inc if monitor is not None else None,
    )
    # What each key spends (the ledger in data_dir, shared by a host's workers) against its budget.
    on_share = None
    if monitor is not None:
        gauge = monitor.collector.gauge

        def on_share(key: str, share: float) -> None:
            gauge("budget_used_ratio", (("key", key),), share)

    budgets = Budgets(keyring.budgets, SQLiteSpendStore(data_dir / "spend.db"), on_share)
    # OpenTelemetry only when the standard OTEL_* variables ask for it: otherwise the SDK is not imported.
    otel_env = OtelEnv.read(os.environ)
    telemetry = Telemetry(otel_env, settings) if otel_env is not None else None
    tracing = telemetry.start_trace if telemetry is not None and telemetry.traces else None
    gateway = Gateway(
        settings, router, keyring, admission, cache, limiter=limiter, budgets=budgets, tracing=tracing
    )
    if telemetry is not None:
        gateway.observers.append(telemetry.observe)
    if monitor is not None:
        gateway.observers.append(monitor.collector.observe)
    if cache is not None:
        _wire_verification(settings, cache, gateway, monitor)
    optimizer = Optimizer(
        settings, tuning, router, gateway=gateway, monitor=monitor, leadership=leadership, shared=shared
    )

    system = SystemAPI(settings, router, admission, keyring, monitor)
    routes = system.routes()
    analysis = alerts = None
    if monitor is not None:
        routes += MetricsAPI(monitor, keyring).routes()
        routes += FeedbackAPI(monitor, keyring).routes()
        routes += MonitoringAPI(monitor, keyring, cache is not None).routes()
        routes += MetricsLiveAPI(monitor, keyring).routes()
        if settings.alerting.enabled:
            # Rules over the live KPIs, notifications through channels; every live message (/ws/metrics,
            # SSE) carries the active alerts, and transitions go out as they happen.
            alerts = AlertEngine.build(settings, monitor, leadership=leadership, shared=shared)
            monitor.hub.add_section("alerts", alerts.summary)
            routes += AlertAPI(alerts, keyring).routes()
        # Profiler, bottlenecks, reports (and their scheduler), capacity planning, troubleshooting.
        analysis = AnalysisAPI(settings, monitor, gateway, keyring, optimizer)
        routes += analysis.routes()
    if cache is not None:
        routes += CacheTuningAPI(gateway, cache, tuning, keyring).routes()
    routes += OptimizationAPI(optimizer, keyring).routes()
    routes += OptimizationComparisonAPI(optimizer, keyring).routes()
    workers = monitor.cluster.workers if monitor is not None else lambda: 1
    routes += StateAPI(shared, leadership, tuning, workers, keyring).routes()
    # The dashboard: its page, login form and assets; its session cookie works on every route.
    routes += DashboardPages(keyring, secure_cookie=server.secure_cookie).routes()
    return IrosApp(
        settings,
        gateway,
        routes,
        monitor=monitor,
        cache=cache,
        optimizer=optimizer,
        analysis=analysis,
        alerts=alerts,
        telemetry=telemetry,
        shared=shared,
        leadership=leadership,
    )


def _wire_verification(
    settings: Settings, cache: ResponseCache, gateway: Gateway, monitor: Monitor | None
) -> None:
    """The cache's verification: its judge model asked through the gateway, its figures in /metrics
    and as KPIs (the default cache_false_hit_rate_above_bound alert reads them)."""
    judge = settings.cache.verification.judge_model
    if settings.cache.verification.judge == "model" and judge is not None:

        async def ask(prompt: str) -> str:
            return await gateway.ask(judge, prompt)

        cache.verification.ask = ask
    if monitor is None:
        return
    from iros.cache.exposition import VerificationCollector

    monitor.exposition.registry.register(VerificationCollector(cache))

    def upper() -> float | None:
        pooled = cache.verification_report()
        return pooled["interval"][1] if pooled.get("trusted") else None

    monitor.extra_kpis["cache_false_hit_rate_upper"] = upper
    monitor.extra_kpis["cache_max_false_hit_rate"] = lambda: cache.calibration.delta


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
