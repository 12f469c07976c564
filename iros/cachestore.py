"""Where cache entries live: SQLiteCacheStore for one process, RedisCacheStore shared by replicas.

store = SQLiteCacheStore("iros-data/cache.db", max_entries=100_000, max_memory_bytes=512 * 2**20,
                         ttl_seconds=86400, eviction="lru")
await store.start(listener)          # listener.added(entry) for every live entry before it returns
await store.put(entry)               # evicts what the limits require: listener.removed(key) for each
entry = await store.get(key)         # None if absent or expired
await store.close()

Both stores enforce the same rules. An entry is live until its own expires_at and until created_at +
ttl_seconds, whichever comes first (so a lowered TTL applies to the entries already stored). After a put,
while there are more than max_entries entries or their sizes (CacheEntry.size) add up to more than
max_memory_bytes, the entry that the policy ranks first goes: LRU, least recently hit (or stored);
LFU, fewest hits, the least recently hit of those first. An entry larger than max_memory_bytes alone is
not stored. Counters: evictions by the limit that forced them ("entries", "memory") and by the policy
that chose them ("lru", "lfu"), expirations, puts, deletes, cleared, hits by kind.

SQLite: every live entry is held in memory (within the same limits, so the limits bound RAM too) and
the file is their durable copy, so get, put and record_hit never wait for the disk. Changes are written
by one database thread every flush_seconds (a crash loses at most that much); the file is read whole
only at start. Eviction order and expiry are decided in memory, so the table has no index on them.
One process per file: several processes on one file would each see only their own changes.

Redis, with prefix P (all replicas share it and must agree on the limits):

  P:e:<key>    hash: the CacheEntry's fields (embedding as float32 bytes, expires_at "" for none),
               PEXPIREAT at its deadline so Redis frees it even when no replica runs
  P:lru        zset key -> last hit (or store) time                      LRU order
  P:lfu        zset key -> hits * 2**32 + that time in whole seconds     LFU order
  P:size       zset key -> CacheEntry.size: the set of accounted entries; ZCARD is the entry count
  P:exp        zset key -> expires_at in ms (entries that have one)      the expiry sweep
  P:created    zset key -> created_at                                    the sweep for ttl_seconds
  P:stats      hash: bytes (the sum of P:size) and the counters
  P:events     stream, MAXLEN ~events_maxlen: {op: add|del, key, by: replica id}

Every change is one Lua script, so the accounting, the eviction and the events of one put are atomic
and the events are in the order of the changes. A hash can vanish by PEXPIREAT before its zset entries
do; whoever touches the key next (a get, the eviction loop, the sweep every sweep_seconds) finishes
the removal, counts an expiration and emits the del event.

Sync: start() notes the stream's last id, then reports every live entry, then follows the stream from
that id (XREAD BLOCK, a background task). Each replica remembers the keys it has reported (`known`).
Its own changes are reported as it makes them, and a put marks its key known before its script runs,
so the reader skips that add event. From the stream, per key the last event of a batch counts: an add
by another replica (or an own add of a key no longer known) is fetched and reported, or reported
removed if the hash is already gone; a del of a known key is reported removed, own dels included (a
fetch begun for an earlier add may have brought the key back). Every such step is idempotent, so the
listener ends in the stream's order. If the stream lost events this replica had not read (Redis
restarted without its data, or was trimmed past us), it resynchronises: reports the live entries it
does not know and the removal of known keys that are gone.

Redis unreachable: a method raises CacheUnavailable (naming the URL) after at most the socket timeout
(1 s; a refused connection at once), and for recheck_seconds after that every call raises it without
trying, so requests bypass the cache instead of each waiting on Redis. The client reconnects by itself;
the event reader keeps trying, ends the fail-fast window when Redis answers, and resumes (resynchronising
if events were lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import sqlite3
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from iros.types import CacheEntry, CacheListener, StoreUnavailable

log = logging.getLogger(__name__)

__all__ = ["CacheUnavailable", "RedisCacheStore", "SQLiteCacheStore"]

T = TypeVar("T")
Eviction = Literal["lru", "lfu"]
HIT_KINDS = ("exact", "semantic")
COUNTERS = (
    "puts",
    "deletes",
    "cleared",
    "expirations",
    "too_large",
    "evictions:entries",
    "evictions:memory",
    "evictions:lru",
    "evictions:lfu",
    "hits:exact",
    "hits:semantic",
)


class CacheUnavailable(StoreUnavailable):
    """The cache store cannot answer now (Redis down, database unwritable); bypass the cache."""


# ---------------------------------------------------------------------------------- shared rules


def _check_limits(max_entries: int, max_memory_bytes: int, ttl_seconds: float | None) -> None:
    if max_entries < 1 or max_memory_bytes < 1:
        raise ValueError("max_entries and max_memory_bytes must be at least 1")
    if ttl_seconds is not None and not ttl_seconds > 0:
        raise ValueError(f"ttl_seconds must be above 0 (or None), not {ttl_seconds!r}")


def _deadline(entry: CacheEntry, ttl_seconds: float | None) -> float | None:
    """When the entry stops being live: its own expires_at or its TTL, whichever comes first."""
    by_ttl = entry.created_at + ttl_seconds if ttl_seconds is not None else None
    if entry.expires_at is None:
        return by_ttl
    return entry.expires_at if by_ttl is None else min(entry.expires_at, by_ttl)


def _expired(entry: CacheEntry, ttl_seconds: float | None, now: float) -> bool:
    deadline = _deadline(entry, ttl_seconds)
    return deadline is not None and now >= deadline


def _recency(entry: CacheEntry) -> float:
    return max(entry.last_hit_at, entry.created_at)


def _embedding_bytes(entry: CacheEntry) -> bytes | None:
    if entry.embedding is None:
        return None
    return np.ascontiguousarray(entry.embedding, dtype="<f4").tobytes()


def _embedding(data: bytes | None) -> npt.NDArray[np.float32] | None:
    if not data:
        return None
    vector: npt.NDArray[np.float32] = np.frombuffer(data, dtype="<f4").astype(np.float32)
    return vector


def _stats(counters: dict[str, int], **extra: Any) -> dict[str, Any]:
    c = {name: int(counters.get(name, 0)) for name in COUNTERS}
    return {
        **extra,
        "puts": c["puts"],
        "deletes": c["deletes"],
        "cleared": c["cleared"],
        "expirations": c["expirations"],
        "too_large": c["too_large"],
        "evictions": {"entries": c["evictions:entries"], "memory": c["evictions:memory"]},
        "evictions_by_policy": {"lru": c["evictions:lru"], "lfu": c["evictions:lfu"]},
        "hits": {kind: c[f"hits:{kind}"] for kind in HIT_KINDS},
    }


def _tell_added(listener: CacheListener | None, entry: CacheEntry) -> None:
    if listener is not None:
        try:
            listener.added(entry)
        except Exception:  # a listener's bug must not undo the store's change
            log.exception("cache listener failed on added(%s)", entry.key)


def _tell_removed(listener: CacheListener | None, key: str) -> None:
    if listener is not None:
        try:
            listener.removed(key)
        except Exception:
            log.exception("cache listener failed on removed(%s)", key)


class _LRU:
    """Keys from least to most recently used."""

    def __init__(self) -> None:
        self._keys: OrderedDict[str, None] = OrderedDict()

    @staticmethod
    def rank(entry: CacheEntry) -> tuple[float, ...]:
        return (_recency(entry),)

    def add(self, entry: CacheEntry) -> None:
        self._keys[entry.key] = None
        self._keys.move_to_end(entry.key)

    touch = add

    def discard(self, key: str) -> None:
        self._keys.pop(key, None)

    def victims(self) -> Iterator[str]:
        return iter(self._keys)


class _LFU:
    """Keys by hits, fewest first; among equal hits, least recently used first."""

    def __init__(self) -> None:
        self._buckets: dict[int, dict[str, None]] = {}  # hits -> keys in order of their last use
        self._hits: dict[str, int] = {}

    @staticmethod
    def rank(entry: CacheEntry) -> tuple[float, ...]:
        return (entry.hits, _recency(entry))

    def add(self, entry: CacheEntry) -> None:
        self.discard(entry.key)
        self._buckets.setdefault(entry.hits, {})[entry.key] = None
        self._hits[entry.key] = entry.hits

    touch = add

    def discard(self, key: str) -> None:
        hits = self._hits.pop(key, None)
        if hits is not None:
            bucket = self._buckets[hits]
            del bucket[key]
            if not bucket:
                del self._buckets[hits]

    def victims(self) -> Iterator[str]:
        if not self._buckets:
            return
        low = min(self._buckets)
        yield from self._buckets[low]
        # Reached only when the caller skipped every key of the lowest bucket (the one just stored).
        for hits in sorted(self._buckets):
            if hits != low:
                yield from self._buckets[hits]


# ---------------------------------------------------------------------------------- SQLite

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
_COLUMNS = (
    "key, namespace, context, model, prompt, body, created_at, expires_at, completion_tokens, "
    "prompt_tokens, upstream_ms, hits, last_hit_at, embedding"
)
_Row = tuple[Any, ...]


def _row(e: CacheEntry) -> _Row:
    return (
        e.key,
        e.namespace,
        e.context,
        e.model,
        e.prompt,
        e.body,
        e.created_at,
        e.expires_at,
        e.completion_tokens,
        e.prompt_tokens,
        e.upstream_ms,
        e.hits,
        e.last_hit_at,
        _embedding_bytes(e),
    )


def _entry_from_row(r: _Row) -> CacheEntry:
    return CacheEntry(
        key=r[0],
        namespace=r[1],
        context=r[2],
        model=r[3],
        prompt=r[4],
        body=bytes(r[5]),
        created_at=r[6],
        expires_at=r[7],
        completion_tokens=r[8],
        prompt_tokens=r[9],
        upstream_ms=r[10],
        hits=r[11],
        last_hit_at=r[12],
        embedding=_embedding(r[13]),
    )


class SQLiteCacheStore:
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
        _check_limits(max_entries, max_memory_bytes, ttl_seconds)
        if eviction not in ("lru", "lfu"):
            raise ValueError(f"eviction must be 'lru' or 'lfu', not {eviction!r}")
        self.path = Path(path)
        self.max_entries = max_entries
        self.max_memory_bytes = max_memory_bytes
        self.ttl_seconds = ttl_seconds
        self.eviction = eviction
        self.flush_seconds = flush_seconds
        self.sweep_seconds = sweep_seconds
        self.last_error: str | None = None

        self._entries: dict[str, CacheEntry] = {}
        self._order: _LRU | _LFU = _LFU() if eviction == "lfu" else _LRU()
        self._bytes = 0
        self._counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        # Keys changed since the last flush: True, write the whole row (or delete it if the key is
        # gone); False, only its hit columns.
        self._dirty: dict[str, bool] = {}
        self._counters_dirty = False
        self._listener: CacheListener | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iros-cachedb")
        self._conn: sqlite3.Connection | None = None  # only touched on the executor's thread
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._closed = False

    # ------------------------------------------------------------------------- event loop side

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def start(self, listener: CacheListener) -> None:
        try:
            loaded, counters = await self._run(self._load)
        except (sqlite3.Error, OSError) as exc:
            # Serve from memory; the writes are retried every flush.
            self._report(exc)
            loaded, counters = [], {}
        for name, value in counters.items():
            self._counters[name] = self._counters.get(name, 0) + value
        now = time.time()
        for entry in sorted(loaded, key=self._order.rank):
            if _expired(entry, self.ttl_seconds, now):
                self._dirty[entry.key] = True
                self._count("expirations")
            elif entry.key not in self._entries and entry.size <= self.max_memory_bytes:
                self._insert(entry)
        self._enforce(keep=None)  # the limits may be lower than in the last run
        self._listener = listener
        for entry in list(self._entries.values()):
            _tell_added(listener, entry)
        if self._task is None:
            self._task = asyncio.create_task(self._background(), name="iros-cachedb")

    async def get(self, key: str) -> CacheEntry | None:
        """The stored entry itself, not a copy: do not change it."""
        return self._get(key, time.time())

    async def get_many(self, keys: list[str]) -> list[CacheEntry | None]:
        now = time.time()
        return [self._get(key, now) for key in keys]

    def _get(self, key: str, now: float) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is not None and _expired(entry, self.ttl_seconds, now):
            self._remove(key, "expirations")
            return None
        return entry

    async def put(self, entry: CacheEntry) -> None:
        if _expired(entry, self.ttl_seconds, time.time()):
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
        _tell_added(self._listener, entry)

    async def record_hit(self, key: str, kind: str) -> None:
        if kind not in HIT_KINDS:
            raise ValueError(f"hit kind must be one of {HIT_KINDS}, not {kind!r}")
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
            if not _expired(entry, self.ttl_seconds, now):
                yield entry

    async def set_limits(self, max_entries: int, max_memory_bytes: int, ttl_seconds: float | None) -> None:
        _check_limits(max_entries, max_memory_bytes, ttl_seconds)
        self.max_entries, self.max_memory_bytes, self.ttl_seconds = max_entries, max_memory_bytes, ttl_seconds
        await self.sweep()
        self._enforce(keep=None)

    async def sweep(self) -> int:
        """Remove the expired entries now (also done every sweep_seconds); how many there were."""
        now = time.time()
        expired = [k for k, e in self._entries.items() if _expired(e, self.ttl_seconds, now)]
        for key in expired:
            self._remove(key, "expirations")
        return len(expired)

    async def stats(self) -> dict[str, Any]:
        return _stats(
            self._counters,
            backend=self.name,
            path=str(self.path),
            entries=len(self._entries),
            bytes=self._bytes,
            max_entries=self.max_entries,
            max_memory_bytes=self.max_memory_bytes,
            ttl_seconds=self.ttl_seconds,
            eviction=self.eviction,
            pending_writes=len(self._dirty),
            last_error=self.last_error,
        )

    async def flush(self) -> None:
        """Write the changes made so far (done every flush_seconds, and by close)."""
        if not self._dirty and not self._counters_dirty:
            return
        dirty, self._dirty = self._dirty, {}
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
            await self._run(self._write, upserts, hits, deletes, counters)
        except (sqlite3.Error, OSError) as exc:
            self._report(exc)
            for key, whole in dirty.items():
                self._dirty[key] = self._dirty.get(key, False) or whole
            self._counters_dirty = True
        else:
            if self.last_error is not None:
                log.warning("cache store %s: writing again", self.path)
                self.last_error = None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._stop.set()
            await asyncio.wait([self._task])
            self._task = None
        await self.flush()
        await self._run(self._disconnect)
        self._executor.shutdown(wait=True)

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
        _tell_removed(self._listener, key)

    def _enforce(self, keep: str | None) -> None:
        now = time.time()
        while len(self._entries) > self.max_entries or self._bytes > self.max_memory_bytes:
            reason = "entries" if len(self._entries) > self.max_entries else "memory"
            victim = next((k for k in self._order.victims() if k != keep), None)
            if victim is None:
                return
            if _expired(self._entries[victim], self.ttl_seconds, now):
                self._remove(victim, "expirations")
            else:
                self._remove(victim, f"evictions:{reason}")
                self._count(f"evictions:{self.eviction}")

    def _count(self, name: str) -> None:
        self._counters[name] = self._counters.get(name, 0) + 1
        self._counters_dirty = True

    def _report(self, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        if self.last_error is None:  # once per outage
            log.error(
                "cache store %s cannot be written (%s); entries are served from memory and writes "
                "retried every %gs",
                self.path,
                message,
                self.flush_seconds,
            )
        self.last_error = message

    async def _background(self) -> None:
        last_sweep = time.monotonic()
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.flush_seconds)
            try:
                if time.monotonic() - last_sweep >= self.sweep_seconds:
                    last_sweep = time.monotonic()
                    await self.sweep()
                await self.flush()
            except Exception:  # the loop must outlive any one failure
                log.exception("cache store %s: background work failed", self.path)

    # ------------------------------------------------------------------------- database thread

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {version} is newer than this Iros understands ({SCHEMA_VERSION})"
                )
            if version < SCHEMA_VERSION:
                conn.executescript(f"BEGIN; {_SCHEMA}; PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _load(self) -> tuple[list[CacheEntry], dict[str, int]]:
        conn = self._connect()
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
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            marks = ", ".join("?" * 14)
            conn.executemany(f"INSERT OR REPLACE INTO entries ({_COLUMNS}) VALUES ({marks})", upserts)
            conn.executemany("UPDATE entries SET hits = ?, last_hit_at = ? WHERE key = ?", hits)
            conn.executemany("DELETE FROM entries WHERE key = ?", deletes)
            conn.executemany("INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)", counters)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# ---------------------------------------------------------------------------------- Redis

# KEYS: lru, lfu, size, exp, created, stats, events. ARGV: entry key prefix, replica id, stream
# MAXLEN, then each script's own. Entry hashes are named from the prefix, not passed as KEYS: fine
# on one Redis server (not on a cluster).
_LUA_COMMON = """
local LRU, LFU, SIZE, EXP, CREATED = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local STATS, EVENTS = KEYS[6], KEYS[7]
local EPREFIX, REPLICA, MAXLEN = ARGV[1], ARGV[2], ARGV[3]

