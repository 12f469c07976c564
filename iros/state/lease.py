"""One evaluator for the whole cluster: a lease that expires, renewed while its holder lives.

leadership = Leadership(backend, "evaluator", ttl=15.0)
leadership.on_change(callback)        # callback(True) when this worker takes over, (False) when it stops
await leadership.start()              # tries at once, then every ttl / 4
leadership.leader                     # True while this worker holds the lease
await leadership.append("alerts", body)   # only while still holding it (the fencing token is checked)

A holder that cannot renew (Redis unreachable, a pause longer than the lease) stops calling itself the
leader once `ttl` has passed since its last renewal; every write it makes as the leader carries its
token, which Redis refuses once another worker holds the lease, so a paused old leader cannot notify.
Another worker takes over within ttl + ttl / 4 of the holder's death.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

from iros.core.periodic import cancel_all
from iros.state.base import StateBackend, StateUnavailable

log = logging.getLogger("iros.state")

MIN_TTL = 2.0  # a renewal every 0.5 s at least: a busy event loop does not lose the lease for nothing


class Leadership:
    def __init__(self, backend: StateBackend, name: str, ttl: float) -> None:
        self.backend = backend
        self.name = name
        self.ttl = max(MIN_TTL, ttl)
        self.token: int | None = None
        self.renewed_at = 0.0  # monotonic
        self.changes = 0  # leadership gained or lost, for the status page
        self._told = False  # what the listeners were last told
        self._told_token: int | None = None
        self._listeners: list[Callable[[bool], Any]] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def leader(self) -> bool:
        return self.token is not None and time.monotonic() - self.renewed_at < self.ttl

    def on_change(self, listener: Callable[[bool], Any]) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        await self.step()
        self._task = asyncio.create_task(self._run(), name=f"iros-lease-{self.name}")

    async def close(self) -> None:
        await cancel_all([self._task])
        self._task = None
        if self.token is not None:
            await self.backend.release(self.name, self.token)
            self.token = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 4)
            try:
                await self.step()
            except Exception:
                log.exception("lease %s: renewal failed", self.name)

    async def step(self) -> None:
        """Acquire or renew once; tell the listeners when leadership changed."""
        was = self.leader
        began = time.monotonic()
        try:
            token = await self.backend.lease(self.name, self.ttl)
        except StateUnavailable:
            token = self.token if was else None  # kept only until the lease would have expired
        else:
            if token is not None:
                self.renewed_at = began
        self.token = token
        now = self.leader
        if now and self._told and token != self._told_token:
            # Lost it and took it again in between: another worker may have led meanwhile.
            await self._tell(False)
        if now != self._told:
            await self._tell(now)

    async def _tell(self, leader: bool) -> None:
        self._told, self._told_token = leader, self.token
        self.changes += 1
        log.info("lease %s: %s", self.name, "this worker evaluates" if leader else "another worker evaluates")
        for listener in self._listeners:
            result = listener(leader)
            if inspect.isawaitable(result):
                await result

    async def still_held(self) -> bool:
        """Asked of the backend itself, just before an action no other worker may take (a notification)."""
        token = self.token
        if token is None or not self.leader:
            return False
        try:
            return await self.backend.holds(self.name, token)
        except StateUnavailable:
            return False

    async def append(self, channel: str, body: bytes) -> bool:
        """Append to a log only while this worker still holds the lease (checked by the backend)."""
        token = self.token
        if token is None or not self.leader:
            return False
        try:
            return await self.backend.append_fenced(channel, body, self.name, token)
        except StateUnavailable:
            return False

    def describe(self) -> dict[str, Any]:
        return {"lease": self.name, "leader": self.leader, "token": self.token, "ttl_seconds": self.ttl}
