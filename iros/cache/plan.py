"""What the cache makes of one request: its exact key, its semantic scope, and what it may do.

plan = cache_plan.plan(settings, request, principal, cache_control)   # None: not cacheable
plan.key        # the exact key: the canonical request (every message, sampling and tool parameter,
                # but nothing that only changes delivery) hashed in the tenant's namespace
plan.context    # the semantic scope: the same without the last user turn's text
plan.prompt     # that turn, matched by meaning

Policy: a request is left alone when the cache is off, the `iros` body extension says `"cache": false`,
or its temperature is above `max_temperature`. `Cache-Control: no-cache` (do not read), `no-store` (do
not write) and `max-age=N` (only entries younger than N s), from the header or `iros.cache`, and
`iros.max_age`/`iros.ttl` tune one request
(`iros.ttl` only up to the operator's `ttl_seconds`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from iros.config import CacheSettings
from iros.core.errors import IrosError
from iros.core.schema import ParsedRequest

__all__ = ["SHARED", "Plan", "plan"]

SHARED = "_shared"  # the namespace of admin-warmed answers, read by every tenant after its own
# Fields that change how an answer is delivered or billed, not what it says: not part of the key.
_DELIVERY = frozenset({"stream", "stream_options", "user", "metadata", "iros", "store", "service_tier"})
_MAX_AGE = re.compile(r"max-age\s*=\s*(\d+)")


@dataclass(slots=True)
class Plan:
    """How the cache treats one request: its keys, and whether it may read and write."""

    namespace: str
    model: str
    base: str  # digest of the canonical request (namespace-free)
    context_base: str  # digest of the same without the last user turn's text
    prompt: str | None  # the last user turn, for semantic matching; None when there is none
    read: bool = True
    write: bool = True
    skipped: bool = False  # the semantic lookup was skipped (embedder behind): the answer is kept exact-only
    max_age: float | None = None  # only entries younger than this (Cache-Control: max-age)
    ttl: float | None = None
    embedding: np.ndarray[Any, Any] | None = field(default=None, repr=False)
    tokens: np.ndarray[Any, Any] | None = field(default=None, repr=False)  # the verifier's projection
    verify: Any = field(default=None, repr=False)  # calibration.Pending: judge the fresh answer against it
    lookup: Any = field(default=None, repr=False)  # asyncio.Task: the semantic lookup, run beside the call

    @property
    def key(self) -> str:
        return _scoped(self.namespace, self.base)

    @property
    def context(self) -> str:
        return _scoped(self.namespace, self.context_base)


def plan(
    settings: CacheSettings, request: ParsedRequest, principal: str, cache_control: str | None
) -> Plan | None:
    """The cache's view of a request, or None when the policy leaves it alone."""
    data = request.data
    options = _options(data.pop("iros", None))
    if not settings.enabled or options.get("cache") is False:
        return None
    temperature = data.get("temperature")
    if isinstance(temperature, int | float) and temperature > settings.max_temperature:
        return None
    read = write = True
    max_age: float | None = None
    for directive in (cache_control or "", str(options.get("cache") or "")):
        lowered = directive.lower()
        if "no-store" in lowered:
            write = False
        if "no-cache" in lowered:
            read = False
        if found := _MAX_AGE.search(lowered):
            max_age = float(found.group(1))
    if isinstance(options.get("max_age"), int | float):
        max_age = float(options["max_age"])
    canonical = {k: v for k, v in data.items() if k not in _DELIVERY}
    if request.operation != "chat":
        # Completions and embeddings are matched exactly, never by meaning; the endpoint is in the key.
        canonical["operation"] = request.operation
    namespace = principal if settings.namespace == "key" else "global"
    messages = canonical.get("messages") or []
    last = messages[-1] if messages else None
    prompt = _text(last) if isinstance(last, dict) and last.get("role") == "user" else None
    if prompt is not None and len(prompt) > settings.semantic_max_chars:
        prompt = None  # past what the embedding model reads: only an exact repeat may be served
    context_view = dict(canonical, messages=[*messages[:-1], {"role": "user"}]) if prompt else canonical
    return Plan(
        namespace=namespace,
        model=request.model,
        base=_digest(canonical),
        context_base=_digest(context_view),
        prompt=prompt,
        read=read,
        write=write,
        max_age=max_age,
        ttl=_ttl(options.get("ttl"), settings.ttl_seconds),
    )


def _ttl(asked: Any, ceiling: float | None) -> float | None:
    """A client's `iros.ttl` may shorten an entry's life, never lengthen it past the operator's."""
    if not isinstance(asked, int | float) or asked <= 0:
        return ceiling
    return float(asked) if ceiling is None else min(float(asked), ceiling)


def _options(raw: Any) -> dict[str, Any]:
    """The `iros` body extension: {"cache": false | "no-cache" | "no-store", "max_age": s, "ttl": s}."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or set(raw) - {"cache", "max_age", "ttl"}:
        raise IrosError(
            400,
            'iros: expected an object with cache (false, "no-cache" or "no-store"), max_age and ttl',
            param="iros",
            code="invalid_value",
        )
    cache = raw.get("cache")
    if cache is not None and cache is not False and cache not in ("no-cache", "no-store"):
        raise IrosError(
            400, 'iros.cache: false, "no-cache" or "no-store"', param="iros.cache", code="invalid_value"
        )
    for name in ("max_age", "ttl"):
        value = raw.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
            raise IrosError(
                400, f"iros.{name}: seconds, 0 or more", param=f"iros.{name}", code="invalid_value"
            )
    return raw


def _text(message: dict[str, Any]) -> str | None:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) == len(content):  # images and audio are not matched by meaning
            return "\n".join(parts)
    return None


def _digest(view: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(view, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _scoped(namespace: str, digest: str) -> str:
    return hashlib.sha256(f"{namespace}\0{digest}".encode()).hexdigest()
