"""Per-key rate limits for the model API: one token bucket per key that has a rate, for the whole
cluster when the workers share state.

limiter = RateLimiter(burst=None, shared=backend, workers=lambda: 4)
await limiter.check(principal)  # raises IrosError(429) with Retry-After when the key is over its rate

With a shared state backend the bucket is the backend's (`take`: one Lua script in Redis, an flock'd
file with `local`), so the limit holds across workers and replicas. While the backend cannot be reached
each worker enforces limit/N from a bucket of its own (N: the workers the cluster had when last seen),
counts it (`fallbacks`, the on_fallback callback: a metric) and logs the outage once; a request is never
failed for it. For `recheck` seconds after a failure the backend is not asked, so requests do not each
wait out its timeout. Requests for one key that arrive while its call is out share the next call (one
script takes n tokens, handed out in arrival order): under load a key costs one round trip per batch.

Buckets exist only for configured keys (the key ring is fixed at start), so their number is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from iros.core.errors import IrosError
from iros.gateway.auth import Principal
from iros.state.base import StateBackend, StateUnavailable

log = logging.getLogger("iros.ratelimit")

RECHECK_SECONDS = 1.0


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(
        self,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        shared: StateBackend | None = None,
        workers: Callable[[], int] = lambda: 1,
        on_fallback: Callable[[], None] | None = None,
    ) -> None:
        self.burst = burst
        self.clock = clock
        self.shared = shared
        self.workers = workers
        self.on_fallback = on_fallback
        self._buckets: dict[str, _Bucket] = {}
        self.limited = 0  # requests refused, for the status page
        self.fallbacks = 0  # requests decided by this worker alone because the shared state was down
        self._down_until = 0.0
        self._down = False
        self._busy: set[str] = set()  # keys with a call to the shared bucket out
        self._waiting: dict[str, list[asyncio.Future[float]]] = {}  # ... and the requests for the next
        self._drains: set[asyncio.Task[None]] = set()

    def _capacity(self, per_second: float) -> float:
        # A client that sends at its rate never waits; bursts beyond one second of it do.
        return float(self.burst) if self.burst else max(1.0, per_second)

    async def check(self, principal: Principal) -> None:
        rpm = principal.requests_per_minute
        if rpm is None:
            return
        per_second = rpm / 60.0
        capacity = self._capacity(per_second)
        if self.shared is not None:
            if self.clock() >= self._down_until:
                try:
                    wait = await self._take(f"rate:{principal.name}", per_second, capacity)
                except StateUnavailable as exc:
                    self._went_down(exc)
                else:
                    if self._down:
                        self._down = False
                        log.warning("rate limits: shared buckets reachable again; limits are cluster-wide")
                    if wait > 0:
                        self._refuse(rpm, wait)
                    return
            # The cluster's share of this worker: limit / N, from a bucket of its own.
            self.fallbacks += 1
            if self.on_fallback is not None:
                self.on_fallback()
            n = max(1, self.workers())
            per_second, capacity = per_second / n, max(1.0, capacity / n)
        self._take_local(principal.name, rpm, per_second, capacity)

    async def _take(self, key: str, per_second: float, capacity: float) -> float:
        """0.0 when a token was taken from the shared bucket, else the seconds until one is there."""
        assert self.shared is not None
        if key in self._busy:
            waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(key, []).append(waiter)
            return await waiter
        self._busy.add(key)
        try:
            taken, wait = await self.shared.take(key, per_second, capacity)
        finally:
            if self._waiting.get(key):
                task = asyncio.get_running_loop().create_task(self._drain(key, per_second, capacity))
                self._drains.add(task)  # held: the loop keeps only a weak reference
                task.add_done_callback(self._drains.discard)
            else:
                self._busy.discard(key)
        return 0.0 if taken else wait

    async def _drain(self, key: str, per_second: float, capacity: float) -> None:
        """Serve the requests that queued behind a call, n at a time, until none are left."""
        assert self.shared is not None
        try:
            while waiters := self._waiting.pop(key, None):
                try:
                    taken, wait = await self.shared.take(key, per_second, capacity, len(waiters))
                except StateUnavailable as exc:
                    for w in waiters:
                        if not w.done():
                            w.set_exception(exc)
                    continue
                for i, w in enumerate(waiters):
                    if not w.done():
                        w.set_result(0.0 if i < taken else wait)
        finally:
            self._busy.discard(key)

    def _went_down(self, exc: Exception) -> None:
        self._down_until = self.clock() + RECHECK_SECONDS
        if not self._down:
            self._down = True
            log.warning(
                "rate limits: shared buckets unavailable (%s); each worker enforces limit / %d until they "
                "answer again",
                exc,
                max(1, self.workers()),
            )

    def _take_local(self, name: str, rpm: float, per_second: float, capacity: float) -> None:
        now = self.clock()
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = _Bucket(capacity, now)
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * per_second)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return
        self._refuse(rpm, (1.0 - bucket.tokens) / per_second)

    def _refuse(self, rpm: float, wait_seconds: float) -> None:
        self.limited += 1
        wait = max(1, math.ceil(wait_seconds))
        raise IrosError(
            429,
            f"rate limit of {rpm:g} requests per minute for this key reached; retry in {wait} s",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"retry-after": str(wait)},
        )
