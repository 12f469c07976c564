"""Admission control: a fixed number of requests run at once, a bounded queue waits, the rest get a 429."""

from __future__ import annotations

import asyncio
from collections import deque

from iros.core.errors import IrosError


class Admission:
    def __init__(self, max_concurrency: int, max_queue: int, queue_timeout: float) -> None:
        self.limit = max_concurrency
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        # Fast path, no awaiting: the common case under the limit costs two comparisons.
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise IrosError(
                429,
                f"server busy: {self.active} requests running and {self.queued} queued; retry",
                type="rate_limit_error",
                code="queue_full",
                headers={"retry-after": "1"},
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout)
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # the slot arrived just as the wait timed out: keep it
            waiter.cancel()
            raise IrosError(
                429,
                f"waited {self.queue_timeout:g}s in the queue without a slot; retry",
                type="rate_limit_error",
                code="queue_timeout",
                headers={"retry-after": "1"},
            ) from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the client left after being handed a slot: pass it on
            else:
                waiter.cancel()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def set_limit(self, limit: int) -> None:
        """Change how many run at once, live; a raise hands the new slots to waiters straight away."""
        self.limit = limit
        while self.active < self.limit and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.active += 1
                waiter.set_result(None)

    def release(self) -> None:
        # Hand the slot straight to the next live waiter, so `active` never dips and lets a newcomer jump;
        # unless the limit was lowered meanwhile, then the slot goes away.
        while self._waiters and self.active <= self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1
