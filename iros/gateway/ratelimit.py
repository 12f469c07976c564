"""Per-key rate limits for the model API: a token bucket for each key that has a rate.

limiter = RateLimiter(burst=None)
limiter.check(principal)        # raises IrosError(429) with Retry-After when the key is over its rate

Buckets exist only for configured keys (the key ring is fixed at start), so their number is bounded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from iros.core.errors import IrosError
from iros.gateway.auth import Principal


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, burst: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self.limited = 0  # requests refused, for the status page

    def _capacity(self, per_second: float) -> float:
        # A client that sends at its rate never waits; bursts beyond one second of it do.
        return float(self.burst) if self.burst else max(1.0, per_second)

    def check(self, principal: Principal) -> None:
        rpm = principal.requests_per_minute
        if rpm is None:
            return
        per_second = rpm / 60.0
        capacity = self._capacity(per_second)
        now = self.clock()
        bucket = self._buckets.get(principal.name)
        if bucket is None:
            bucket = self._buckets[principal.name] = _Bucket(capacity, now)
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * per_second)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return
        self.limited += 1
        wait = math.ceil((1.0 - bucket.tokens) / per_second)
        raise IrosError(
            429,
            f"rate limit of {rpm:g} requests per minute for this key reached; retry in {wait} s",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"retry-after": str(wait)},
        )
