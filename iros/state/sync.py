"""Keeping a worker in step: documents each part publishes and applies, and logs it follows.

shared = SharedState(build_state(settings))
shared.register("optimizer", optimizer.shared_view, optimizer.apply_shared)   # a part's document
await shared.publish("optimizer")              # after a change made here: every other worker applies it
shared.follow("alerts", on_entries)            # a log: on_entries(list[bytes]) with what others appended
await shared.start(); ...; await shared.close()

One loop polls the backend every `poll` seconds (a version read; more only when it moved). A document
published here is not applied here again; another worker's is applied once. While the backend cannot be
reached, changes made here wait as `dirty` and go out when it answers again; if it comes back empty (a
Redis restart), each worker puts back what it holds unless another did first.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from iros.config import Settings
from iros.core.periodic import cancel_all, stopping
from iros.state.base import StateBackend, StateUnavailable

log = logging.getLogger("iros.state")

POLL_SECONDS = 0.2
DELAYS_KEPT = 512
UNSENT_KEPT = 1000  # log entries kept while the backend is down (acknowledgements, silences, outcomes)

Snapshot = Callable[[], dict[str, Any]]
Apply = Callable[[dict[str, Any]], Awaitable[None] | None]
OnEntries = Callable[[list[dict[str, Any]]], Awaitable[None] | None]


def build_state(settings: Settings) -> StateBackend:
    state = settings.state
    if state.backend == "redis":
        from iros.state.redis import RedisState

        assert state.url is not None  # validated in config
        return RedisState(state.url, state.prefix, timeout=state.timeout_seconds)
    from iros.state.local import LocalState

    return LocalState(Path(settings.server.data_dir))


@dataclass
class _Doc:
    snapshot: Snapshot
    apply: Apply


@dataclass
class _Log:
    handler: OnEntries
    position: str | None


async def _call(fn: Callable[..., Any], *args: Any) -> None:
    result = fn(*args)
    if inspect.isawaitable(result):
        await result


class SharedState:
    def __init__(self, backend: StateBackend, poll: float = POLL_SECONDS) -> None:
        self.backend = backend
        self.worker = backend.worker
        self.poll = poll
        self.version = 0
        self.connected = True
        self.outages = 0
        self.applied = 0  # documents applied from other workers
        self.last_error: str | None = None
        # Seconds from another worker's publish to the apply here (one clock per host; across hosts
        # it includes their clock difference): `iros bench state` reports their percentiles.
        self.delays: deque[float] = deque(maxlen=DELAYS_KEPT)
        self._docs: dict[str, _Doc] = {}
        self._logs: dict[str, _Log] = {}
        self._known: set[str] = set()  # documents that exist (published or applied): restored after a loss
        self._dirty: set[str] = set()
        self._unsent: deque[tuple[str, bytes, int | None]] = deque(maxlen=UNSENT_KEPT)
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[bool], Any]] = []

    # --- parts register ---------------------------------------------------------------------
    def register(self, name: str, snapshot: Snapshot, apply: Apply) -> None:
        self._docs[name] = _Doc(snapshot, apply)

    def follow(self, channel: str, handler: OnEntries, *, from_start: bool = True) -> None:
        """Call `handler` with the entries other workers append to `channel` (decoded; from what is
        kept, or only from now on)."""
        self._logs[channel] = _Log(handler, None if from_start else "$")

    def on_connection(self, listener: Callable[[bool], Any]) -> None:
        """Told True/False when the backend comes back or goes away."""
        self._listeners.append(listener)

    def _envelope(self, name: str) -> dict[str, Any]:
        return {"by": self.worker, "at": time.time(), "body": self._docs[name].snapshot()}

    async def publish(self, name: str) -> bool:
        """Send this worker's document `name` to every worker; False (kept for later) if it cannot."""
        self._known.add(name)
        try:
            await self.backend.put(name, self._envelope(name))
        except StateUnavailable as exc:
            self._dirty.add(name)
            self._down(exc)
            return False
        self._dirty.discard(name)
        return True

    async def append(
        self, channel: str, entry: dict[str, Any], *, keep: bool = True, maxlen: int | None = None
    ) -> bool:
        """Add `entry` to the log `channel` for the other workers; False when the backend is down, and
        then (`keep`) it goes out when the backend answers again. `maxlen`: the log keeps its latest
        entries by count, not age (see StateBackend.append)."""
        body = orjson.dumps({"by": self.worker, **entry})
        try:
            await self.backend.append(channel, body, maxlen=maxlen)
        except StateUnavailable as exc:
            if keep:
                self._unsent.append((channel, body, maxlen))
            self._down(exc)
            return False
        return True

    # --- the loop -----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.backend.start()
        for channel, follower in self._logs.items():
            if follower.position == "$":
                follower.position = None
                try:
                    while True:  # to the end of what is kept
                        follower.position, entries = await self.backend.read(channel, follower.position)
                        if not entries:
                            break
                except StateUnavailable:
                    pass
        try:
            await self.sync()
        except StateUnavailable as exc:
            self._down(exc)
        self._task = asyncio.create_task(self._run(), name="iros-state")

    async def close(self) -> None:
        await cancel_all([self._task])
        self._task = None
        await self.backend.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            try:
                await self.sync()
            except StateUnavailable as exc:
                self._down(exc)
            except Exception:
                log.exception("shared state: applying a change failed")
            if stopping():
                raise asyncio.CancelledError  # close() cancelled us mid-call and the client swallowed it

    def _down(self, exc: Exception) -> None:
        self.last_error = str(exc)
        if self.connected:
            self.connected = False
            self.outages += 1
            log.warning("shared state unavailable, serving from what this worker holds: %s", exc)
            for listener in self._listeners:
                listener(False)

    async def sync(self) -> None:
        """One round: changes made here while down go out; what others changed is applied here."""
        for name in sorted(self._dirty):
            await self.backend.put(name, self._envelope(name))
            self._dirty.discard(name)
        while self._unsent:
            channel, body, maxlen = self._unsent[0]
            await self.backend.append(channel, body, maxlen=maxlen)
            self._unsent.popleft()
        version, docs = await self.backend.changed(self.version)
        if version < self.version:
            # The backend lost its data (a Redis restart): put back what this worker holds, unless
            # another worker already did; what is there is applied on the next round.
            log.warning("shared state was lost (version %d after %d): restoring it", version, self.version)
            for name in sorted(self._known):
                await self.backend.put(name, self._envelope(name), only_if_absent=True)
            self.version = 0
            return
        for name, envelope in docs.items():
            doc = self._docs.get(name)
            if doc is None:
                continue
            self._known.add(name)
            if envelope.get("by") != self.worker:
                await _call(doc.apply, envelope["body"])
                self.applied += 1
                self.delays.append(time.time() - float(envelope.get("at", 0.0)))
        self.version = version
        for channel, follower in self._logs.items():
            follower.position, raw = await self.backend.read(channel, follower.position)
            entries = [e for e in map(orjson.loads, raw) if e.get("by") != self.worker]
            if entries:
                await _call(follower.handler, entries)
        if not self.connected:
            self.connected, self.last_error = True, None
            log.warning("shared state reachable again")
            for listener in self._listeners:
                listener(True)

    def describe(self) -> dict[str, Any]:
        return {
            **self.backend.describe(),
            "connected": self.connected,
            "version": self.version,
            "outages": self.outages,
            "applied": self.applied,
            "pending": sorted(self._dirty),
            "last_error": self.last_error,
            "propagation_ms": [round(d * 1000, 2) for d in self.delays],
        }
