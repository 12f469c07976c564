"""Shared state for the workers of one host, through the data directory.

state = LocalState(Path("iros-data"))
Documents and logs live in data_dir/state.db (SQLite, WAL: readers never wait for the writer); a log
keeps LOG_KEEP_SECONDS of entries, or, appended with maxlen (noted in `kept`, so every process's prune
honours it), its latest maxlen entries however old; a lease is an flock on data_dir/<name>.lock, which
the kernel drops when its holder dies, so a lease held by a live process never expires; a token bucket
is a 16-byte file under data_dir/buckets/, updated under an flock (a few microseconds, no thread hop on
the request path).
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import sqlite3
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from iros.core.sqlitefile import open_wal
from iros.state.base import StateUnavailable, worker_id

LOG_KEEP_SECONDS = 600.0  # log entries older than this are dropped (the live window is 5 minutes)
PRUNE_EVERY = 200  # appends between two prunes
_BUCKET = struct.Struct("<dd")  # tokens, updated (CLOCK_MONOTONIC: one clock for every process of a host)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL,
    fence INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES (1, 0, 0);
CREATE TABLE IF NOT EXISTS docs (name TEXT PRIMARY KEY, version INTEGER NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS log (id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL,
    at REAL NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS log_channel ON log (channel, id);
CREATE TABLE IF NOT EXISTS kept (channel TEXT PRIMARY KEY, entries INTEGER NOT NULL);
"""


