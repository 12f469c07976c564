"""The seed's analysis API, /api/analysis/*: profiler, bottlenecks, reports, capacity planning,
troubleshooting, the comparisons of models and of optimizations, the cache's hit patterns and
efficiency, and costs (the spend ledger, by key or model).

All of it needs the admin key: it shows every tenant's traffic and runs requests on the server's behalf.

api = AnalysisAPI(settings, monitor, gateway, keyring, optimizer)
routes += api.routes(); await api.start() ... await api.close()     # the report scheduler
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iros.analysis import bottlenecks, capacity, reports, troubleshoot
from iros.analysis.profiler import RequestProfiler
from iros.api.base import AdminAPI
from iros.api.params import duration_param, limit_param, time_param
from iros.cache.engine import ResponseCache
from iros.config import Settings
from iros.core.errors import IrosError, bad
from iros.core.timefmt import iso
from iros.gateway.auth import KeyRing
from iros.gateway.pipeline import Gateway
from iros.metrics.monitor import Monitor
from iros.optimization.optimizer import Optimizer

MAX_BODY = 64 * 1024
MAX_SPAN = 400 * 86400.0  # the longest window any view reads
MAX_COMPARED = 1000  # optimizations per comparison


class AnalysisAPI(AdminAPI):
    def __init__(
        self,
        settings: Settings,
        monitor: Monitor,
        gateway: Gateway,
        keyring: KeyRing,
        optimizer: Optimizer | None = None,
    ) -> None:
        super().__init__(keyring)
        self.settings = settings
        self.monitor = monitor
        self.store = monitor.store
        self.gateway = gateway
        self.cache = gateway.cache
        self.optimizer = optimizer
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
        routes: list[BaseRoute] = [
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
            Route("/api/analysis/costs", self.costs, methods=get),
        ]
        if self.cache is not None:
            routes += [
                Route(f"{perf}/cache", self.cache_performance, methods=get),
                Route("/api/analysis/cache/hit-patterns", self.hit_patterns, methods=get),
                Route("/api/analysis/cache/efficiency", self.efficiency, methods=get),
            ]
        return routes

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
        end = time_param(params["end"], "end") if params.get("end") else time.time()
        if params.get("start"):
            start = time_param(params["start"], "start")
        else:
            start = end - (
                duration_param(params["window"], "window") if params.get("window") else default_span
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
        cache = self.cache
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
        spend = self.gateway.budgets.store if self.gateway.budgets is not None else None
        return await reports.build_report(
            kind, self.store, end, self.settings.performance_targets, self.gateway.admission.limit, spend
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
            time_param(request.query_params["end"], "end") if request.query_params.get("end") else time.time()
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
        audit = self.optimizer.compare if self.optimizer is not None else None
        out = await troubleshoot.optimizations(self.store, start, end, audit)
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

    # --- cache --------------------------------------------------------------------------------
    def _cache(self) -> ResponseCache:
        assert self.cache is not None  # the cache routes exist only with the cache on
        return self.cache

    async def cache_performance(self, request: Request) -> Response:
        self._admin(request)
        stats = await self._cache().stats()
        target = self.settings.performance_targets.get("cache_hit_rate")
        findings = []
        rate = stats["hit_rate"]
        if rate is not None and target is not None:
            if rate < target.critical_threshold:
                findings.append(
                    f"hit rate {rate:.1%} is under the critical line {target.critical_threshold:.0%}"
                )
            elif rate < target.target:
                findings.append(f"hit rate {rate:.1%} is under the target {target.target:.0%}")
        if stats["verifier_rejections"] and stats["semantic_hits"] is not None:
            findings.append(
                f"the verifier turned down {stats['verifier_rejections']} semantic candidates above the "
                f"threshold (served {stats['semantic_hits']})"
            )
        evictions = (stats.get("store") or {}).get("evictions")
        if evictions:
            findings.append(f"evictions so far: {evictions}; a larger max_memory_mb keeps more answers")
        return JSONResponse(
            {
                "hit_rate": rate,
                "target": target.model_dump() if target else None,
                "stats": stats,
                "findings": findings,
            }
        )

    async def hit_patterns(self, request: Request) -> Response:
        self._admin(request)
        cache = self._cache()
        by_hour: dict[str, dict[str, int]] = {}
        for (hour, kind), n in sorted(cache.hits_by_hour.items()):
            slot = by_hour.setdefault(iso(hour * 3600), {})
            slot[kind] = n
        top: list[dict[str, Any]] = []
        by_model: dict[str, int] = {}
        for key, hits in cache.top.most_common(10):
            entry = await cache.store.get(key)
            if entry is not None:
                top.append({"prompt": entry.prompt[:200], "model": entry.model, "hits": hits})
                by_model[entry.model] = by_model.get(entry.model, 0) + hits
        bins = [round(i * 0.05, 2) for i in range(20)]
        return JSONResponse(
            {
                "by_hour": by_hour,
                "by_kind": {"exact": cache.counts["hit"], "semantic": cache.counts["semantic_hit"]},
                "by_model_top_entries": by_model,
                "top_entries": top,
                "similarity_distribution": {
                    "bin_starts": bins,
                    **{k: v.tolist() for k, v in cache.similarity_bins.items()},
                },
                "similarity_threshold": cache.threshold,
            }
        )

    async def efficiency(self, request: Request) -> Response:
        self._admin(request)
        cache = self._cache()
        stats = await cache.stats()
        store = stats.get("store") or {}
        entries, size = store.get("entries") or 0, store.get("bytes") or 0
        price = cache.settings.token_cost_per_1k
        hits = stats["exact_hits"] + stats["semantic_hits"]
        return JSONResponse(
            {
                "hit_rate": stats["hit_rate"],
                "hits": hits,
                "tokens_saved": cache.saved_tokens,
                "time_saved_seconds": round(cache.saved_ms / 1000, 3),
                "cost_saved": round(cache.saved_tokens / 1000 * price, 6) if price is not None else None,
                "entries": entries,
                "bytes": size,
                "bytes_per_entry": round(size / entries, 1) if entries else None,
                "evictions": store.get("evictions"),
                "expirations": store.get("expirations"),
                # The semantic cache's own error rate: estimate, interval, verified count, cut per scope.
                "verification": stats["verification"],
            }
        )

    async def costs(self, request: Request) -> Response:
        """?start=&end= (or ?window=, default 30d) &group_by=key|model: cost, savings, requests and tokens
        from the spend ledger, costliest first, with each budgeted key's state."""
        self._admin(request)
        group_by = request.query_params.get("group_by", "key")
        if group_by not in ("key", "model"):
            raise bad("group_by is key or model", "group_by")
        start, end = self._range(request, 30 * 86400.0)
        budgets = self.gateway.budgets
        if budgets is None:
            raise IrosError(404, "cost accounting is not running", code="not_found")
        groups = await budgets.store.totals(start, end, "key" if group_by == "key" else "model")
        return JSONResponse(
            {
                "start": iso(start),
                "end": iso(end),
                "group_by": group_by,
                "cost_usd": round(sum(g["cost_usd"] for g in groups), 8),
                "saved_usd": round(sum(g["saved_usd"] for g in groups), 8),
                "requests": sum(g["requests"] for g in groups),
                "groups": groups,
                "budgets": budgets.status(),
            }
        )


class OptimizationComparisonAPI(AdminAPI):
    """/api/analysis/compare/optimizations: each action's KPIs before and while it held. The optimizer
    keeps its own audit, so this answers with monitoring off too."""

    def __init__(self, optimizer: Optimizer, keyring: KeyRing) -> None:
        super().__init__(keyring)
        self.optimizer = optimizer

    def routes(self) -> list[BaseRoute]:
        return [Route("/api/analysis/compare/optimizations", self.compare, methods=["GET"])]

    async def compare(self, request: Request) -> Response:
        self._admin(request)
        limit = limit_param(request, 100, MAX_COMPARED)
        return JSONResponse({"optimizations": await self.optimizer.compare(limit)})
