"""The cache stores against real backends: a SQLite file and a real redis-server, no mocks.

The same behaviour tests run on both stores; the Redis ones add replicas following each other through
the event stream, and Redis going away and coming back.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from redis.asyncio import Redis

from iros.cache.base import CacheEntry, CacheStore
from iros.cache.stores.common import CacheUnavailable
from iros.cache.stores.redis import RedisCacheStore
from iros.cache.stores.sqlite import SQLiteCacheStore
from iros.testing.redis import RedisServer

Store = SQLiteCacheStore | RedisCacheStore


class Recorder:
    """A CacheListener that keeps what it was told: the live entries, and every call in order."""

    def __init__(self) -> None:
        self.live: dict[str, CacheEntry] = {}
        self.calls: list[tuple[str, str]] = []

    def added(self, entry: CacheEntry) -> None:
        self.live[entry.key] = entry
        self.calls.append(("added", entry.key))

    def removed(self, key: str) -> None:
        self.live.pop(key, None)
        self.calls.append(("removed", key))

    def removals(self) -> list[str]:
        return [key for call, key in self.calls if call == "removed"]


def entry(
    key: str,
    *,
    namespace: str = "ns",
    body: bytes = b'{"choices": []}',
    age: float = 0.0,
    expires_in: float | None = None,
    embedding: bool = False,
) -> CacheEntry:
    now = time.time()
    return CacheEntry(
        key=key,
        namespace=namespace,
        context=f"ctx-{namespace}",
        model="fast",
        prompt=f"question {key}",
        body=body,
        created_at=now - age,
        expires_at=None if expires_in is None else now + expires_in,
        completion_tokens=7,
        prompt_tokens=11,
        upstream_ms=123.5,
        embedding=np.linspace(-1, 1, 8, dtype=np.float32) if embedding else None,
    )


async def eventually(check: Callable[[], bool], within: float = 1.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s")
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


Make = Callable[..., Awaitable[tuple[Store, Recorder]]]


@pytest.fixture(params=["sqlite", "redis"])
async def make(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[Make]:
    """Opens stores of one kind on the same file or Redis prefix (a second one is a restart or a
    replica), started with a fresh Recorder; closes them all afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    stores: list[Store] = []

    async def open_store(
        *,
        max_entries: int = 100,
        max_memory_bytes: int = 10**7,
        ttl_seconds: float | None = None,
        eviction: str = "lru",
        **kw: Any,
    ) -> tuple[Store, Recorder]:
        limits: dict[str, Any] = {
            "max_entries": max_entries,
            "max_memory_bytes": max_memory_bytes,
            "ttl_seconds": ttl_seconds,
            "eviction": eviction,
            **kw,
        }
        store: Store
        if request.param == "sqlite":
            store = SQLiteCacheStore(tmp_path / "cache.db", flush_seconds=0.05, **limits)
        else:
            store = RedisCacheStore(redis_server.url, prefix, **limits)
        stores.append(store)
        listener = Recorder()
        await store.start(listener)
        return store, listener

    yield open_store
    for store in stores:
        await store.close()


def test_stores_implement_the_protocol() -> None:
    """Both classes satisfy CacheStore as mypy sees it."""
    stores: list[type[CacheStore]] = [SQLiteCacheStore, RedisCacheStore]
    assert [s.name for s in stores] == ["sqlite", "redis"]


