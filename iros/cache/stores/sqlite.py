"""SQLiteCacheStore: the cache store of one process; entries in memory, made durable in a SQLite file.

store = SQLiteCacheStore("iros-data/cache.db", max_entries=100_000, max_memory_bytes=512 * 2**20,
                         ttl_seconds=86400, eviction="lru")
await store.start(listener)          # listener.added(entry) for every live entry before it returns
await store.put(entry)               # evicts what the limits require: listener.removed(key) for each
entry = await store.get(key)         # None if absent or expired
await store.close()

The rules (TTL, limits, eviction order, counters) are those of iros.cache.stores.common.

Every live entry is held in memory (within the same limits, so the limits bound RAM too) and the file is
their durable copy, so get, put and record_hit never wait for the disk. Changes are written by one
database thread (iros.core.sqlitefile) every flush_seconds (a crash loses at most that much); the file is read
whole only at start. Eviction order and expiry are decided in memory, so the table has no index on
them. One process per file: several processes on one file would each see only their own changes.

A file that cannot be written (disk full, read-only) is logged once and shown as last_error in stats();
entries are served from memory meanwhile and the writes retried every flush.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from iros.cache.base import CacheEntry, CacheListener
from iros.cache.stores.common import (
    COUNTERS,
    ENTRY_FIELDS,
    Eviction,
    LFUOrder,
    LRUOrder,
    StoreLimits,
    check_hit_kind,
    embedding_bytes,
    embedding_of,
    is_expired,
    stats_doc,
    tell_added,
    tell_removed,
)
from iros.core.sqlitefile import SQLiteFile

log = logging.getLogger(__name__)

__all__ = ["SQLiteCacheStore"]

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    context TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    body BLOB NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    completion_tokens INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    upstream_ms REAL NOT NULL,
    hits INTEGER NOT NULL,
    last_hit_at REAL NOT NULL,
    embedding BLOB
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID
"""
_COLUMNS = ", ".join(ENTRY_FIELDS)  # the embedding is stored as float32 bytes
_Row = tuple[Any, ...]


def _row(e: CacheEntry) -> _Row:
    return (*(getattr(e, name) for name in ENTRY_FIELDS[:-1]), embedding_bytes(e))


def _entry_from_row(r: _Row) -> CacheEntry:
    fields = dict(zip(ENTRY_FIELDS, r, strict=True))
    fields["body"] = bytes(fields["body"])
    fields["embedding"] = embedding_of(fields["embedding"])
    return CacheEntry(**fields)


