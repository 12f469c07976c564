"""The cache's control and analysis API (admin key): tune, warm, inspect, clear; hit patterns and
efficiency.

PUT  /api/optimization/cache/tune   {target_hit_rate, max_memory_mb, similarity_threshold, ttl}
POST /api/optimization/cache/warm   {"prompts": [...], "model": "...", "params": {...}} | {"from_misses": 20}
GET  /api/optimization/cache        DELETE /api/optimization/cache[?namespace=]
GET  /api/analysis/performance/cache | /api/analysis/cache/hit-patterns | /api/analysis/cache/efficiency
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from iros.auth import AdminAPI, KeyRing
from iros.cache import ResponseCache
from iros.errors import IrosError, bad
from iros.gateway import Gateway
from iros.tuning import Tuning, floor_threshold

TUNE_STEP = 0.02  # how far one tune call moves the similarity threshold toward a target hit rate
MAX_WARM = 1000  # prompts per warm call


class CacheAPI(AdminAPI):
    def __init__(self, gateway: Gateway, keyring: KeyRing) -> None:
        assert gateway.cache is not None
        super().__init__(keyring)
        self.gateway = gateway
        self.cache: ResponseCache = gateway.cache
        # Changes go through the live settings object the optimizer uses too (and is audited by).
        if gateway.tuning is None:
            gateway.tuning = Tuning(gateway.settings)
            gateway.tuning.bind(gateway.admission, gateway.cache)
        self.tuning: Tuning = gateway.tuning

    async def _set(self, changes: dict[str, Any]) -> None:
        await self.tuning.set(changes, "api:cache/tune")

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/api/optimization/cache", self.status, methods=["GET"]),
            Route("/api/optimization/cache", self.clear, methods=["DELETE"]),
            Route("/api/optimization/cache/tune", self.tune, methods=["PUT"]),
            Route("/api/optimization/cache/warm", self.warm, methods=["POST"]),
            Route("/api/analysis/performance/cache", self.performance, methods=["GET"]),
            Route("/api/analysis/cache/hit-patterns", self.hit_patterns, methods=["GET"]),
            Route("/api/analysis/cache/efficiency", self.efficiency, methods=["GET"]),
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
        body = await self._json_object(request)
        known = {"target_hit_rate", "max_memory_mb", "similarity_threshold", "ttl"}
        if unknown := set(body) - known:
            raise bad(f"unknown field {sorted(unknown)[0]!r}; known: {', '.join(sorted(known))}")
        settings = self.cache.settings
        changes: dict[str, Any] = {}
        notes: list[str] = []
        floor = self.floor_threshold()
        if "similarity_threshold" in body:
            value = _number(body, "similarity_threshold", 0.0, 1.0)
            await self._set({"cache.similarity_threshold": value})
            changes["similarity_threshold"] = value
            if value < floor:
                notes.append(
                    f"similarity_threshold {value} is below {floor:.3f}, where the verifier's measured "
                    f"precision falls under the floor {settings.precision_floor}"
                )
        if "target_hit_rate" in body:
            target = _number(body, "target_hit_rate", 0.0, 1.0)
            stats = await self.cache.stats()
            current = stats["hit_rate"]
            before = self.cache.threshold
            if current is None:
                notes.append("no lookups yet: the threshold stays until there is a hit rate to compare")
            elif current < target:
                # More hits means a lower threshold, but never below the precision floor's threshold.
                await self._set({"cache.similarity_threshold": max(round(before - TUNE_STEP, 4), floor)})
                if self.cache.threshold == before:
                    notes.append(
                        f"hit rate {current} is under the target {target}, but the threshold is at the "
                        f"precision floor ({settings.precision_floor}); more hits need more entries "
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
                "precision_floor": settings.precision_floor,
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
        if "from_misses" in body:
            n = body["from_misses"]
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_WARM:
                raise bad(f"from_misses: a count from 1 to {MAX_WARM}", "from_misses")
            jobs = [(model, prompt) for (model, prompt), _ in self.cache.misses.most_common(n)]
        else:
            prompts, model = body.get("prompts"), body.get("model")
            if (
                not isinstance(prompts, list)
                or not prompts
                or not all(isinstance(p, str) and p for p in prompts)
            ):
                raise bad("prompts: a non-empty list of strings (or give from_misses)", "prompts")
            if len(prompts) > MAX_WARM:
                raise bad(f"at most {MAX_WARM} prompts per call", "prompts")
            if not isinstance(model, str) or model not in self.gateway.router.deployments:
                raise bad(f"model: one of {', '.join(self.gateway.router.names)}", "model")
            jobs = [(model, p) for p in prompts]
        began = time.perf_counter()
        results = await asyncio.gather(*(self._warm_one(m, p, params) for m, p in jobs))
        summary: dict[str, int] = {}
        for outcome in results:
            summary[outcome["outcome"]] = summary.get(outcome["outcome"], 0) + 1
        return JSONResponse(
            {"warmed": summary, "results": results, "seconds": round(time.perf_counter() - began, 3)}
        )

    async def _warm_one(self, model: str, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
        try:
            outcome = await self.gateway.warm(model, prompt, params)
            return {"model": model, "prompt": prompt, "outcome": outcome}
        except IrosError as exc:
            return {"model": model, "prompt": prompt, "outcome": "failed", "error": exc.message}

    # --- analysis -----------------------------------------------------------------------------
    async def performance(self, request: Request) -> Response:
        self._admin(request)
        stats = await self.cache.stats()
        target = self.gateway.settings.performance_targets.get("cache_hit_rate")
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
        cache = self.cache
        by_hour: dict[str, dict[str, int]] = {}
        for (hour, kind), n in sorted(cache.hits_by_hour.items()):
            slot = by_hour.setdefault(time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(hour * 3600)), {})
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
        stats = await self.cache.stats()
        store = stats.get("store") or {}
        entries, size = store.get("entries") or 0, store.get("bytes") or 0
        price = self.cache.settings.token_cost_per_1k
        hits = stats["exact_hits"] + stats["semantic_hits"]
        return JSONResponse(
            {
                "hit_rate": stats["hit_rate"],
                "hits": hits,
                "tokens_saved": self.cache.saved_tokens,
                "time_saved_seconds": round(self.cache.saved_ms / 1000, 3),
                "cost_saved": round(self.cache.saved_tokens / 1000 * price, 6) if price is not None else None,
                "entries": entries,
                "bytes": size,
                "bytes_per_entry": round(size / entries, 1) if entries else None,
                "evictions": store.get("evictions"),
                "expirations": store.get("expirations"),
            }
        )


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise bad(f"{name}: a number from {low:g} to {high:g}", name)
    return float(value)
