"""The seam of shared live state: what a worker may ask of the backend that keeps every worker in step.

backend = build_state(settings)                 # LocalState (data_dir) or RedisState (state.url)
await backend.put("tuning", {...})              # a document, by name; every worker reads it back
version, docs = await backend.changed(since)    # the documents put after version `since`
await backend.append("frames", body)            # a bounded log; read(channel, after) follows it
token = await backend.lease("evaluator", ttl)   # acquired or renewed: its fencing token, else None
taken, wait = await backend.take("rate:alice", per_second, capacity)   # 1, 0.0: allowed

A backend that cannot be reached raises StateUnavailable; callers keep serving from what they hold.
"""

from __future__ import annotations

import os
import secrets
import socket
from typing import Any, Protocol


class StateUnavailable(Exception):
    """The shared state cannot be reached (Redis down): the worker goes on with what it holds."""


def worker_id() -> str:
    """This process, unique across the hosts of a cluster and across restarts."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class StateBackend(Protocol):
    name: str  # "local" or "redis"
    worker: str  # this worker's id (worker_id())
    # True when the workers sharing this state also share the data directory's stores (alerts.db):
    # events then only tell the others to read the store again, they need not be copied into it.
    shared_files: bool

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def put(self, name: str, body: dict[str, Any], *, only_if_absent: bool = False) -> int:
        """Store the document `name`; returns the version it got (0: absent-only and already there)."""
        ...

    async def changed(self, since: int) -> tuple[int, dict[str, dict[str, Any]]]:
        """The current version and the documents put after `since` (all of them for 0). A version below
        `since` means the backend lost its data (a Redis restart): the caller restores what it holds."""
        ...

    async def append(self, channel: str, body: bytes, *, maxlen: int | None = None) -> str:
        """Add an entry to a bounded log; returns its position. `maxlen`: keep about that many of the
        channel's latest entries however old they are (a log a starting worker replays), rather than
        the backend's own bound."""
        ...

    async def append_fenced(self, channel: str, body: bytes, lease: str, token: int) -> bool:
        """Append only while `token` still holds `lease` (False: the lease is lost, nothing written)."""
        ...

    async def read(self, channel: str, after: str | None) -> tuple[str, list[bytes]]:
        """The entries after position `after` (None: from the start of what is kept) and the new position."""
        ...

    async def lease(self, name: str, ttl: float) -> int | None:
        """Acquire or renew `name` for `ttl` seconds: its fencing token (higher with each new holder),
        or None while another worker holds it."""
        ...

    async def holds(self, name: str, token: int) -> bool:
        """Whether `token` still holds the lease `name`."""
        ...

    async def release(self, name: str, token: int) -> None: ...

    async def take(self, key: str, per_second: float, capacity: float, n: int = 1) -> tuple[int, float]:
        """Take up to `n` tokens from the bucket `key` (refilled at `per_second`, at most `capacity`):
        how many were taken, and the seconds until the next one is there (0.0 when all were)."""
        ...

    def describe(self) -> dict[str, Any]:
        """For status pages: the backend, where it is (no credentials), whether it answers."""
        ...