local function event(op, key)
  redis.call('XADD', EVENTS, 'MAXLEN', '~', MAXLEN, '*', 'op', op, 'key', key, 'by', REPLICA)
end

-- Forget a key everywhere; true if it was accounted (so replicas may hold it), which emits a del.
local function drop(key)
  redis.call('DEL', EPREFIX .. key)
  redis.call('ZREM', LRU, key)
  redis.call('ZREM', LFU, key)
  redis.call('ZREM', EXP, key)
  redis.call('ZREM', CREATED, key)
  local size = redis.call('ZSCORE', SIZE, key)
  if not size then return false end
  redis.call('ZREM', SIZE, key)
  redis.call('HINCRBY', STATS, 'bytes', -tonumber(size))
  event('del', key)
  return true
end

-- Drop entries in policy order until the limits hold; never `keep`. An entry whose hash has
-- already expired counts as an expiration. Each pass removes its victim from the order, so it ends.
local function evict(max_entries, max_bytes, policy, keep)
  local order = LRU
  if policy == 'lfu' then order = LFU end
  local victims = {}
  while true do
    local reason
    if redis.call('ZCARD', SIZE) > max_entries then
      reason = 'entries'
    elseif tonumber(redis.call('HGET', STATS, 'bytes') or 0) > max_bytes then
      reason = 'memory'
    else
      break
    end
    local first = redis.call('ZRANGE', order, 0, 1)
    local victim = first[1]
    if victim == keep then victim = first[2] end
    if not victim then break end
    if redis.call('EXISTS', EPREFIX .. victim) == 1 then
      redis.call('HINCRBY', STATS, 'evictions:' .. reason, 1)
      redis.call('HINCRBY', STATS, 'evictions:' .. policy, 1)
    else
      redis.call('HINCRBY', STATS, 'expirations', 1)
    end
    if drop(victim) then victims[#victims + 1] = victim end
  end
  return victims
end
"""

# ARGV[4..]: key, max_entries, max_bytes, policy, size, lru score, lfu score, created_at,
# deadline in ms ("" for none), then the hash's field/value pairs. Returns the evicted keys.
_LUA_PUT = """
local key = ARGV[4]
local size = tonumber(ARGV[8])
local h = EPREFIX .. key
local old = redis.call('ZSCORE', SIZE, key)
if old then redis.call('HINCRBY', STATS, 'bytes', -tonumber(old)) end
redis.call('DEL', h)
redis.call('HSET', h, unpack(ARGV, 13))
if ARGV[12] ~= '' then
  redis.call('PEXPIREAT', h, ARGV[12])
  redis.call('ZADD', EXP, ARGV[12], key)
else
  redis.call('ZREM', EXP, key)
end
redis.call('ZADD', SIZE, size, key)
redis.call('ZADD', LRU, ARGV[9], key)
redis.call('ZADD', LFU, ARGV[10], key)
redis.call('ZADD', CREATED, ARGV[11], key)
redis.call('HINCRBY', STATS, 'bytes', size)
redis.call('HINCRBY', STATS, 'puts', 1)
local victims = evict(tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], key)
event('add', key)
return victims
"""

# ARGV[4..]: key, now, ttl seconds ("" for none). The hash as a flat list; {} when absent;
# {"expired"} when it just expired (its removal finished here).
_LUA_GET = """
local key = ARGV[4]
local h = EPREFIX .. key
local created = redis.call('HGET', h, 'created_at')
if not created then
  if redis.call('ZSCORE', SIZE, key) then
    drop(key)
    redis.call('HINCRBY', STATS, 'expirations', 1)
    return {'expired'}
  end
  return {}
