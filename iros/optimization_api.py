"""Model selection, resource and rule tuning, and the audit of what changed (admin key).

GET  /api/optimization/models                   scores, averages and selection shares per model
PUT  /api/optimization/models/tune              {"prefer_speed": true, "quality_threshold": 0.8}
GET  /api/optimization/resources
PUT  /api/optimization/resources/tune           {"cpu_limit": 4.0, "memory_limit_mb": 4096}
GET  /api/optimization/rules
PUT  /api/optimization/rules                    {"rules": [...], "dry_run": true, "cooldown_seconds": 60}
GET  /api/optimization/settings                 every live setting by name
GET  /api/optimization/audit?limit=100          every change: rule, time, before and after
GET  /api/analysis/compare/optimizations        each action's KPIs before and after
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iros.auth import AdminAPI, KeyRing
from iros.conditions import ConditionError
from iros.config import OptimizationRule
from iros.errors import IrosError, bad, error_path
from iros.optimizer import Optimizer

MAX_AUDIT = 1000
_RULES = TypeAdapter(list[OptimizationRule])


class OptimizationAPI(AdminAPI):
    def __init__(self, optimizer: Optimizer, keyring: KeyRing) -> None:
        super().__init__(keyring)
        self.optimizer = optimizer
        self.tuning = optimizer.tuning
        self.router = optimizer.router

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/api/optimization/models", self.models, methods=["GET"]),
            Route("/api/optimization/models/tune", self.tune_models, methods=["PUT"]),
            Route("/api/optimization/resources", self.resources, methods=["GET"]),
            Route("/api/optimization/resources/tune", self.tune_resources, methods=["PUT"]),
            Route("/api/optimization/rules", self.rules, methods=["GET"]),
            Route("/api/optimization/rules", self.put_rules, methods=["PUT"]),
            Route("/api/optimization/settings", self.live_settings, methods=["GET"]),
            Route("/api/optimization/audit", self.audit, methods=["GET"]),
            Route("/api/analysis/compare/optimizations", self.compare, methods=["GET"]),
        ]

    async def _json(self, request: Request, known: set[str]) -> dict[str, Any]:
        body = await self._json_object(request)
        if unknown := set(body) - known:
            raise bad(f"unknown field {sorted(unknown)[0]!r}; known: {', '.join(sorted(known))}")
        return body

    # --- models -------------------------------------------------------------------------------
    def _models_view(self) -> dict[str, Any]:
        options = self.router.optimization.model_optimization
        return {
            "prefer_speed": self.tuning.prefer_speed,
            "quality_threshold": self.tuning.quality_threshold,
            "lightweight_only": self.tuning.lightweight_only,
            "weights": dict(
                zip(
                    ("response_time_weight", "resource_usage_weight", "accuracy_weight"),
                    (round(w, 4) for w in self.router.selector.weights()),
                    strict=True,
                )
            ),
            "model_optimization": options.model_dump(),
            **self.router.status(),
        }

    async def models(self, request: Request) -> Response:
        self._admin(request)
        return JSONResponse(self._models_view())

    async def tune_models(self, request: Request) -> Response:
        self._admin(request)
        body = await self._json(request, {"prefer_speed", "quality_threshold", "lightweight_only"})
        if not body:
            raise bad("give prefer_speed, quality_threshold or lightweight_only")
        changed = await self.tuning.set({f"models.{k}": v for k, v in body.items()}, "api:models/tune")
        return JSONResponse({"applied": changed, **self._models_view()})

    # --- resources ----------------------------------------------------------------------------
    def _resources_view(self) -> dict[str, Any]:
        monitor = self.optimizer.monitor
        sample = monitor.sampler.latest if monitor is not None else None
        return {
            "cpu_limit": self.tuning.cpu_limit,
            "memory_limit_mb": self.tuning.memory_limit_mb,
            "enforced": self.tuning.enforced
            or {
                "max_concurrency": self.tuning.get("server.max_concurrency"),
                "cache_max_memory_mb": self.tuning._maybe("cache.max_memory_mb"),
                "embedding_batch_size": self.tuning._maybe("embedder.max_batch"),
            },
            "process": None
            if sample is None
            else {
                "cpu_percent": sample.process_cpu_percent,
                "memory_mb": round(sample.process_memory_bytes / 2**20, 1),
            },
        }

    async def resources(self, request: Request) -> Response:
        self._admin(request)
        return JSONResponse(self._resources_view())

    async def tune_resources(self, request: Request) -> Response:
        self._admin(request)
        body = await self._json(request, {"cpu_limit", "memory_limit_mb"})
        if not body:
            raise bad("give cpu_limit (cores) and/or memory_limit_mb; null lifts a limit")
        changed = await self.tuning.set({f"resources.{k}": v for k, v in body.items()}, "api:resources/tune")
        return JSONResponse({"applied": changed, **self._resources_view()})

    # --- rules --------------------------------------------------------------------------------
    async def rules(self, request: Request) -> Response:
        self._admin(request)
        return JSONResponse(self.optimizer.rules_status())

    async def put_rules(self, request: Request) -> Response:
        self._admin(request)
        body = await self._json(request, {"rules", "dry_run", "enabled", "cooldown_seconds"})
        for flag in ("dry_run", "enabled"):
            if flag in body and not isinstance(body[flag], bool):
                raise bad(f"{flag}: true or false", flag)
        cooldown = body.get("cooldown_seconds")
        if "cooldown_seconds" in body and (
            isinstance(cooldown, bool) or not isinstance(cooldown, int | float) or not 0 <= cooldown <= 86400
        ):
            raise bad("cooldown_seconds: a number from 0 to 86400", "cooldown_seconds")
        if "rules" in body:
            if not isinstance(body["rules"], list) or len(body["rules"]) > 100:
                raise bad("rules: a list of at most 100 {name, trigger, actions}", "rules")
            try:
                rules = _RULES.validate_python(body["rules"])
            except ValidationError as exc:
                first = exc.errors()[0]
                where = error_path(("rules", *first["loc"]))
                raise bad(f"{where}: {first['msg']}", "rules") from None
            names = [r.name for r in rules]
            if len(set(names)) != len(names):
                raise bad("rules: each rule needs a name of its own", "rules")
            try:
                await self.optimizer.replace_rules(rules)
            except ConditionError as exc:
                raise bad(f"trigger: {exc.message}", "rules") from None
        if "dry_run" in body:
            await self.optimizer.set_dry_run(body["dry_run"])
        if "enabled" in body:
            self.optimizer.enabled = body["enabled"]
        if "cooldown_seconds" in body:
            self.optimizer.cooldown = float(cooldown)  # type: ignore[arg-type]
        return JSONResponse(self.optimizer.rules_status())

    # --- settings, audit, comparison ----------------------------------------------------------
    async def live_settings(self, request: Request) -> Response:
        self._admin(request)
        return JSONResponse(self.tuning.snapshot())

    def _limit(self, request: Request) -> int:
        raw = request.query_params.get("limit", "100")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_AUDIT:
            raise IrosError(400, f"limit: a whole number from 1 to {MAX_AUDIT}", param="limit")
        return int(raw)

    async def audit(self, request: Request) -> Response:
        self._admin(request)
        return JSONResponse({"entries": await self.optimizer.log.rows(self._limit(request))})

    async def compare(self, request: Request) -> Response:
        self._admin(request)
        return JSONResponse({"optimizations": await self.optimizer.compare(self._limit(request))})