class LocalState:
    name = "local"
    shared_files = True

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.worker = worker_id()
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._leases: dict[str, tuple[int, int]] = {}  # name -> (fd, token)
        self._buckets: dict[str, int] = {}  # key -> fd
        self._appends = 0
        self._kept: dict[str, int] = {}  # channels this process noted in `kept`, with their maxlen
        # A thread of its own: the default executor can be busy for seconds with others' blocking jobs.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="iros-state")

    # --- SQLite -------------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = open_wal(
                self.data_dir / "state.db", setup=lambda c: c.executescript(_SCHEMA), check_same_thread=False
            )
        return self._conn

    async def _run(self, job: Any, *args: Any) -> Any:
        def locked() -> Any:
            with self._lock:
                try:
                    return job(self._db(), *args)
                except sqlite3.Error as exc:
                    raise StateUnavailable(f"state.db: {exc}") from exc

        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, locked)
        except RuntimeError as exc:  # closed: the process is stopping
            raise StateUnavailable(f"state.db: {exc}") from exc

    async def start(self) -> None:
        await self._run(lambda db: None)

    async def close(self) -> None:
        for fd, _ in self._leases.values():
            os.close(fd)
        for fd in self._buckets.values():
            os.close(fd)
        self._leases, self._buckets = {}, {}
        if self._conn is not None:
            with self._lock:
                self._conn.close()
                self._conn = None
        self._thread.shutdown(wait=False)

    # --- documents ----------------------------------------------------------------------------
    async def put(self, name: str, body: dict[str, Any], *, only_if_absent: bool = False) -> int:
        def write(db: sqlite3.Connection) -> int:
            db.execute("BEGIN IMMEDIATE")
            try:
                if only_if_absent and db.execute("SELECT 1 FROM docs WHERE name = ?", (name,)).fetchone():
                    return 0
                db.execute("UPDATE meta SET version = version + 1")
                version = int(db.execute("SELECT version FROM meta").fetchone()[0])
                db.execute(
                    "INSERT OR REPLACE INTO docs VALUES (?, ?, ?)", (name, version, orjson.dumps(body))
                )
                return version
            finally:
                db.execute("COMMIT")

        return int(await self._run(write))

    async def changed(self, since: int) -> tuple[int, dict[str, dict[str, Any]]]:
        def read(db: sqlite3.Connection) -> tuple[int, dict[str, dict[str, Any]]]:
            version = int(db.execute("SELECT version FROM meta").fetchone()[0])
            if version == since:
                return version, {}
            rows = db.execute("SELECT name, body FROM docs WHERE version > ?", (since,)).fetchall()
            return version, {name: orjson.loads(body) for name, body in rows}

        result: tuple[int, dict[str, dict[str, Any]]] = await self._run(read)
        return result

    # --- logs ---------------------------------------------------------------------------------
    async def append(self, channel: str, body: bytes, *, maxlen: int | None = None) -> str:
        self._appends += 1
        prune = self._appends % PRUNE_EVERY == 1
        note = maxlen is not None and self._kept.get(channel) != maxlen

        def write(db: sqlite3.Connection) -> str:
            now = time.time()
            if note:
                db.execute("INSERT OR REPLACE INTO kept VALUES (?, ?)", (channel, maxlen))
            cur = db.execute("INSERT INTO log (channel, at, body) VALUES (?, ?, ?)", (channel, now, body))
            if prune:
                db.execute(
                    "DELETE FROM log WHERE at < ? AND channel NOT IN (SELECT channel FROM kept)",
                    (now - LOG_KEEP_SECONDS,),
                )
                for kept, entries in db.execute("SELECT channel, entries FROM kept").fetchall():
                    db.execute(
                        "DELETE FROM log WHERE channel = ? AND id <= (SELECT id FROM log WHERE channel = ? "
                        "ORDER BY id DESC LIMIT 1 OFFSET ?)",
                        (kept, kept, entries),
                    )
            return str(cur.lastrowid)

        position = str(await self._run(write))
        if maxlen is not None:
            self._kept[channel] = maxlen  # noted once written: a failed write notes it again next time
        return position

    async def append_fenced(self, channel: str, body: bytes, lease: str, token: int) -> bool:
        # The flock is held until this process dies: holding it is the fence.
        if not await self.holds(lease, token):
            return False
        await self.append(channel, body)
        return True

    async def read(self, channel: str, after: str | None) -> tuple[str, list[bytes]]:
        def fetch(db: sqlite3.Connection) -> tuple[str, list[bytes]]:
            rows = db.execute(
                "SELECT id, body FROM log WHERE channel = ? AND id > ? ORDER BY id LIMIT 10000",
                (channel, int(after or 0)),
            ).fetchall()
            return (str(rows[-1][0]) if rows else after or "0"), [bytes(r[1]) for r in rows]

        result: tuple[str, list[bytes]] = await self._run(fetch)
        return result

    # --- leases -------------------------------------------------------------------------------
    async def lease(self, name: str, ttl: float) -> int | None:
        held = self._leases.get(name)
        if held is not None:
            return held[1]
        fd = os.open(self.data_dir / f"{name}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None

        def fence(db: sqlite3.Connection) -> int:
            db.execute("UPDATE meta SET fence = fence + 1")
            return int(db.execute("SELECT fence FROM meta").fetchone()[0])

        token = int(await self._run(fence))
        self._leases[name] = (fd, token)
        return token

    async def holds(self, name: str, token: int) -> bool:
        held = self._leases.get(name)
        return held is not None and held[1] == token

    async def release(self, name: str, token: int) -> None:
        held = self._leases.get(name)
        if held is not None and held[1] == token:
            os.close(held[0])  # closing the descriptor drops the flock
            del self._leases[name]

    # --- token buckets ------------------------------------------------------------------------
    async def take(self, key: str, per_second: float, capacity: float, n: int = 1) -> tuple[int, float]:
        fd = self._buckets.get(key)
        if fd is None:
            folder = self.data_dir / "buckets"
            folder.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256(key.encode()).hexdigest()[:24]
            fd = self._buckets[key] = os.open(folder / digest, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            raw = os.pread(fd, _BUCKET.size, 0)
            now = time.monotonic()
            tokens, updated = _BUCKET.unpack(raw) if len(raw) == _BUCKET.size else (capacity, now)
            if updated > now:  # written before a reboot: CLOCK_MONOTONIC started again
                tokens, updated = capacity, now
            tokens = min(capacity, tokens + (now - updated) * per_second)
            taken = min(n, int(tokens))
            tokens -= taken
            os.pwrite(fd, _BUCKET.pack(tokens, now), 0)
            return taken, 0.0 if taken == n else (1.0 - tokens) / per_second
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "path": str(self.data_dir / "state.db"), "worker": self.worker}