@pytest.mark.e2e
class TestBothStores:
    async def test_put_get_round_trip(self, make: Make) -> None:
        """Every field comes back as stored, the embedding as float32; absent keys are None."""
        store, listener = await make()
        stored = entry("a", embedding=True, expires_in=60)
        await store.put(stored)
        got = await store.get("a")
        assert got is not None and got.embedding is not None and stored.embedding is not None
        assert got.embedding.dtype == np.float32
        assert np.array_equal(got.embedding, stored.embedding)
        fields = ("namespace", "context", "model", "prompt", "body", "created_at", "expires_at")
        more = ("completion_tokens", "prompt_tokens", "upstream_ms", "hits", "last_hit_at")
        for name in fields + more:
            assert getattr(got, name) == getattr(stored, name), name
        assert got.size == stored.size
        await store.put(entry("b"))
        many = await store.get_many(["b", "missing", "a"])
        assert [e.key if e else None for e in many] == ["b", None, "a"]
        assert await store.get_many([]) == []
        assert sorted([e.key async for e in store.entries()]) == ["a", "b"]
        assert listener.calls == [("added", "a"), ("added", "b")]

    async def test_ttl_and_expires_at(self, make: Make) -> None:
        """An entry dies at its TTL or its own expires_at, whichever is first; a get or the sweep
        removes it, counts an expiration and tells the listener."""
        # Margins of half a second or more: a loaded machine must not turn a live entry into an expired one.
        store, listener = await make(ttl_seconds=1.0)
        await store.put(entry("ttl"))
        await store.put(entry("own", expires_in=0.2))
        await store.put(entry("swept"))
        await store.put(entry("already", age=2.0))  # past its TTL when put: not stored
        assert await store.get("own") is not None
        await asyncio.sleep(0.3)
        assert await store.get("own") is None
        assert await store.get("ttl") is not None
        await asyncio.sleep(0.8)
        assert await store.get("ttl") is None
        assert await store.sweep() == 1
        assert set(listener.removals()) == {"own", "ttl", "swept"} and not listener.live
        assert (await store.stats())["expirations"] == 3
        assert [e async for e in store.entries()] == []

    async def test_lru_evicts_least_recently_used(self, make: Make) -> None:
        """Under max_entries, LRU drops the entry hit (or stored) longest ago."""
        store, listener = await make(max_entries=3, eviction="lru")
        for i, key in enumerate("abc"):
            await store.put(entry(key, age=10 - i))
        await store.record_hit("a", "exact")
        await store.put(entry("d"))
        assert listener.removals() == ["b"]
        await store.put(entry("e"))
        assert listener.removals() == ["b", "c"]
        assert sorted(listener.live) == ["a", "d", "e"]
        stats = await store.stats()
        assert stats["entries"] == 3
        assert stats["evictions"] == {"entries": 2, "memory": 0}
        assert stats["evictions_by_policy"] == {"lru": 2, "lfu": 0}

    async def test_lfu_evicts_least_frequently_used(self, make: Make) -> None:
        """Under max_entries, LFU drops the entry with fewest hits, the oldest of equals, never the
        one just stored."""
        store, listener = await make(max_entries=3, eviction="lfu")
        for i, key in enumerate("abc"):
            await store.put(entry(key, age=10 - i))
        for key in "aac":
            await store.record_hit(key, "exact")
        await store.put(entry("d"))
        assert listener.removals() == ["b"]
        await store.put(entry("e"))  # d has no hits either, and is older than e
        assert listener.removals() == ["b", "d"]
        await store.record_hit("e", "semantic")
        await store.record_hit("e", "semantic")
        await store.put(entry("f"))  # now c (1 hit) is the least used
        assert listener.removals() == ["b", "d", "c"]
        assert (await store.stats())["evictions_by_policy"] == {"lru": 0, "lfu": 3}

    async def test_max_memory_evicts_and_refuses_giants(self, make: Make) -> None:
        """The sizes of the live entries stay within max_memory_bytes; an entry larger than the
        whole budget is not stored."""
        size = entry("x", body=b"x" * 1000).size
        store, listener = await make(max_memory_bytes=3 * size + 10)
        for i, key in enumerate("abcde"):
            await store.put(entry(key, body=b"x" * 1000, age=10 - i))
        stats = await store.stats()
        assert stats["entries"] == 3 and stats["bytes"] == 3 * size <= stats["max_memory_bytes"]
        assert stats["evictions"] == {"entries": 0, "memory": 2}
        assert listener.removals() == ["a", "b"]
        await store.put(entry("giant", body=b"x" * 4 * size))
        assert await store.get("giant") is None
        stats = await store.stats()
        assert stats["too_large"] == 1 and stats["entries"] == 3

    async def test_replace_delete_and_counters(self, make: Make) -> None:
        """A put under a live key replaces it (no removal, bytes adjusted); delete and the hit
        counters are reported in stats."""
        store, listener = await make()
        await store.put(entry("a"))
        await store.put(entry("a", body=b"y" * 500))
        got = await store.get("a")
        assert got is not None and got.body == b"y" * 500
        await store.record_hit("a", "exact")
        await store.record_hit("a", "semantic")
        await store.record_hit("a", "semantic")
        await store.record_hit("gone", "exact")  # counted: the hit was served
        with pytest.raises(ValueError, match="hit kind"):
            await store.record_hit("a", "fuzzy")
        got = await store.get("a")
        assert got is not None and got.hits == 3 and got.last_hit_at > got.created_at
        assert await store.delete("a") is True
        assert await store.delete("a") is False
        assert listener.calls == [("added", "a"), ("added", "a"), ("removed", "a")]
        stats = await store.stats()
        assert stats["hits"] == {"exact": 2, "semantic": 2}
        assert (stats["puts"], stats["deletes"], stats["entries"], stats["bytes"]) == (2, 1, 0, 0)

    async def test_clear_by_namespace(self, make: Make) -> None:
        """clear(namespace) removes that namespace only; clear() removes everything."""
        store, listener = await make()
        for key, ns in [("a", "t1"), ("b", "t1"), ("c", "t2")]:
            await store.put(entry(key, namespace=ns))
        assert await store.clear("t1") == 2
        assert sorted(listener.removals()) == ["a", "b"]
        assert await store.get("c") is not None
        assert await store.clear("nobody") == 0
        assert await store.clear() == 1
        assert not listener.live
        assert (await store.stats())["cleared"] == 3

    async def test_set_limits_applies_at_once(self, make: Make) -> None:
        """Lower limits evict now; a lower TTL expires the entries already older than it."""
        store, listener = await make()
        for i, key in enumerate("abcd"):
            await store.put(entry(key, age=4 - i))
        await store.set_limits(3, 10**7, None)
        assert listener.removals() == ["a"]
        await store.set_limits(3, 10**7, 2.5)  # b is 3 s old
        assert listener.removals() == ["a", "b"]
        assert sorted(listener.live) == ["c", "d"]

    async def test_restart_keeps_entries_and_counters(self, make: Make) -> None:
        """A new store on the same file or Redis prefix reports the entries, hits and counters of
        the old one."""
        store, _ = await make()
        await store.put(entry("a", embedding=True))
        await store.put(entry("b"))
        await store.record_hit("a", "exact")
        await store.close()
        again, listener = await make()
        assert sorted(listener.live) == ["a", "b"]
        got = await again.get("a")
        assert got is not None and got.hits == 1 and got.embedding is not None
        stats = await again.stats()
        assert (stats["entries"], stats["puts"], stats["hits"]["exact"]) == (2, 2, 1)


