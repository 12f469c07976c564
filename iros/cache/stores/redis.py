"""RedisCacheStore: the cache store shared by replicas, kept in step through a Redis stream.

store = RedisCacheStore("redis://127.0.0.1:6379/0", "iros:cache", max_entries=100_000,
                        max_memory_bytes=512 * 2**20, ttl_seconds=86400, eviction="lru")
await store.start(listener)   # reports every live entry, then follows the other replicas' changes
await store.put(entry)        # one Lua script: store, evict, emit the event (iros.cache.stores.redis_layout)
await store.close()

The rules (TTL, limits, eviction order, counters) are those of iros.cache.stores.common; all replicas share
the prefix and must agree on the limits. The keys and scripts are described in redis_layout.py.

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
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from iros.cache.base import CacheEntry, CacheListener
from iros.cache.stores.common import (
    CacheUnavailable,
    Eviction,
    StoreLimits,
    check_hit_kind,
    deadline_of,
    is_expired,
    recency_of,
    stats_doc,
    tell_added,
    tell_removed,
)
from iros.cache.stores.redis_layout import LFU_TIME, Scripts, entry_from_hash, hash_fields, pairs
from iros.core.redact import redact_url

log = logging.getLogger(__name__)

__all__ = ["RedisCacheStore"]


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
            out.append((message_id, fields if isinstance(fields, dict) else pairs(list(fields))))
    return out


class RedisCacheStore(StoreLimits):
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
        self.init_limits(max_entries, max_memory_bytes, ttl_seconds, eviction)
        self.url = url
        self.where = redact_url(url)
        self.prefix = prefix
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
        self._scripts = Scripts(client)
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
            reply = await self._scripts.get(
                self._keys, [*self._head, key, repr(time.time()), self._ttl_arg()]
            )
        return self._read(key, reply)

    async def get_many(self, keys: list[str]) -> list[CacheEntry | None]:
        if not keys:
            return []
        now, ttl = repr(time.time()), self._ttl_arg()
        with self._redis("get"):
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    await self._scripts.get(self._keys, [*self._head, key, now, ttl], client=pipe)
                replies = await pipe.execute()
        return [self._read(key, reply) for key, reply in zip(keys, replies, strict=True)]

    def _read(self, key: str, reply: list[Any]) -> CacheEntry | None:
        if not reply:
            return None
        if len(reply) == 1:  # expired just now
            self._forget(key)
            return None
        return entry_from_hash(key, pairs(reply))

    async def put(self, entry: CacheEntry) -> None:
        deadline = deadline_of(entry, self.ttl_seconds)
        if deadline is not None and deadline <= time.time():
            return
        size = entry.size
        if size > self.max_memory_bytes:
            with self._redis("put"):
                await self._client.hincrby(self._stats_key, "too_large", 1)
            return
        recency = recency_of(entry)
        args = [
            *self._head,
            entry.key,
            self.max_entries,
            self.max_memory_bytes,
            self.eviction,
            size,
            repr(recency),
            entry.hits * LFU_TIME + math.floor(recency),
            repr(entry.created_at),
            "" if deadline is None else math.ceil(deadline * 1000),
            *hash_fields(entry),
        ]
        fresh = entry.key not in self.known
        self.known.add(entry.key)  # before the script: the reader then skips the add event it causes
        try:
            with self._redis("put"):
                victims = await self._scripts.put(self._keys, args)
        except CacheUnavailable:
            if fresh:
                self.known.discard(entry.key)
            raise
        for victim in victims:
            self._forget(victim.decode())
        tell_added(self._listener, entry)

    async def record_hit(self, key: str, kind: str) -> None:
        check_hit_kind(kind)
        with self._redis("record_hit"):
            await self._scripts.hit(self._keys, [*self._head, key, kind, repr(time.time())])

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
            live, expired = await self._scripts.remove(self._keys, [*self._head, counter, *keys])
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
                if entry is not None and not is_expired(entry, self.ttl_seconds, now):
                    yield entry

    async def _fetch(self, keys: list[str]) -> list[CacheEntry | None]:
        """The entries as stored (no expiry bookkeeping); None for a hash that is gone. Raises
        RedisError: the event reader calls it too, and must not be stopped by the fail-fast window."""
        async with self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(self._entry_prefix + key)
            hashes = await pipe.execute()
        return [entry_from_hash(k, h) if h else None for k, h in zip(keys, hashes, strict=True)]

    async def set_limits(self, max_entries: int, max_memory_bytes: int, ttl_seconds: float | None) -> None:
        self.apply_limits(max_entries, max_memory_bytes, ttl_seconds)
        await self.sweep()
        with self._redis("set_limits"):
            victims = await self._scripts.enforce(
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
                keys, looked = await self._scripts.sweep(
                    self._keys, [*self._head, math.floor(now * 1000), oldest, batch]
                )
            for key in keys:
                self._forget(key.decode())
            removed += len(keys)
            if looked < batch:
                return removed

    async def stats(self) -> dict[str, Any]:
        """The store's figures; with Redis unreachable, status "unavailable" and the error instead of
        the figures Redis holds (status pages must answer while the cache is bypassed)."""
        status, error, counters, count = "ok", None, {}, None
        try:
            with self._redis("stats"):
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.hgetall(self._stats_key)
                    pipe.zcard(self._sizes)
                    raw, count = await pipe.execute()
            counters = {k.decode(): int(v) for k, v in raw.items()}
        except CacheUnavailable as exc:
            status, error = "unavailable", str(exc)
        return stats_doc(
            counters,
            backend=self.name,
            status=status,
            error=error,
            url=self.where,
            prefix=self.prefix,
            replica=self.replica,
            entries=count,
            bytes=counters.get("bytes", 0) if count is not None else None,
            **self.limits_stats(),
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
            tell_removed(self._listener, key)

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
                if entry is not None and not is_expired(entry, self.ttl_seconds, now):
                    self.known.add(entry.key)
                    tell_added(self._listener, entry)
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
            if entry is None or is_expired(entry, self.ttl_seconds, now):
                self._forget(key)
            else:
                self.known.add(key)
                tell_added(self._listener, entry)
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
