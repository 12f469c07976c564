"""Which deployment serves a request. A client names a model, a group (`group:` in the model settings)
or `auto` (every model); the selector ranks the models, and each model's deployments (every configured
entry of one name is a deployment of it) are balanced by load and latency.

router = Router(settings.models, optimization=settings.optimization, live=tuning)
for deployment in router.candidates("chat"):      # the first to try at the head, fallbacks after
    ...

Each deployment has a circuit breaker and a concurrency limit with a bounded queue (`max_connections`,
`max_queue` in its model settings).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from iros.backends import build_backend
from iros.backends.base import Backend
from iros.config import ModelSettings, OptimizationSettings
from iros.core.admission import Admission
from iros.core.errors import IrosError
from iros.core.record import RequestRecord
from iros.routing.breaker import CircuitBreaker
from iros.routing.selection import Ewma, Preferences, Selector

AUTO = "auto"


@dataclass
class _Defaults:
    # Preferences when no live tuning object is given (tests, tools).
    prefer_speed: bool = False
    quality_threshold: float | None = None
    lightweight_only: bool = False


@dataclass(slots=True)
class Deployment:
    name: str  # the model name clients use
    index: int  # position among that model's deployments
    settings: ModelSettings
    backend: Backend
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    slots: Admission | None = None
    latency_ms: Ewma = field(default_factory=lambda: Ewma(0.2))
    in_flight: int = 0

    @property
    def label(self) -> str:
        return f"{self.name}#{self.index}"

    @property
    def queued(self) -> int:
        return self.slots.queued if self.slots is not None else 0

    def cost(self) -> float:
        """Expected wait if sent here now: requests ahead of it times its typical latency."""
        return (self.in_flight + self.queued + 1) * (self.latency_ms.value or 1.0)


class Router:
    def __init__(
        self,
        models: Sequence[ModelSettings],
        factory: Callable[[ModelSettings], Backend] = build_backend,
        *,
        optimization: OptimizationSettings | None = None,
        live: Preferences | None = None,
        queue_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.optimization = optimization or OptimizationSettings()
        self.rng = rng or random.Random()
        breaker = self.optimization.circuit_breaker
        self.deployments: dict[str, list[Deployment]] = {}
        self.groups: dict[str, list[str]] = {}
        for m in models:
            group = self.deployments.setdefault(m.name, [])
            slots = Admission(m.max_connections, m.max_queue, queue_timeout)
            cb = CircuitBreaker(
                breaker.failure_threshold, breaker.window_seconds, breaker.open_seconds, clock
            )
            group.append(Deployment(m.name, len(group), m, factory(m), cb, slots))
            if m.group and m.name not in self.groups.setdefault(m.group, []):
                self.groups[m.group].append(m.name)
        self.selector = Selector(
            models, self.optimization.model_optimization, live or _Defaults(), clock, self.rng
        )
        self._labels = {d.label: d for d in self.all()}

    @property
    def names(self) -> list[str]:
        return list(self.deployments)

    def all(self) -> Iterator[Deployment]:
        for group in self.deployments.values():
            yield from group

    def by_label(self, label: str | None) -> Deployment | None:
        return self._labels.get(label) if label else None

    def resolve(self, target: str) -> list[str]:
        """The models that may serve `target`: a model name wins over a group of the same name."""
        if target in self.deployments:
            return [target]
        members = self.groups.get(target)
        if members is not None:
            return members
        if target == AUTO:
            return self.names
        known = ", ".join([*self.names, *(f"{g} (group)" for g in self.groups), f"{AUTO} (all)"])
        raise IrosError(
            404,
            f"the model {target!r} does not exist; known: {known} (GET /v1/models lists them)",
            param="model",
            code="model_not_found",
        )

    def candidates(self, target: str, min_accuracy: float | None = None) -> list[Deployment]:
        """Every deployment that may serve `target`, the one to try first at the head. A group or auto
        request may ask for `min_accuracy`: models whose accuracy estimate is below it come last."""
        names = self.resolve(target)
        if len(names) > 1:
            names = self.selector.rank(names, min_accuracy)
        elif names:
            self.selector.stats[names[0]].selected += 1
        out: list[Deployment] = []
        for name in names:
            out += self.balance(self.deployments[name])
        return out

    def balance(self, group: list[Deployment]) -> list[Deployment]:
        """A model's deployments in the order to try them: closed breakers first, then by load."""
        if len(group) == 1:
            return group
        options = self.optimization.model_optimization
        usable = [d for d in group if d.breaker.state != "open"]
        tripped = [d for d in group if d.breaker.state == "open"]
        if not options.load_balancing:
            return usable + tripped
        if options.balancing == "least_in_flight":
            usable.sort(key=lambda d: (d.in_flight + d.queued, d.latency_ms.value or 0.0))
            return usable + tripped
        # Power of two choices: two at random, the cheaper first; the rest by cost after them.
        if len(usable) >= 2:
            a, b = self.rng.sample(usable, 2)
            first = a if a.cost() <= b.cost() else b
            usable.remove(first)
            usable.sort(key=Deployment.cost)
            usable.insert(0, first)
        return usable + tripped

    def observe(self, record: RequestRecord) -> None:
        """Feed what the answering deployment took (a gateway RequestRecord) to its latency average
        and the selector; a gateway observer, so it runs when the request ends."""
        if record.status != 200 or record.coalesced or not record.upstream_start_ns:
            return
        deployment = self.by_label(record.deployment)
        end = record.last_chunk_ns or record.upstream_end_ns
        if deployment is None or not end:
            return
        upstream_ms = (end - record.upstream_start_ns) / 1e6
        deployment.latency_ms.add(upstream_ms)
        ttft = tpot = None
        if record.first_chunk_ns:
            ttft = (record.first_chunk_ns - record.upstream_start_ns) / 1e6
            tokens = record.usage.get("completion_tokens") or record.chunks
            if tokens > 1 and record.last_chunk_ns:
                tpot = (record.last_chunk_ns - record.first_chunk_ns) / 1e6 / (tokens - 1)
        self.selector.success(deployment.name, upstream_ms, ttft, tpot)

    def status(self) -> dict[str, Any]:
        return {
            "models": self.selector.status(),
            "groups": self.groups,
            "deployments": {
                d.label: {
                    "model": d.name,
                    "in_flight": d.in_flight,
                    "queued": d.queued,
                    "max_connections": d.settings.max_connections,
                    "latency_ms_avg": None if d.latency_ms.value is None else round(d.latency_ms.value, 3),
                    "breaker": d.breaker.status(),
                }
                for d in self.all()
            },
        }

    async def aclose(self) -> None:
        for d in self.all():
            await d.backend.aclose()


def take_min_accuracy(data: dict[str, Any]) -> float | None:
    """Take the routing hint `{"iros": {"min_accuracy": 0.9}}` out of the body (the rest of `iros` is
    the cache's): the least accuracy a model answering a group or `auto` request must have."""
    options = data.get("iros")
    if not isinstance(options, dict) or "min_accuracy" not in options:
        return None
    value = options.pop("min_accuracy")
    if not options:
        del data["iros"]
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise IrosError(
            400, "iros.min_accuracy: a number from 0 to 1", param="iros.min_accuracy", code="invalid_value"
        )
    return float(value)