class TestSQLite:
    async def test_expired_while_down_and_lower_limits_at_start(self, tmp_path: Path) -> None:
        """Entries that expired while the process was down, or that exceed limits lowered since, are
        dropped at start before the listener hears of them."""
        path = tmp_path / "c.db"
        store = SQLiteCacheStore(path, max_entries=10, max_memory_bytes=10**7, ttl_seconds=None)
        await store.start(Recorder())
        await store.put(entry("short", expires_in=0.1))
        for i, key in enumerate("abc"):
            await store.put(entry(key, age=10 - i))
        await store.close()
        await asyncio.sleep(0.15)
        store = SQLiteCacheStore(path, max_entries=2, max_memory_bytes=10**7, ttl_seconds=None)
        listener = Recorder()
        await store.start(listener)
        assert listener.calls == [("added", "b"), ("added", "c")]
        stats = await store.stats()
        assert stats["expirations"] == 1 and stats["evictions"]["entries"] == 1
        await store.close()
        store = SQLiteCacheStore(path, max_entries=10, max_memory_bytes=10**7, ttl_seconds=None)
        await store.start(listener := Recorder())
        assert sorted(listener.live) == ["b", "c"]  # the drops were written too
        await store.close()

    async def test_unwritable_file_keeps_serving_from_memory(self, tmp_path: Path) -> None:
        """A database that cannot be opened is reported in stats; the cache still works in memory."""
        blocker = tmp_path / "file"
        blocker.write_text("")
        store = SQLiteCacheStore(blocker / "c.db", max_entries=10, max_memory_bytes=10**7, ttl_seconds=None)
        await store.start(Recorder())
        await store.put(entry("a"))
        assert await store.get("a") is not None
        await store.flush()
        stats = await store.stats()
        assert stats["last_error"] and stats["pending_writes"] == 1 and stats["status"] == "unwritable"
        await store.close()  # tries the write once more, and reports rather than raises


