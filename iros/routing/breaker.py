"""A circuit breaker per deployment: after N failures within a window it opens, and the deployment gets
no traffic; once `open_seconds` have passed one request is let through as a half-open probe, whose
success closes it and whose failure opens it again.

breaker = CircuitBreaker(failure_threshold=5, window_seconds=30, open_seconds=10)
if breaker.allow():          # False while open (or while a half-open probe is out)
    try: ...; breaker.success()
    except UpstreamError: breaker.failure()
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 5,
        window_seconds: float = 30.0,
        open_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.window = window_seconds
        self.open_seconds = open_seconds
        self.clock = clock
        self._failures: deque[float] = deque(maxlen=failure_threshold)
        self._opened_at: float | None = None
        self._probing = False
        self.opened = 0  # how many times it opened, for status and tests

    @property
    def state(self) -> State:
        if self._opened_at is None:
            return "closed"
        if self._probing or self.clock() - self._opened_at >= self.open_seconds:
            return "half_open"
        return "open"

    def allow(self) -> bool:
        """May a request go to this deployment now? In half-open, only the one probe may."""
        if self._opened_at is None:
            return True
        if self._probing or self.clock() - self._opened_at < self.open_seconds:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self._opened_at = None
        self._probing = False
        self._failures.clear()

    def failure(self) -> None:
        now = self.clock()
        if self._opened_at is not None:
            # The probe failed (or a request admitted before it opened): open for another spell.
            self._opened_at, self._probing = now, False
            return
        self._failures.append(now)
        if len(self._failures) == self.failure_threshold and now - self._failures[0] <= self.window:
            self._opened_at = now
            self.opened += 1
            self._failures.clear()

    def release_probe(self) -> None:
        """A probe that ended without a verdict (the client left) lets the next request probe."""
        self._probing = False

    def status(self) -> dict[str, object]:
        return {
            "state": self.state,
            "recent_failures": len(self._failures),
            "times_opened": self.opened,
        }
