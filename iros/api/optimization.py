"""Model selection, resource and rule tuning, and the audit of what changed (admin key).

GET  /api/optimization/models                   scores, averages and selection shares per model
PUT  /api/optimization/models/tune              {"prefer_speed": true, "quality_threshold": 0.8}
GET  /api/optimization/resources
PUT  /api/optimization/resources/tune           {"cpu_limit": 4.0, "memory_limit_mb": 4096}
GET  /api/optimization/rules
PUT  /api/optimization/rules                    {"rules": [...], "dry_run": true, "cooldown_seconds": 60}
GET  /api/optimization/settings                 every live setting by name
PUT  /api/optimization/settings                 {"cache.similarity_threshold": 0.85, ...}: by name

What a GET returns, the PUT beside it takes back unchanged: fields it only reports are ignored. Every
change reaches every worker of every replica through the shared state (iros/state/).
GET  /api/optimization/audit?limit=100          every change: rule, time, before and after
PUT  /api/optimization/cache/tune              {max_false_hit_rate, target_hit_rate, max_memory_mb,
                                               similarity_threshold, ttl}
POST /api/optimization/cache/warm              {"prompts": [...], "model": "...", "params": {...}}
                                                or {"from_misses": 20}: 202, the job runs in the background
GET  /api/optimization/cache/warm[/{job_id}]    the jobs' progress (the newest first), or one job's
GET  /api/optimization/cache                   DELETE /api/optimization/cache[?namespace=]

Each action's KPIs before and after are at /api/analysis/compare/optimizations (api/analysis.py).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iros.api.base import AdminAPI
from iros.api.params import limit_param
from iros.cache.engine import ResponseCache
from iros.conditions.parse import ConditionError
from iros.config import OptimizationRule
from iros.core.errors import IrosError, bad, error_path
from iros.core.limits import MAX_NESTING, json_depth
from iros.gateway.auth import KeyRing
from iros.gateway.pipeline import Gateway
from iros.gateway.warming import MAX_PROMPT_CHARS, MAX_PROMPTS, WarmBusy, Warmer, check_prompts
from iros.optimization.optimizer import Optimizer
from iros.optimization.tuning import KNOBS, Tuning, floor_threshold, precision_floor

MAX_AUDIT = 1000
TUNE_STEP = 0.02  # how far one tune call moves the similarity threshold toward a target hit rate
_RULES = TypeAdapter(list[OptimizationRule])
# Reported by GET /api/optimization/rules, ignored by its PUT (per rule, and for the whole body).
_RULE_STATUS = frozenset(
    {"condition", "state", "value", "active", "fired_at", "clear_since", "changes", "error"}
)
_RULES_STATUS = frozenset({"evaluation_interval_seconds", "metrics", "last_evaluation"})
# Reported by GET /api/optimization/cache and the tune answer, ignored by PUT .../cache/tune.
_CACHE_STATUS = frozenset(
    {"enabled", "semantic_ready", "verifier", "lookups", "exact_hits", "semantic_hits", "misses", "hit_rate"}
    | {"verifier_rejections", "saved", "store_errors", "indexed", "store", "applied", "precision_floor"}
    | {"floor_threshold", "notes"}
)


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
            Route("/api/optimization/settings", self.put_settings, methods=["PUT"]),
            Route("/api/optimization/audit", self.audit, methods=["GET"]),
        ]

    async def _json(
        self, request: Request, known: set[str], reported: Collection[str] = ()
    ) -> dict[str, Any]:
        """The body's fields in `known`; those only `reported` by the GET beside it are dropped."""
        body = {
            k: v for k, v in (await self._json_object(request)).items() if k in known or k not in reported
        }
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
        known = {"prefer_speed", "quality_threshold", "lightweight_only"}
        body = await self._json(request, known, {"applied", *self._models_view()})
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
                "cache_max_memory_mb": self.tuning.get_if_available("cache.max_memory_mb"),
                "embedding_batch_size": self.tuning.get_if_available("embedder.max_batch"),
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
        body = await self._json(
            request, {"cpu_limit", "memory_limit_mb"}, {"applied", *self._resources_view()}
        )
        if not body:
            raise bad("give cpu_limit (cores) and/or memory_limit_mb; null lifts a limit")
        # A limit sent back unchanged does not re-derive what it governs (a round trip changes nothing).
        wanted = {f"resources.{k}": v for k, v in body.items()}
        changes = {k: v for k, v in wanted.items() if self.tuning.get(k) != v}
        changed = await self.tuning.set(changes, "api:resources/tune") if changes else {}
        return JSONResponse({"applied": changed, **self._resources_view()})

    # --- rules --------------------------------------------------------------------------------
    async def rules(self, request: Request) -> Response:
        self._admin(request)
        return JSONResponse(self.optimizer.rules_status())

    async def put_rules(self, request: Request) -> Response:
        self._admin(request)
        body = await self._json(request, {"rules", "dry_run", "enabled", "cooldown_seconds"}, _RULES_STATUS)
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
            given = [
                {k: v for k, v in r.items() if k not in _RULE_STATUS} if isinstance(r, dict) else r
                for r in body["rules"]
            ]
            try:
                rules = _RULES.validate_python(given)
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
        await self.optimizer.publish()
        return JSONResponse(self.optimizer.rules_status())

    # --- settings and audit -------------------------------------------------------------------
    async def live_settings(self, request: Request) -> Response:
        self._admin(request)
        return JSONResponse(self.tuning.snapshot())

    async def put_settings(self, request: Request) -> Response:
        self._admin(request)
        body = await self._json_object(request)
        # Only what differs: a resource limit sent back unchanged must not re-derive what it governs.
        changes = {
            k: v
            for k, v in body.items()
            if k not in KNOBS or not self.tuning.available(k) or self.tuning.get(k) != v
        }
        changed = await self.tuning.set(changes, "api:settings") if changes else {}
        return JSONResponse({"applied": changed, "settings": self.tuning.snapshot()})

    async def audit(self, request: Request) -> Response:
        self._admin(request)
        return JSONResponse({"entries": await self.optimizer.log.rows(limit_param(request, 100, MAX_AUDIT))})