@pytest.mark.e2e
class TestRedis:
    @pytest.mark.parametrize("make", ["redis"], indirect=True)
    async def test_replicas_follow_each_other(self, make: Make) -> None:
        """What one replica puts, deletes, evicts or finds expired reaches the other's listener
        through the event stream within a second; a replica is not told its own changes twice."""
        a, seen_by_a = await make(max_entries=3, ttl_seconds=0.5)
        b, seen_by_b = await make(max_entries=3, ttl_seconds=0.5)
        assert isinstance(a, RedisCacheStore) and isinstance(b, RedisCacheStore)
        await a.put(entry("k1", embedding=True))
        await eventually(lambda: "k1" in seen_by_b.live)
        got = seen_by_b.live["k1"].embedding
        assert got is not None and got.dtype == np.float32

        assert await b.delete("k1")
        await eventually(lambda: "k1" not in seen_by_a.live)

        for key in ("k2", "k3", "k4"):
            await a.put(entry(key))
        await b.put(entry("k5"))  # b's put evicts a's oldest
        await eventually(lambda: sorted(seen_by_a.live) == ["k3", "k4", "k5"])
        await eventually(lambda: sorted(seen_by_b.live) == ["k3", "k4", "k5"])

        await asyncio.sleep(0.55)
        assert await b.get("k3") is None  # b finds it expired: a hears of it
        await eventually(lambda: "k3" not in seen_by_a.live)
        await b.sweep()
        await eventually(lambda: not seen_by_a.live and not seen_by_b.live)
        assert seen_by_a.calls.count(("added", "k2")) == 1
        assert (await a.stats())["expirations"] == 3

    async def test_down_then_back(self) -> None:
        """With Redis stopped every call but stats raises CacheUnavailable naming the URL, quickly (stats
        reports it); once it is back (empty) the store works again, and the other replica resynchronises
        and follows."""
        with RedisServer() as server:
            a = RedisCacheStore(server.url, "p", max_entries=10, max_memory_bytes=10**7, ttl_seconds=None)
            b = RedisCacheStore(server.url, "p", max_entries=10, max_memory_bytes=10**7, ttl_seconds=None)
            seen_by_b = Recorder()
            try:
                await a.start(Recorder())
                await b.start(seen_by_b)
                await a.put(entry("before"))
                await eventually(lambda: "before" in seen_by_b.live)

                server.stop()
                for call in (a.get("x"), a.put(entry("y")), a.get_many(["x"])):
                    started = time.monotonic()
                    with pytest.raises(CacheUnavailable, match=re.escape(server.url)):
                        await call
                    assert time.monotonic() - started < 1.5
                # Status pages still answer: stats says the store is unavailable, and why.
                down = await a.stats()
                assert down["status"] == "unavailable" and server.url in down["error"]
                assert down["entries"] is None and down["max_entries"] == 10
                # After a failure calls fail at once for a while rather than each waiting on Redis.
                started = time.monotonic()
                with pytest.raises(CacheUnavailable, match="tried again within"):
                    await a.record_hit("x", "exact")
                assert time.monotonic() - started < 0.05

                server.start()
                deadline = time.monotonic() + 3.0
                while True:
                    try:
                        assert await a.get("x") is None
                        break
                    except CacheUnavailable:
                        assert time.monotonic() < deadline, "not back within 3 s"
                        await asyncio.sleep(0.05)
                await a.put(entry("after"))
                assert (await a.stats())["status"] == "ok"
                # Redis came back without its data: b learns "before" is gone, and sees "after".
                await eventually(lambda: sorted(seen_by_b.live) == ["after"], within=5.0)
            finally:
                await a.close()
                await b.close()

    async def test_injected_client_is_used_and_left_open(self, redis_server: RedisServer) -> None:
        """A given client is used as is and not closed; one that decodes responses is refused."""
        client = Redis.from_url(redis_server.url)
        store = RedisCacheStore(
            redis_server.url, "inj", max_entries=5, max_memory_bytes=10**6, ttl_seconds=None, client=client
        )
        await store.start(Recorder())
        await store.put(entry("a"))
        await store.close()
        assert await client.exists("inj:e:a") == 1
        await client.flushdb()
        await client.aclose()
        with pytest.raises(ValueError, match="decode"):
            RedisCacheStore(
                redis_server.url,
                max_entries=5,
                max_memory_bytes=10**6,
                ttl_seconds=None,
                client=Redis.from_url(redis_server.url, decode_responses=True),
            )
