"""The hot-changeable values of a running Iros, in one live object: the tuning API and the
auto-optimizer both change them here, and the parts that use them read them here (or are set from here).

tuning = Tuning(settings, admission, cache)          # the parts it changes (cache: None when off)
changed = await tuning.set({"cache.similarity_threshold": 0.85}, source="api")
changed["cache.similarity_threshold"]               # {"before": 0.8, "after": 0.85}
tuning.snapshot()                                   # every value, by name

Every change goes through `set`, which validates it, applies it to the live part and tells the
listeners (the optimizer's audit log records them; the shared state sends it to every other worker).

tuning.shared_value("cache.similarity_threshold")    # {"value": 0.85}: one setting, for the other workers
await tuning.apply_shared("cache.similarity_threshold", {"value": 0.85})  # quietly (audited where made)
"""

from __future__ import annotations

import inspect
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from iros.cache.base import Embedder
from iros.cache.engine import ResponseCache
from iros.config import Settings
from iros.core.admission import Admission
from iros.core.errors import bad

EMBED_MB_PER_TEXT = 8.0  # activations of one text in a MiniLM batch, generously
EMBED_MEMORY_SHARE = 0.1  # share of the memory limit embedding batches may take
CACHE_MEMORY_SHARE = 0.5  # share of the memory limit the cache may take

