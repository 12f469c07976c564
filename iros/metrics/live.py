"""The live hub: one metrics message per tick, fanned out to WebSocket and SSE subscribers.

hub = LiveHub(build=lambda: monitor.live_message())
hub.add_section("alerts", engine.summary)   # every message carries it too
hub.publish()                          # after each collector tick: builds once, queues for everyone
async with hub.subscribe(keys) as sub: # keys filters the message's metrics (None: everything)
    message = await sub.get()
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import orjson

MAX_SUBSCRIBERS = 200
QUEUE_SIZE = 8  # a subscriber this far behind loses its oldest messages, never slows the others


class HubFull(Exception):
    pass


class Subscription:
    def __init__(self, keys: Iterable[str] | None) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_SIZE)
        self.keys: frozenset[str] | None = None
        self.set_filter(keys)
        self.dropped = 0

    def set_filter(self, keys: Iterable[str] | None) -> None:
        self.keys = frozenset(keys) if keys else None

    def offer(self, message: dict[str, Any], encoded: bytes) -> None:
        if self.keys is not None:
            encoded = orjson.dumps(filtered(message, self.keys))
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(encoded)

    async def get(self) -> bytes:
        return await self.queue.get()


def filtered(message: dict[str, Any], keys: frozenset[str]) -> dict[str, Any]:
    """Keep the envelope, the metrics named in `keys`, and whole sections named in `keys`."""
    if message.get("type") != "metrics":
        return message  # events (an alert's transition) reach every subscriber whole
    out = {k: v for k, v in message.items() if k in ("type", "timestamp", "status")}
    out["metrics"] = {k: v for k, v in message.get("metrics", {}).items() if k in keys}
    for section in ("models", "system", "kpis", "alerts"):
        if section in keys and section in message:
            out[section] = message[section]
    return out


class LiveHub:
    def __init__(self, build: Callable[[], dict[str, Any]]) -> None:
        self._build = build
        self.sections: dict[str, Callable[[], Any]] = {}
        self.subscribers: set[Subscription] = set()
        self.published = 0

    def add_section(self, name: str, read: Callable[[], Any]) -> None:
        """Every message from now on also carries `name`: what `read()` returns at that tick."""
        self.sections[name] = read

    def build(self) -> dict[str, Any]:
        message = self._build()
        for name, read in self.sections.items():
            message[name] = read()
        return message

    def publish(self, message: dict[str, Any] | None = None) -> None:
        if not self.subscribers:
            return
        message = message if message is not None else self.build()
        encoded = orjson.dumps(message)
        for sub in self.subscribers:
            sub.offer(message, encoded)
        self.published += 1

    @contextlib.asynccontextmanager
    async def subscribe(self, keys: Iterable[str] | None = None) -> AsyncIterator[Subscription]:
        if len(self.subscribers) >= MAX_SUBSCRIBERS:
            raise HubFull(f"{MAX_SUBSCRIBERS} live subscribers already connected")
        sub = Subscription(keys)
        self.subscribers.add(sub)
        try:
            # A new subscriber sees the current state at once, not after the next tick.
            sub.offer(message := self.build(), orjson.dumps(message))
            yield sub
        finally:
            self.subscribers.discard(sub)