class CacheTuningAPI(AdminAPI):
    """/api/optimization/cache*: its changes go through the live settings the optimizer uses (and audits)."""

    def __init__(self, gateway: Gateway, cache: ResponseCache, tuning: Tuning, keyring: KeyRing) -> None:
        super().__init__(keyring)
        self.gateway = gateway
        self.cache = cache
        self.tuning = tuning
        self.warmer = Warmer(gateway)

    async def _set(self, changes: dict[str, Any]) -> None:
        await self.tuning.set(changes, "api:cache/tune")

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/api/optimization/cache", self.status, methods=["GET"]),
            Route("/api/optimization/cache", self.clear, methods=["DELETE"]),
            Route("/api/optimization/cache/tune", self.tune, methods=["PUT"]),
            Route("/api/optimization/cache/warm", self.warm, methods=["POST"]),
            Route("/api/optimization/cache/warm", self.warm_jobs, methods=["GET"]),
            Route("/api/optimization/cache/warm/{job_id}", self.warm_job, methods=["GET"]),
        ]

    async def status(self, request: Request) -> Response:
        self._admin(request)
        return JSONResponse(await self.cache.stats())

    async def clear(self, request: Request) -> Response:
        self._admin(request)
        namespace = request.query_params.get("namespace")
        removed = await self.cache.store.clear(namespace)
        return JSONResponse({"removed": removed, "namespace": namespace})

    # --- tune ---------------------------------------------------------------------------------
    async def tune(self, request: Request) -> Response:
        self._admin(request)
        known = {"max_false_hit_rate", "target_hit_rate", "max_memory_mb", "similarity_threshold", "ttl"}
        # Whatever GET reports besides the settings is read-only here, new counters included.
        reported = (_CACHE_STATUS | set(await self.cache.stats())) - known
        body = {k: v for k, v in (await self._json_object(request)).items() if k not in reported}
        if unknown := set(body) - known:
            raise bad(f"unknown field {sorted(unknown)[0]!r}; known: {', '.join(sorted(known))}")
        changes: dict[str, Any] = {}
        notes: list[str] = []
        if "max_false_hit_rate" in body:
            # δ first: the floor that target_hit_rate may not pass follows from it.
            delta = _number(body, "max_false_hit_rate", 0.001, 0.5)
            await self._set({"cache.max_false_hit_rate": delta})
            changes["max_false_hit_rate"] = delta
        precision = precision_floor(self.cache)
        floor = self.floor_threshold()
        if "similarity_threshold" in body:
            value = _number(body, "similarity_threshold", 0.0, 1.0)
            await self._set({"cache.similarity_threshold": value})
            changes["similarity_threshold"] = value
            if value < floor:
                notes.append(
                    f"similarity_threshold {value} is below {floor:.3f}, where the verifier's measured "
                    f"precision falls under the floor {precision:.3f}; the cut still follows from "
                    "max_false_hit_rate"
                )
        if "target_hit_rate" in body:
            target = _number(body, "target_hit_rate", 0.0, 1.0)
            stats = await self.cache.stats()
            current = stats["hit_rate"]
            before = self.cache.threshold
            measured = self.cache.verification_report()
            if current is None:
                notes.append("no lookups yet: the threshold stays until there is a hit rate to compare")
            elif current < target and measured.get("above_bound"):
                notes.append(
                    f"hit rate {current} is under the target {target}, but the measured false-hit rate's "
                    f"upper bound {measured['interval'][1]} is above max_false_hit_rate "
                    f"{self.cache.calibration.delta}: the threshold stays"
                )
            elif current < target:
                # More hits means a lower threshold, but never below the precision floor's threshold.
                await self._set({"cache.similarity_threshold": max(round(before - TUNE_STEP, 4), floor)})
                if self.cache.threshold == before:
                    notes.append(
                        f"hit rate {current} is under the target {target}, but the threshold is at the "
                        f"precision floor ({precision:.3f}); more hits need more entries "
                        "(warming, longer TTL, more memory), not a looser match"
                    )
            elif current > target + 0.05:
                await self._set({"cache.similarity_threshold": min(round(before + TUNE_STEP, 4), 1.0)})
            changes["target_hit_rate"] = target
            changes["similarity_threshold"] = self.cache.threshold
            changes["hit_rate_before"] = current
        if "max_memory_mb" in body or "ttl" in body:
            limits: dict[str, Any] = {}
            if "max_memory_mb" in body:
                limits["cache.max_memory_mb"] = changes["max_memory_mb"] = _number(
                    body, "max_memory_mb", 1.0, 1e7
                )
            if "ttl" in body:
                ttl = body["ttl"]
                if ttl is not None:
                    ttl = _number(body, "ttl", 1.0, 1e9)
                limits["cache.ttl_seconds"] = changes["ttl"] = ttl
            await self._set(limits)  # the live settings object applies the store's new limits
        return JSONResponse(
            {
                "applied": changes,
                "similarity_threshold": self.cache.threshold,
                "precision_floor": precision,
                "max_false_hit_rate": self.cache.calibration.delta,
                "floor_threshold": floor,
                "notes": notes,
            }
        )

    def floor_threshold(self) -> float:
        """The lowest similarity threshold whose measured precision (the verifier's cross-validation
        curve) stays at or above the precision floor; the configured threshold without a curve."""
        return floor_threshold(self.cache)

    # --- warm ---------------------------------------------------------------------------------
    async def warm(self, request: Request) -> Response:
        self._admin(request)
        body = await self._json_object(request)
        params = body.get("params") or {}
        if not isinstance(params, dict) or "messages" in params or "model" in params or "stream" in params:
            raise bad("params: an object of request parameters (temperature, max_tokens, ...)", "params")
        if json_depth(params) > MAX_NESTING:
            raise bad(f"params nests JSON more than {MAX_NESTING} levels deep", "params", "nesting_too_deep")
        if "from_misses" in body:
            n = body["from_misses"]
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PROMPTS:
                raise bad(f"from_misses: a count from 1 to {MAX_PROMPTS}", "from_misses")
            # Misses too long to warm are passed over, not refused: the client sent them, not the admin.
            misses = self.cache.misses.most_common()
            jobs = [(m, p) for (m, p), _ in misses if len(p) <= MAX_PROMPT_CHARS][:n]
        else:
            prompts, model = body.get("prompts"), body.get("model")
            if (
                not isinstance(prompts, list)
                or not prompts
                or not all(isinstance(p, str) and p for p in prompts)
            ):
                raise bad("prompts: a non-empty list of strings (or give from_misses)", "prompts")
            if not isinstance(model, str) or model not in self.gateway.router.deployments:
                raise bad(f"model: one of {', '.join(self.gateway.router.names)}", "model")
            jobs = [(model, p) for p in prompts]
        if problem := check_prompts(jobs):
            raise bad(problem, "prompts")
        try:
            job = self.warmer.start(jobs, params)
        except WarmBusy as exc:
            raise IrosError(
                409,
                f"cache warm {exc} is still running: follow it at /api/optimization/cache/warm/{exc}",
                code="warm_running",
            ) from None
        return JSONResponse(
            {**job.view(results=False), "progress": f"/api/optimization/cache/warm/{job.id}"}, status_code=202
        )

    async def warm_jobs(self, request: Request) -> Response:
        self._admin(request)
        jobs = reversed(self.warmer.jobs.values())
        return JSONResponse({"jobs": [job.view(results=False) for job in jobs]})

    async def warm_job(self, request: Request) -> Response:
        self._admin(request)
        job = self.warmer.get(request.path_params["job_id"])
        if job is None:
            raise IrosError(
                404, "no such cache warm job (the last 10 are kept)", param="job_id", code="not_found"
            )
        return JSONResponse(job.view())


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise bad(f"{name}: a number from {low:g} to {high:g}", name)
    return float(value)