end
if ARGV[6] ~= '' and tonumber(created) + tonumber(ARGV[6]) <= tonumber(ARGV[5]) then
  drop(key)
  redis.call('HINCRBY', STATS, 'expirations', 1)
  return {'expired'}
end
return redis.call('HGETALL', h)
"""

# ARGV[4..]: key, kind, now.
_LUA_HIT = """
local key = ARGV[4]
local h = EPREFIX .. key
redis.call('HINCRBY', STATS, 'hits:' .. ARGV[5], 1)
if redis.call('EXISTS', h) == 0 then return 0 end
local hits = redis.call('HINCRBY', h, 'hits', 1)
local now = tonumber(ARGV[6])
redis.call('HSET', h, 'last_hit_at', ARGV[6])
redis.call('ZADD', LRU, 'XX', ARGV[6], key)
redis.call('ZADD', LFU, 'XX', string.format('%.17g', hits * 4294967296 + math.floor(now)), key)
return 1
"""

# ARGV[4..]: counter, keys... Returns {keys removed while live, keys found already expired}.
_LUA_REMOVE = """
local live, expired = {}, {}
for i = 5, #ARGV do
  local key = ARGV[i]
  local present = redis.call('EXISTS', EPREFIX .. key) == 1
  if drop(key) then
    if present then
      redis.call('HINCRBY', STATS, ARGV[4], 1)
      live[#live + 1] = key
    else
      redis.call('HINCRBY', STATS, 'expirations', 1)
      expired[#expired + 1] = key
    end
  end
end
return {live, expired}
"""

# ARGV[4..]: now in ms, oldest created_at still live ("" for no TTL), batch size.
# Returns {removed keys, how many candidates were looked at}.
_LUA_SWEEP = """
local keys = redis.call('ZRANGEBYSCORE', EXP, '-inf', ARGV[4], 'LIMIT', 0, ARGV[6])
if ARGV[5] ~= '' then
  for _, key in ipairs(redis.call('ZRANGEBYSCORE', CREATED, '-inf', ARGV[5], 'LIMIT', 0, ARGV[6])) do
    keys[#keys + 1] = key
  end
end
local removed = {}
for _, key in ipairs(keys) do
  if drop(key) then
    redis.call('HINCRBY', STATS, 'expirations', 1)
    removed[#removed + 1] = key
  end
end
return {removed, #keys}
"""

# ARGV[4..]: max_entries, max_bytes, policy. Returns the evicted keys.
_LUA_ENFORCE = """
return evict(tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], '')
"""

_FIELDS = (
    "namespace",
    "context",
    "model",
    "prompt",
    "body",
    "created_at",
    "expires_at",
    "completion_tokens",
    "prompt_tokens",
    "upstream_ms",
    "hits",
    "last_hit_at",
    "embedding",
)
_LFU_TIME = 2**32  # LFU score = hits * 2**32 + whole seconds: hits first, recency breaks ties


def _hash_fields(e: CacheEntry) -> list[bytes | str]:
    values: tuple[bytes | str, ...] = (
        e.namespace,
        e.context,
        e.model,
        e.prompt,
        e.body,
        repr(e.created_at),
        "" if e.expires_at is None else repr(e.expires_at),
        str(e.completion_tokens),
        str(e.prompt_tokens),
        repr(e.upstream_ms),
        str(e.hits),
        repr(e.last_hit_at),
        _embedding_bytes(e) or b"",
    )
    return [x for pair in zip(_FIELDS, values, strict=True) for x in pair]


def _entry_from_hash(key: str, h: dict[bytes, bytes]) -> CacheEntry:
    expires = h.get(b"expires_at", b"")
    return CacheEntry(
        key=key,
        namespace=h[b"namespace"].decode(),
        context=h[b"context"].decode(),
        model=h[b"model"].decode(),
        prompt=h[b"prompt"].decode(),
        body=h[b"body"],
        created_at=float(h[b"created_at"]),
        expires_at=float(expires) if expires else None,
        completion_tokens=int(h.get(b"completion_tokens", 0)),
        prompt_tokens=int(h.get(b"prompt_tokens", 0)),
        upstream_ms=float(h.get(b"upstream_ms", 0.0)),
        hits=int(h.get(b"hits", 0)),
        last_hit_at=float(h.get(b"last_hit_at", 0.0)),
        embedding=_embedding(h.get(b"embedding")),
    )


def _pairs(flat: list[Any]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _redacted(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username + ':***@' if parts.username else ':***@'}{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _id_bytes(raw: object) -> bytes:
    return raw if isinstance(raw, bytes) else str(raw).encode()


def _stream_id(raw: object) -> tuple[int, int]:
    ms, _, seq = _id_bytes(raw).partition(b"-")
    return int(ms), int(seq or 0)


def _messages(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XREAD's answer as (id, fields) pairs, whether the connection speaks RESP2 or RESP3."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else [messages for _, messages in reply]
    out = []
    for messages in streams:
        for message_id, fields in messages:
            out.append((message_id, fields if isinstance(fields, dict) else _pairs(list(fields))))
    return out


class RedisCacheStore:
    """CacheStore on a Redis server shared by replicas (see the module docstring for the layout)."""

    name = "redis"

    def __init__(
        self,
        url: str,
        prefix: str = "iros:cache",
        *,
        max_entries: int,
        max_memory_bytes: int,
        ttl_seconds: float | None,
        eviction: Eviction = "lru",
        client: Redis | None = None,
        timeout: float = 1.0,
        recheck_seconds: float = 1.0,
        sweep_seconds: float = 60.0,
        block_ms: int = 500,
        events_maxlen: int = 100_000,
    ) -> None:
        _check_limits(max_entries, max_memory_bytes, ttl_seconds)
        if eviction not in ("lru", "lfu"):
            raise ValueError(f"eviction must be 'lru' or 'lfu', not {eviction!r}")
        self.url = url
        self.where = _redacted(url)
        self.prefix = prefix
        self.max_entries = max_entries
        self.max_memory_bytes = max_memory_bytes
        self.ttl_seconds = ttl_seconds
        self.eviction = eviction
        self.sweep_seconds = sweep_seconds
        self.recheck_seconds = recheck_seconds
        # XREAD BLOCK must answer within the socket timeout, or the read times out and is retried.
        self.block_ms = block_ms
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self._owns_client = client is None
        if client is None:
            client = Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                # One quick retry covers a connection that died while idle (a Redis restart);
                # redis-py's default (10 with backoff) would hold a request for seconds.
                retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), 1),
            )
        elif client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("the Redis client must not decode responses: bodies and vectors are bytes")
        self._client = client
        self._keys = [f"{prefix}:{name}" for name in ("lru", "lfu", "size", "exp", "created", "stats")]
        self._keys.append(f"{prefix}:events")
        self._sizes, self._stats_key, self._events = self._keys[2], self._keys[5], self._keys[6]
        self._entry_prefix = f"{prefix}:e:"
        self._head: list[str | int] = [self._entry_prefix, self.replica, events_maxlen]
        script = client.register_script
        self._put = script(_LUA_COMMON + _LUA_PUT)
        self._get = script(_LUA_COMMON + _LUA_GET)
        self._hit = script(_LUA_COMMON + _LUA_HIT)
        self._remove = script(_LUA_COMMON + _LUA_REMOVE)
        self._sweep = script(_LUA_COMMON + _LUA_SWEEP)
        self._enforce = script(_LUA_COMMON + _LUA_ENFORCE)
        self._listener: CacheListener | None = None
        self.known: set[str] = set()  # keys reported to the listener as live
        self._last_id: bytes | None = None  # the last event read; None until the first sync
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._down_until = 0.0  # monotonic time until which calls fail without trying
        self._down_reason = ""

    @contextlib.contextmanager
    def _redis(self, doing: str) -> Iterator[None]:
        if time.monotonic() < self._down_until:
            raise CacheUnavailable(
                f"cache store Redis at {self.where} unavailable ({doing}): {self._down_reason} "
                f"(tried again within {self.recheck_seconds:g}s)"
            )
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            # Down rather than refusing one command: fail at once for a while, so that requests do not
            # each wait out the timeout. The event reader keeps trying and reopens it on success.
            self._down_reason = f"{type(exc).__name__}: {exc}"
            self._down_until = time.monotonic() + self.recheck_seconds
            raise CacheUnavailable(
                f"cache store Redis at {self.where} unavailable ({doing}): {self._down_reason}"
            ) from exc
        except RedisError as exc:
            raise CacheUnavailable(
                f"cache store Redis at {self.where} failed ({doing}): {type(exc).__name__}: {exc}"
            ) from exc

    def _ttl_arg(self) -> str:
        return "" if self.ttl_seconds is None else repr(self.ttl_seconds)

    # ------------------------------------------------------------------------- CacheStore

    async def start(self, listener: CacheListener) -> None:
        """Report every live entry, then follow the other replicas' changes. If Redis cannot be
        reached this raises CacheUnavailable, and the store keeps trying in the background."""
        self._listener = listener
        try:
            with self._redis("start"):
                await self._resync()
        finally:
            # Started after the first sync (or its failure, which the reader then retries).
            if not self._tasks:
                self._tasks = [
                    asyncio.create_task(self._follow(), name="iros-cache-events"),
                    asyncio.create_task(self._sweeper(), name="iros-cache-sweep"),
                ]

    async def get(self, key: str) -> CacheEntry | None:
        with self._redis("get"):
            reply = await self._get(self._keys, [*self._head, key, repr(time.time()), self._ttl_arg()])
        return self._read(key, reply)

    async def get_many(self, keys: list[str]) -> list[CacheEntry | None]:
        if not keys:
            return []
        now, ttl = repr(time.time()), self._ttl_arg()
        with self._redis("get"):
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    await self._get(self._keys, [*self._head, key, now, ttl], client=pipe)
                replies = await pipe.execute()
        return [self._read(key, reply) for key, reply in zip(keys, replies, strict=True)]

    def _read(self, key: str, reply: list[Any]) -> CacheEntry | None:
        if not reply:
            return None
        if len(reply) == 1:  # expired just now
            self._forget(key)
            return None
        return _entry_from_hash(key, _pairs(reply))

    async def put(self, entry: CacheEntry) -> None:
        deadline = _deadline(entry, self.ttl_seconds)
        if deadline is not None and deadline <= time.time():
            return
        size = entry.size
        if size > self.max_memory_bytes:
            with self._redis("put"):
                await self._client.hincrby(self._stats_key, "too_large", 1)
            return
        recency = _recency(entry)
        args = [
            *self._head,
            entry.key,
            self.max_entries,
            self.max_memory_bytes,
            self.eviction,
            size,
            repr(recency),
            entry.hits * _LFU_TIME + math.floor(recency),
            repr(entry.created_at),
            "" if deadline is None else math.ceil(deadline * 1000),
            *_hash_fields(entry),
        ]
        fresh = entry.key not in self.known
        self.known.add(entry.key)  # before the script: the reader then skips the add event it causes
        try:
            with self._redis("put"):
                victims = await self._put(self._keys, args)
        except CacheUnavailable:
            if fresh:
                self.known.discard(entry.key)
            raise
        for victim in victims:
            self._forget(victim.decode())
        _tell_added(self._listener, entry)

    async def record_hit(self, key: str, kind: str) -> None:
        if kind not in HIT_KINDS:
            raise ValueError(f"hit kind must be one of {HIT_KINDS}, not {kind!r}")
        with self._redis("record_hit"):
            await self._hit(self._keys, [*self._head, key, kind, repr(time.time())])

    async def delete(self, key: str) -> bool:
        live, _ = await self._drop_keys([key], "deletes")
        return bool(live)

    async def clear(self, namespace: str | None = None) -> int:
        removed = 0
        with self._redis("clear"):
            batch: list[str] = []
            async for member, _ in self._client.zscan_iter(self._sizes, count=500):
                batch.append(member.decode())
                if len(batch) >= 500:
                    removed += await self._clear_batch(batch, namespace)
                    batch = []
            if batch:
                removed += await self._clear_batch(batch, namespace)
        return removed

    async def _clear_batch(self, keys: list[str], namespace: str | None) -> int:
        if namespace is not None:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hget(self._entry_prefix + key, "namespace")
                spaces = await pipe.execute()
            keys = [k for k, ns in zip(keys, spaces, strict=True) if ns == namespace.encode()]
        live, _ = await self._drop_keys(keys, "cleared")
        return len(live)

    async def _drop_keys(self, keys: list[str], counter: str) -> tuple[list[str], list[str]]:
        if not keys:
            return [], []
        with self._redis(counter):
            live, expired = await self._remove(self._keys, [*self._head, counter, *keys])
        gone = [k.decode() for k in live], [k.decode() for k in expired]
        for key in gone[0] + gone[1]:
            self._forget(key)
        return gone

    async def entries(self) -> AsyncIterator[CacheEntry]:
        with self._redis("entries"):
            # A set: ZSCAN may return a member twice.
            keys = list({m.decode() async for m, _ in self._client.zscan_iter(self._sizes, count=500)})
        now = time.time()
        for start in range(0, len(keys), 500):
            with self._redis("entries"):
                batch = await self._fetch(keys[start : start + 500])
            for entry in batch:
                if entry is not None and not _expired(entry, self.ttl_seconds, now):
                    yield entry

    async def _fetch(self, keys: list[str]) -> list[CacheEntry | None]:
        """The entries as stored (no expiry bookkeeping); None for a hash that is gone. Raises
        RedisError: the event reader calls it too, and must not be stopped by the fail-fast window."""
        async with self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(self._entry_prefix + key)
            hashes = await pipe.execute()
        return [_entry_from_hash(k, h) if h else None for k, h in zip(keys, hashes, strict=True)]

    async def set_limits(self, max_entries: int, max_memory_bytes: int, ttl_seconds: float | None) -> None:
        _check_limits(max_entries, max_memory_bytes, ttl_seconds)
        self.max_entries, self.max_memory_bytes, self.ttl_seconds = max_entries, max_memory_bytes, ttl_seconds
        await self.sweep()
        with self._redis("set_limits"):
            victims = await self._enforce(
                self._keys, [*self._head, max_entries, max_memory_bytes, self.eviction]
            )
        for victim in victims:
            self._forget(victim.decode())

    async def sweep(self) -> int:
        """Finish the removal of expired entries now (also done every sweep_seconds)."""
        removed, batch = 0, 500
        while True:
            now = time.time()
            oldest = "" if self.ttl_seconds is None else repr(now - self.ttl_seconds)
            with self._redis("sweep"):
                keys, looked = await self._sweep(
                    self._keys, [*self._head, math.floor(now * 1000), oldest, batch]
                )
            for key in keys:
                self._forget(key.decode())
            removed += len(keys)
            if looked < batch:
                return removed

    async def stats(self) -> dict[str, Any]:
        with self._redis("stats"):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.hgetall(self._stats_key)
                pipe.zcard(self._sizes)
                raw, count = await pipe.execute()
        counters = {k.decode(): int(v) for k, v in raw.items()}
        return _stats(
            counters,
            backend=self.name,
            url=self.where,
            prefix=self.prefix,
            replica=self.replica,
            entries=count,
            bytes=counters.get("bytes", 0),
            max_entries=self.max_entries,
            max_memory_bytes=self.max_memory_bytes,
            ttl_seconds=self.ttl_seconds,
            eviction=self.eviction,
            known=len(self.known),
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            # Cancelled until it ends: on Python 3.11 a cancel that lands while redis-py flushes a
            # command (asyncio.wait_for around drain) can be swallowed. The loops also check _closed.
            while not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=0.1)
        self._tasks = []
        if self._owns_client:
            await self._client.aclose()

    # ------------------------------------------------------------------------- keeping in step

    def _forget(self, key: str) -> None:
        if key in self.known:
            self.known.discard(key)
            _tell_removed(self._listener, key)

    async def _resync(self) -> None:
        """Report what changed while events may have been missed (everything, the first time)."""
        newest = await self._client.xrevrange(self._events, count=1)
        last_id = _id_bytes(newest[0][0]) if newest else b"0-0"
        live = {m.decode() async for m, _ in self._client.zscan_iter(self._sizes, count=1000)}
        for key in self.known - live:
            self._forget(key)
        new = [key for key in live if key not in self.known]
        now = time.time()
        for start in range(0, len(new), 500):
            for entry in await self._fetch(new[start : start + 500]):
                if entry is not None and not _expired(entry, self.ttl_seconds, now):
                    self.known.add(entry.key)
                    _tell_added(self._listener, entry)
        self._last_id = last_id

    async def _lost_events(self) -> bool:
        """Whether events after the last one read are gone: the stream restarted or was trimmed."""
        assert self._last_id is not None
        first = await self._client.xrange(self._events, count=1)
        if not first:
            return self._last_id != b"0-0"
        return _stream_id(first[0][0]) > _stream_id(self._last_id)

    async def _follow(self) -> None:
        failing, suspect, pause = False, False, 0.1
        while not self._closed:
            try:
                if self._last_id is None:
                    await self._resync()
                elif suspect and await self._lost_events():
                    log.warning("cache events from %s were lost; resynchronising", self.where)
                    await self._resync()
                suspect = False
                assert self._last_id is not None
                reply = await self._client.xread(
                    {self._events: self._last_id}, count=1000, block=self.block_ms
                )
                self._down_until = 0.0
                if failing:
                    log.warning("cache store Redis at %s answers again", self.where)
                    failing, pause = False, 0.1
                messages = _messages(reply)
                suspect = len(messages) >= 1000  # far behind: the stream may have been trimmed past us
                await self._apply(messages)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning(
                        "cache store Redis at %s unreachable (%s: %s); following its events again "
                        "once it answers",
                        self.where,
                        type(exc).__name__,
                        exc,
                    )
                    failing = True
                suspect = True
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)
            except Exception:
                log.exception("cache events: unexpected failure; retrying")
                await asyncio.sleep(1.0)

    async def _apply(self, messages: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        if not messages:
            return
        latest: dict[str, tuple[bytes, bool]] = {}  # key -> (its last op, whether this replica made it)
        for _, fields in messages:
            key = fields[b"key"].decode()
            latest.pop(key, None)
            latest[key] = (fields[b"op"], fields[b"by"].decode() == self.replica)
        fetch = []
        for key, (op, own) in latest.items():
            if op == b"del":
                # Own removals too: a fetch for an earlier add may have brought the key back.
                self._forget(key)
            elif not (own and key in self.known):
                # Another replica's add, or our own that a later-read del from elsewhere undid.
                fetch.append(key)
        now = time.time()
        for key, entry in zip(fetch, await self._fetch(fetch) if fetch else [], strict=True):
            if entry is None or _expired(entry, self.ttl_seconds, now):
                self._forget(key)
            else:
                self.known.add(key)
                _tell_added(self._listener, entry)
        self._last_id = _id_bytes(messages[-1][0])

    async def _sweeper(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.sweep_seconds)
            try:
                await self.sweep()
            except CacheUnavailable as exc:
                log.debug("cache sweep skipped: %s", exc)
            except Exception:
                log.exception("cache sweep failed")