class SQLiteCacheStore(StoreLimits):
    """CacheStore for one process: entries in memory, made durable in a SQLite file (see above)."""

    name = "sqlite"

    def __init__(
        self,
        path: str | Path,
        *,
        max_entries: int,
        max_memory_bytes: int,
        ttl_seconds: float | None,
        eviction: Eviction = "lru",
        flush_seconds: float = 1.0,
        sweep_seconds: float = 60.0,
    ) -> None:
        self.init_limits(max_entries, max_memory_bytes, ttl_seconds, eviction)
        self.path = Path(path)
        self.flush_seconds = flush_seconds
        self.sweep_seconds = sweep_seconds
        self._db = SQLiteFile(
            self.path,
            schema=_SCHEMA,
            version=SCHEMA_VERSION,
            label="cache store",
            thread_name="iros-cachedb",
            meanwhile=f"entries are served from memory and writes retried every {flush_seconds:g}s",
            logger=log,
        )
        self._last_sweep = time.monotonic()

        self._entries: dict[str, CacheEntry] = {}
        self._order: LRUOrder | LFUOrder = LFUOrder() if eviction == "lfu" else LRUOrder()
        self._bytes = 0
        self._counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        # Keys changed since the last flush: True, write the whole row (or delete it if the key is
        # gone); False, only its hit columns.
        self._dirty: dict[str, bool] = {}
        self._writing: dict[str, bool] = {}  # the changes of the flush in progress
        self._counters_dirty = False
        self._listener: CacheListener | None = None

    # ------------------------------------------------------------------------- event loop side

    @property
    def last_error(self) -> str | None:
        """Why the file cannot be written now; None while writes succeed."""
        return self._db.last_error

    async def start(self, listener: CacheListener) -> None:
        try:
            loaded, counters = await self._db.run(self._load)
        except (sqlite3.Error, OSError) as exc:
            # Serve from memory; the writes are retried every flush.
            self._db.report(exc)
            loaded, counters = [], {}
        for name, value in counters.items():
            self._counters[name] = self._counters.get(name, 0) + value
        now = time.time()
        for entry in sorted(loaded, key=self._order.rank):
            if is_expired(entry, self.ttl_seconds, now):
                self._dirty[entry.key] = True
                self._count("expirations")
            elif entry.key not in self._entries and entry.size <= self.max_memory_bytes:
                self._insert(entry)
        self._enforce(keep=None)  # the limits may be lower than in the last run
        self._listener = listener
        for entry in list(self._entries.values()):
            tell_added(listener, entry)
        self._db.start_background(self._background, every=self.flush_seconds)

    async def get(self, key: str) -> CacheEntry | None:
        """The stored entry itself, not a copy: do not change it."""
        return self._get(key, time.time())

    async def get_many(self, keys: list[str]) -> list[CacheEntry | None]:
        now = time.time()
        return [self._get(key, now) for key in keys]

    def _get(self, key: str, now: float) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is not None and is_expired(entry, self.ttl_seconds, now):
            self._remove(key, "expirations")
            return None
        return entry

    async def put(self, entry: CacheEntry) -> None:
        if is_expired(entry, self.ttl_seconds, time.time()):
            return
        if entry.size > self.max_memory_bytes:
            self._count("too_large")
            return
        old = self._entries.pop(entry.key, None)
        if old is not None:
            self._order.discard(old.key)
            self._bytes -= old.size
        self._insert(entry)
        self._dirty[entry.key] = True
        self._count("puts")
        self._enforce(keep=entry.key)
        tell_added(self._listener, entry)

    async def record_hit(self, key: str, kind: str) -> None:
        check_hit_kind(kind)
        self._count(f"hits:{kind}")
        entry = self._entries.get(key)
        if entry is not None:
            entry.hits += 1
            entry.last_hit_at = time.time()
            self._order.touch(entry)
            self._dirty.setdefault(key, False)

    async def delete(self, key: str) -> bool:
        if key not in self._entries:
            return False
        self._remove(key, "deletes")
        return True

    async def clear(self, namespace: str | None = None) -> int:
        keys = [k for k, e in self._entries.items() if namespace is None or e.namespace == namespace]
        for key in keys:
            self._remove(key, "cleared")
        return len(keys)

    async def entries(self) -> AsyncIterator[CacheEntry]:
        now = time.time()
        for entry in list(self._entries.values()):
            if not is_expired(entry, self.ttl_seconds, now):
                yield entry

    async def set_limits(self, max_entries: int, max_memory_bytes: int, ttl_seconds: float | None) -> None:
        self.apply_limits(max_entries, max_memory_bytes, ttl_seconds)
        await self.sweep()
        self._enforce(keep=None)

    async def sweep(self) -> int:
        """Remove the expired entries now (also done every sweep_seconds); how many there were."""
        now = time.time()
        expired = [k for k, e in self._entries.items() if is_expired(e, self.ttl_seconds, now)]
        for key in expired:
            self._remove(key, "expirations")
        return len(expired)

    async def stats(self) -> dict[str, Any]:
        return stats_doc(
            self._counters,
            backend=self.name,
            status="ok" if self.last_error is None else "unwritable",
            path=str(self.path),
            entries=len(self._entries),
            bytes=self._bytes,
            **self.limits_stats(),
            pending_writes=len(self._dirty.keys() | self._writing.keys()),
            last_error=self.last_error,
        )

    async def flush(self) -> None:
        """Write the changes made so far (done every flush_seconds, and by close)."""
        if not self._dirty and not self._counters_dirty:
            return
        dirty, self._dirty = self._dirty, {}
        self._writing = dirty  # still pending until written: stats() counts them
        self._counters_dirty = False
        upserts: list[_Row] = []
        hits: list[tuple[int, float, str]] = []
        deletes: list[tuple[str]] = []
        for key, whole in dirty.items():
            entry = self._entries.get(key)
            if entry is None:
                deletes.append((key,))
            elif whole:
                upserts.append(_row(entry))
            else:
                hits.append((entry.hits, entry.last_hit_at, key))
        counters = list(self._counters.items())
        try:
            await self._db.run(self._write, upserts, hits, deletes, counters)
        except (sqlite3.Error, OSError) as exc:
            self._db.report(exc)
            for key, whole in dirty.items():
                self._dirty[key] = self._dirty.get(key, False) or whole
            self._counters_dirty = True
        else:
            self._db.recovered()
        finally:
            self._writing = {}

    async def close(self) -> None:
        await self._db.close(final=self.flush)

    def _insert(self, entry: CacheEntry) -> None:
        self._entries[entry.key] = entry
        self._order.add(entry)
        self._bytes += entry.size

    def _remove(self, key: str, counter: str) -> None:
        entry = self._entries.pop(key)
        self._order.discard(key)
        self._bytes -= entry.size
        self._dirty[key] = True
        self._count(counter)
        tell_removed(self._listener, key)

    def _enforce(self, keep: str | None) -> None:
        now = time.time()
        while len(self._entries) > self.max_entries or self._bytes > self.max_memory_bytes:
            reason = "entries" if len(self._entries) > self.max_entries else "memory"
            victim = next((k for k in self._order.victims() if k != keep), None)
            if victim is None:
                return
            if is_expired(self._entries[victim], self.ttl_seconds, now):
                self._remove(victim, "expirations")
            else:
                self._remove(victim, f"evictions:{reason}")
                self._count(f"evictions:{self.eviction}")

    def _count(self, name: str) -> None:
        self._counters[name] = self._counters.get(name, 0) + 1
        self._counters_dirty = True

    async def _background(self) -> None:
        if time.monotonic() - self._last_sweep >= self.sweep_seconds:
            self._last_sweep = time.monotonic()
            await self.sweep()
        await self.flush()

    # ------------------------------------------------------------------------- database thread

    def _load(self) -> tuple[list[CacheEntry], dict[str, int]]:
        conn = self._db.connect()
        entries = [_entry_from_row(r) for r in conn.execute(f"SELECT {_COLUMNS} FROM entries")]
        counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        return entries, counters

    def _write(
        self,
        upserts: list[_Row],
        hits: list[tuple[int, float, str]],
        deletes: list[tuple[str]],
        counters: list[tuple[str, int]],
    ) -> None:
        conn = self._db.connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            marks = ", ".join("?" * len(ENTRY_FIELDS))
            conn.executemany(f"INSERT OR REPLACE INTO entries ({_COLUMNS}) VALUES ({marks})", upserts)
            conn.executemany("UPDATE entries SET hits = ?, last_hit_at = ? WHERE key = ?", hits)
            conn.executemany("DELETE FROM entries WHERE key = ?", deletes)
            conn.executemany("INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)", counters)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