# Told of every change: (source, {setting: {before, after}}); may be a coroutine function.
Listener = Callable[[str, dict[str, dict[str, Any]]], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class Knob:
    kind: str  # "bool", "number", "optional_number", "int"
    low: float = 0.0
    high: float = math.inf
    needs: str | None = None  # "cache" or "embedder": absent when that part is off


KNOBS: dict[str, Knob] = {
    "models.prefer_speed": Knob("bool"),
    "models.quality_threshold": Knob("optional_number", 0.0, 1.0),
    "models.lightweight_only": Knob("bool"),
    "server.max_concurrency": Knob("int", 1, 1_000_000),
    "resources.cpu_limit": Knob("optional_number", 0.01, 4096),
    "resources.memory_limit_mb": Knob("optional_number", 16, 1e8),
    "cache.similarity_threshold": Knob("number", 0.0, 1.0, "cache"),
    "cache.max_false_hit_rate": Knob("number", 0.001, 0.5, "cache"),
    "cache.max_temperature": Knob("number", 0.0, 2.0, "cache"),
    "cache.ttl_seconds": Knob("optional_number", 1.0, 1e9, "cache"),
    "cache.max_memory_mb": Knob("number", 1.0, 1e7, "cache"),
    "cache.max_entries": Knob("int", 1, 1e9, "cache"),
    "cache.warming": Knob("bool", needs="cache"),
    "embedder.max_batch": Knob("int", 1, 1024, "embedder"),
}


class Tuning:
    def __init__(
        self, settings: Settings, admission: Admission | None = None, cache: ResponseCache | None = None
    ) -> None:
        self.settings = settings
        mo = settings.optimization.model_optimization
        self.prefer_speed = mo.prefer_speed
        self.quality_threshold = mo.quality_threshold
        self.lightweight_only = False
        self.cache_warming = False
        self.cpu_limit: float | None = None
        self.memory_limit_mb: float | None = None
        self.admission = admission
        self.cache = cache
        self.listeners: list[Listener] = []
        # What resource limits scale down from: the configured values.
        self.base_concurrency = settings.server.max_concurrency
        self.base_cache_mb = settings.cache.max_memory_mb
        self.base_batch = settings.cache.embedder.max_batch
        self._affinity = _affinity()
        self.enforced: dict[str, Any] = {}
        self._torch_threads: int | None = None  # the embedder's threads before any CPU limit

    # --- reading ------------------------------------------------------------------------------
    def available(self, name: str) -> bool:
        needs = KNOBS[name].needs
        if needs == "cache":
            return self.cache is not None
        if needs == "embedder":
            return self.cache is not None and self.cache.embedder is not None
        return True

    def _cache(self) -> ResponseCache:
        assert self.cache is not None, "a cache setting used with the cache off (see available())"
        return self.cache

    def _embedder(self) -> Embedder:
        embedder = self._cache().embedder
        assert embedder is not None, "an embedder setting used without one (see available())"
        return embedder

    def get(self, name: str) -> Any:
        match name:
            case "models.prefer_speed":
                return self.prefer_speed
            case "models.quality_threshold":
                return self.quality_threshold
            case "models.lightweight_only":
                return self.lightweight_only
            case "server.max_concurrency":
                return self.admission.limit if self.admission else self.settings.server.max_concurrency
            case "resources.cpu_limit":
                return self.cpu_limit
            case "resources.memory_limit_mb":
                return self.memory_limit_mb
            case "cache.warming":
                return self.cache_warming
            case "cache.similarity_threshold":
                return self._cache().threshold
            case "cache.max_false_hit_rate":
                return self._cache().calibration.delta
            case "cache.max_temperature":
                return self._cache().settings.max_temperature
            case "cache.ttl_seconds":
                return self._cache().settings.ttl_seconds
            case "cache.max_memory_mb":
                return self._cache().settings.max_memory_mb
            case "cache.max_entries":
                return self._cache().settings.max_entries
            case "embedder.max_batch":
                return self._embedder().max_batch
        raise KeyError(name)

    def get_if_available(self, name: str) -> Any:
        return self.get(name) if self.available(name) else None

    def snapshot(self) -> dict[str, Any]:
        return {name: self.get(name) for name in KNOBS if self.available(name)}

    # --- changing -----------------------------------------------------------------------------
    async def set(
        self, changes: dict[str, Any], source: str, *, quiet: bool = False
    ) -> dict[str, dict[str, Any]]:
        """Validate every change first, then apply them all; returns before and after per name.
        `quiet`: tell no listener (a change another worker made, audited and shared there)."""
        values: dict[str, Any] = {}
        for name, value in changes.items():
            knob = KNOBS.get(name)
            if knob is None:
                raise bad(f"unknown setting {name!r}; known: {', '.join(KNOBS)}", name)
            if not self.available(name):
                raise bad(f"{name} cannot be changed: that part is off in the configuration", name)
            values[name] = _check(name, knob, value)
        out: dict[str, dict[str, Any]] = {}
        limits = False
        for name, value in values.items():
            before = self.get(name)
            self._apply(name, value)
            limits |= name in ("cache.ttl_seconds", "cache.max_memory_mb", "cache.max_entries")
            out[name] = {"before": before, "after": self.get(name)}
        if limited := {"resources.cpu_limit", "resources.memory_limit_mb"} & set(values):
            out.update(self._enforce(limited))
            limits = limits or self.cache is not None
        if limits and self.cache is not None:
            s = self.cache.settings
            await self.cache.store.set_limits(s.max_entries, int(s.max_memory_mb * 2**20), s.ttl_seconds)
        changed = {k: v for k, v in out.items() if v["before"] != v["after"]}
        if changed and not quiet:
            for listener in self.listeners:
                result = listener(source, changed)
                if inspect.isawaitable(result):
                    await result
        return out

    # One shared document per setting: changes of two settings made at once on two workers both stand.
    def shared_value(self, name: str) -> dict[str, Any]:
        return {"value": self.get(name)}

    async def apply_shared(self, name: str, body: dict[str, Any]) -> None:
        if self.available(name) and self.get(name) != body.get("value"):
            await self.set({name: body.get("value")}, "shared", quiet=True)

    def _apply(self, name: str, value: Any) -> None:
        match name:
            case "models.prefer_speed":
                self.prefer_speed = value
            case "models.quality_threshold":
                self.quality_threshold = value
            case "models.lightweight_only":
                self.lightweight_only = value
            case "server.max_concurrency":
                if self.admission is not None:
                    self.admission.set_limit(value)
            case "resources.cpu_limit":
                self.cpu_limit = value
            case "resources.memory_limit_mb":
                self.memory_limit_mb = value
            case "cache.similarity_threshold":
                self._cache().threshold = value
            case "cache.max_false_hit_rate":
                self._cache().set_max_false_hit_rate(value)
            case "cache.max_temperature":
                self._cache().settings.max_temperature = value
            case "cache.ttl_seconds":
                self._cache().settings.ttl_seconds = value
            case "cache.max_memory_mb":
                self._cache().settings.max_memory_mb = value
            case "cache.max_entries":
                self._cache().settings.max_entries = value
            case "cache.warming":
                self.cache_warming = value
            case "embedder.max_batch":
                self._embedder().max_batch = value

    def _enforce(self, limited: Collection[str]) -> dict[str, dict[str, Any]]:
        """Turn the CPU and/or memory limit just set into the settings that hold Iros to them (lifting
        a limit restores the configured values)."""
        out: dict[str, dict[str, Any]] = {}

        def put(name: str, value: Any) -> None:
            if self.available(name):
                before = self.get(name)
                self._apply(name, value)
                out[name] = {"before": before, "after": self.get(name)}

        cores = len(self._affinity) if self._affinity else os.cpu_count() or 1
        enforced: dict[str, Any] = dict(self.enforced)
        torch = sys.modules.get("torch")  # loaded only when the local embedder is
        if "resources.cpu_limit" in limited:
            if self._torch_threads is None and torch is not None:
                self._torch_threads = torch.get_num_threads()
            if self.cpu_limit is not None:
                share = min(1.0, self.cpu_limit / cores)
                # Requests served at once scale with the CPU share; the process runs on that many cores.
                put("server.max_concurrency", max(1, math.floor(self.base_concurrency * share)))
                allowed = max(1, math.ceil(self.cpu_limit))
                enforced["cpu_cores"] = _set_affinity(self._affinity[:allowed] if self._affinity else None)
                threads = min(allowed, self._torch_threads or allowed)
            else:
                put("server.max_concurrency", self.base_concurrency)
                enforced["cpu_cores"] = _set_affinity(self._affinity or None)
                threads = self._torch_threads or 0
            if torch is not None and threads:
                torch.set_num_threads(threads)
                enforced["embedding_threads"] = threads
        if "resources.memory_limit_mb" in limited:
            if self.memory_limit_mb is not None:
                put("cache.max_memory_mb", min(self.base_cache_mb, self.memory_limit_mb * CACHE_MEMORY_SHARE))
                batch = int(self.memory_limit_mb * EMBED_MEMORY_SHARE / EMBED_MB_PER_TEXT)
                put("embedder.max_batch", max(1, min(self.base_batch, batch)))
            else:
                put("cache.max_memory_mb", self.base_cache_mb)
                put("embedder.max_batch", self.base_batch)
        enforced.update(
            {
                "max_concurrency": self.get("server.max_concurrency"),
                "cache_max_memory_mb": self.get_if_available("cache.max_memory_mb"),
                "embedding_batch_size": self.get_if_available("embedder.max_batch"),
                "at": time.time(),
            }
        )
        self.enforced = enforced
        return out


def _check(name: str, knob: Knob, value: Any) -> Any:
    if knob.kind == "bool":
        if not isinstance(value, bool):
            raise bad(f"{name}: true or false", name)
        return value
    if value is None and knob.kind == "optional_number":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not knob.low <= value <= knob.high:
        raise bad(f"{name}: a number from {knob.low:g} to {knob.high:g}", name)
    if knob.kind == "int":
        if value != int(value):
            raise bad(f"{name}: a whole number", name)
        return int(value)
    return float(value)


def _affinity() -> list[int]:
    getter = getattr(os, "sched_getaffinity", None)
    return sorted(getter(0)) if getter is not None else []


def _set_affinity(cores: list[int] | None) -> list[int] | None:
    setter = getattr(os, "sched_setaffinity", None)
    if setter is None or not cores:
        return None
    try:
        setter(0, cores)
    except OSError:
        return None
    return cores


def precision_floor(cache: ResponseCache) -> float:
    """The precision tuning may never go under: the configured floor, or 1 - δ where that is higher."""
    return max(cache.settings.precision_floor, 1.0 - cache.calibration.delta)


def floor_threshold(cache: ResponseCache) -> float:
    """The lowest similarity threshold whose measured precision (the verifier's out-of-domain curve)
    stays at or above the precision floor (precision_floor()); the configured threshold without a
    curve."""
    verifier = cache.verifier
    curve = getattr(verifier, "curve", None) if verifier is not None else None
    if not curve:
        return float(cache.settings.similarity_threshold)
    floor = precision_floor(cache)
    passing = [p["similarity_threshold"] for p in curve if p["precision"] >= floor]
    return float(min(passing)) if passing else 1.0
