"""Key guessing, slowed per client address; never a lockout.

After MAX_FAILURES wrong keys (or dashboard sign-ins) from one address within about WINDOW seconds,
every further attempt from there waits a penalty before its key is even looked at: STEP seconds per
failure past the limit, at most MAX_PENALTY. Waiting before the check (not refusing, not answering
late) is what makes it hold: an attacker cannot learn a guess's outcome sooner by hanging up, and cannot
lock anyone out, since a right key still gets in after at most MAX_PENALTY s, the real admin behind the
attacker's proxy included. A key that has already worked from the address is not slowed there at all.
The failures fade at the rate they are allowed (MAX_FAILURES per WINDOW), so an address that stops
guessing is back to full speed within a minute or two.

guard = KeyGuard()
delay = guard.penalty(address, authorization)   # 0.0 unless the address is failing: sleep it first
guard.failed(address)                           # a wrong key (401)
guard.passed(address, authorization)            # a key that worked: exempt from the penalty there

Per process (each worker counts its own); at most MAX_ADDRESSES addresses are remembered.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["MAX_FAILURES", "MAX_PENALTY", "KeyGuard", "KeyGuardMiddleware"]

MAX_FAILURES = 10  # wrong keys from one address before attempts from it are slowed
WINDOW = 60.0  # seconds over which MAX_FAILURES fade away
STEP = 0.25  # seconds of penalty per failure past the limit
MAX_PENALTY = 2.0  # the longest any attempt waits
MAX_ADDRESSES = 10_000
MAX_KNOWN = 16  # keys remembered as good per failing address
LOGIN_PATH = "/dashboard/login"


@dataclass(slots=True)
class _Address:
    failures: float
    updated: float
    known: set[str] = field(default_factory=set)  # digests of credentials that worked from here


def _credential(authorization: bytes | str) -> str:
    raw = authorization.encode("latin-1") if isinstance(authorization, str) else authorization
    return hashlib.sha256(raw).hexdigest()


class KeyGuard:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._addresses: OrderedDict[str, _Address] = OrderedDict()
        self.slowed = 0  # attempts that waited, for the status page and tests

    @property
    def active(self) -> bool:
        """Whether any address has failed lately: the hot path looks no further when none has."""
        return bool(self._addresses)

    def _current(self, address: str) -> _Address | None:
        entry = self._addresses.get(address)
        if entry is None:
            return None
        now = self.clock()
        entry.failures = max(0.0, entry.failures - (now - entry.updated) * MAX_FAILURES / WINDOW)
        entry.updated = now
        if entry.failures == 0.0:
            del self._addresses[address]
            return None
        return entry

    def penalty(self, address: str, authorization: bytes | str | None) -> float:
        """Seconds this attempt waits before its key is checked: 0.0 for an address that is not
        failing, or for a key that already worked from it."""
        entry = self._current(address) if self._addresses else None
        if entry is None or entry.failures < MAX_FAILURES:
            return 0.0
        if authorization and _credential(authorization) in entry.known:
            return 0.0
        self.slowed += 1
        return min(MAX_PENALTY, STEP * (entry.failures - MAX_FAILURES + 1))

    def failed(self, address: str) -> None:
        entry = self._current(address)
        if entry is None:
            entry = self._addresses[address] = _Address(0.0, self.clock())
            while len(self._addresses) > MAX_ADDRESSES:  # the longest-quiet addresses are forgotten
                self._addresses.popitem(last=False)
        self._addresses.move_to_end(address)
        # Capped where the penalty stops growing, so the failures fade within a minute or two.
        entry.failures = min(entry.failures + 1.0, MAX_FAILURES + MAX_PENALTY / STEP)

    def passed(self, address: str, authorization: bytes | str | None) -> None:
        entry = self._addresses.get(address) if self._addresses else None
        if entry is not None and authorization and len(entry.known) < MAX_KNOWN:
            entry.known.add(_credential(authorization))


class KeyGuardMiddleware:
    """The guard for every route but the chat path (the gateway checks it inline): requests that carry
    a key, and sign-ins, wait their penalty; a 401 (or a WebSocket refused with 1008) counts as a
    failure, an answer below 400 marks the key good for the address."""

    def __init__(self, app: ASGIApp, guard: KeyGuard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        sign_in = scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == LOGIN_PATH
        if authorization is None and not sign_in:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = client[0] if client else ""
        guard = self.guard
        if delay := guard.penalty(address, authorization):
            await asyncio.sleep(delay)

        async def observe(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                if message["status"] == 401:
                    guard.failed(address)
                elif message["status"] < 400:
                    guard.passed(address, authorization)
            elif kind == "websocket.close" and message.get("code") == 1008:
                guard.failed(address)
            await send(message)

        await self.app(scope, receive, observe)
