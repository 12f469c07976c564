"""The shared state backends keep their contract (documents, logs, leases with fencing, token buckets)
on the data directory and on a real redis-server; the sync loop, the evaluator's lease and the rate
limiter's fallback work on top of them."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from iros.core.errors import IrosError
from iros.gateway.auth import Principal, Role
from iros.gateway.ratelimit import RateLimiter
from iros.state import local
from iros.state.base import StateBackend, StateUnavailable
from iros.state.lease import Leadership
from iros.state.local import LocalState
from iros.state.redis import RedisState
from iros.state.sync import SharedState
from iros.testing.redis import RedisServer


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.e2e)])
async def pair(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[list[StateBackend]]:
    """Two workers' backends on the same shared state."""
    backends: list[StateBackend]
    if request.param == "local":
        backends = [LocalState(tmp_path), LocalState(tmp_path)]
    else:
        server = request.getfixturevalue("redis_server")
        prefix = f"test:{secrets.token_hex(4)}"
        backends = [RedisState(server.url, prefix), RedisState(server.url, prefix)]
    for b in backends:
        await b.start()
    yield backends
    for b in backends:
        await b.close()


async def test_a_document_put_by_one_worker_is_read_by_another(pair: list[StateBackend]) -> None:
    """Each put gets a higher version; changed(since) returns only what was put after `since`."""
    one, two = pair
    v1 = await one.put("tuning", {"x": 1})
    v2 = await one.put("rules", {"y": 2})
    assert v2 > v1 > 0
    version, docs = await two.changed(0)
    assert version == v2 and docs == {"tuning": {"x": 1}, "rules": {"y": 2}}
    assert await two.changed(v2) == (v2, {})
    assert await two.put("tuning", {"x": 5}, only_if_absent=True) == 0
    assert (await one.changed(v1))[1] == {"rules": {"y": 2}}


async def test_a_log_is_read_in_order_from_a_position(pair: list[StateBackend]) -> None:
    """Entries appended by one worker come back to another in order, each once."""
    one, two = pair
    await one.append("events", b"a")
    position, entries = await two.read("events", None)
    assert entries == [b"a"]
    await one.append("events", b"b")
    await one.append("events", b"c")
    position, entries = await two.read("events", position)
    assert entries == [b"b", b"c"]
    assert (await two.read("events", position))[1] == []


async def test_a_log_appended_with_maxlen_keeps_its_latest_entries_however_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the data directory a log kept by count outlives the age window (any process's prune honours
    it) and keeps its latest entries, give or take one prune's worth; other logs still age out."""
    monkeypatch.setattr(local, "LOG_KEEP_SECONDS", -1.0)  # every entry is already too old
    one, two = LocalState(tmp_path), LocalState(tmp_path)
    await one.append("outcomes", b"0", maxlen=10)
    for i in range(1, 2 * local.PRUNE_EVERY + 2):
        await two.append("events", b"e")  # the pruning process never appended to "outcomes" itself
        await one.append("outcomes", b"%d" % i, maxlen=10)
    assert (await one.read("events", None))[1] == []
    kept = (await two.read("outcomes", None))[1]
    assert 10 <= len(kept) <= 10 + local.PRUNE_EVERY
    assert kept == [
        b"%d" % i for i in range(2 * local.PRUNE_EVERY + 2 - len(kept), 2 * local.PRUNE_EVERY + 2)
    ]
    await one.close()
    await two.close()


async def test_one_worker_holds_the_lease_and_a_lost_one_fences_its_writes(pair: list[StateBackend]) -> None:
    """The holder renews with the same token; the other gets none until release, then a higher one; the
    old token can no longer append."""
    one, two = pair
    token = await one.lease("evaluator", 5.0)
    assert token is not None
    assert await one.lease("evaluator", 5.0) == token
    assert await two.lease("evaluator", 5.0) is None
    assert await one.append_fenced("alerts", b"x", "evaluator", token)
    await one.release("evaluator", token)
    taken = await two.lease("evaluator", 5.0)
    assert taken is not None and taken > token
    assert not await one.holds("evaluator", token)
    assert not await one.append_fenced("alerts", b"late", "evaluator", token)
    assert (await two.read("alerts", None))[1] == [b"x"]


async def test_two_workers_share_one_bucket(pair: list[StateBackend]) -> None:
    """A bucket of 5 tokens refilled at 0.01/s lets 5 of 10 takes through, whichever worker takes; a take
    of several tokens gets what is left."""
    one, two = pair
    results = await asyncio.gather(*(w.take("rate:alice", 0.01, 5.0) for w in (one, two) * 5))
    assert sum(taken for taken, _ in results) == 5
    assert all(wait > 0 for taken, wait in results if not taken)
    assert await one.take("rate:bob", 0.01, 5.0, 3) == (3, 0.0)
    taken, wait = await two.take("rate:bob", 0.01, 5.0, 3)
    assert taken == 2 and wait > 0


async def test_shared_documents_and_logs_reach_the_other_worker(pair: list[StateBackend]) -> None:
    """A document published by one SharedState is applied by the other and not by itself; a log entry
    reaches the other's follower."""
    views: list[dict[str, Any]] = [{"v": 0}, {"v": 0}]
    applied: list[list[Any]] = [[], []]
    heard: list[list[Any]] = [[], []]
    syncs = [SharedState(b, poll=0.05) for b in pair]
    for i, sync in enumerate(syncs):
        sync.register("doc", lambda i=i: dict(views[i]), lambda body, i=i: applied[i].append(body))
        sync.follow("log", lambda entries, i=i: heard[i].extend(e["n"] for e in entries), from_start=False)
        await sync.start()
    views[0]["v"] = 7
    assert await syncs[0].publish("doc")
    assert await syncs[0].append("log", {"n": 1})
    for _ in range(100):
        if applied[1] and heard[1]:
            break
        await asyncio.sleep(0.05)
    assert applied == [[], [{"v": 7}]]
    assert heard == [[], [1]]
    for sync in syncs:
        await sync.close()


async def test_the_lease_passes_to_the_other_worker_when_its_holder_stops(pair: list[StateBackend]) -> None:
    """Of two Leaderships one leads; when it closes, the other takes over on its next step."""
    one, two = (Leadership(b, "evaluator", ttl=1.0) for b in pair)
    told: list[bool] = []
    two.on_change(told.append)
    await one.step()
    await two.step()
    assert one.leader and not two.leader
    await one.close()
    await two.step()
    assert two.leader and told == [True]
    assert await two.still_held()


class DownState(LocalState):
    async def take(self, key: str, per_second: float, capacity: float, n: int = 1) -> tuple[int, float]:
        raise StateUnavailable("down for the test")


async def test_concurrent_checks_of_a_key_share_calls_and_hold_its_burst(tmp_path: Path) -> None:
    """40 checks at once on a key with burst 10: 10 pass and the shared bucket is called far fewer than
    40 times (the requests that queue behind a call share the next one)."""
    calls: list[int] = []

    class Counting(LocalState):
        async def take(self, key: str, per_second: float, capacity: float, n: int = 1) -> tuple[int, float]:
            calls.append(n)
            await asyncio.sleep(0.001)  # a round trip
            return await super().take(key, per_second, capacity, n)

    limiter = RateLimiter(burst=10, shared=Counting(tmp_path))
    bob = Principal("bob", Role.CLIENT, requests_per_minute=60)

    async def one() -> int:
        try:
            await limiter.check(bob)
        except IrosError as exc:
            assert exc.status == 429 and exc.headers["retry-after"] == "1"
            return 0
        return 1

    assert sum(await asyncio.gather(*(one() for _ in range(40)))) == 10
    assert sum(calls) == 40 and len(calls) <= 3


async def test_with_the_state_down_each_worker_enforces_its_share(tmp_path: Path) -> None:
    """Shared buckets unreachable: a worker of four lets burst / 4 through, counts the fallback, and
    never fails a request for it."""
    fallbacks: list[int] = []
    limiter = RateLimiter(
        burst=8, shared=DownState(tmp_path), workers=lambda: 4, on_fallback=lambda: fallbacks.append(1)
    )
    alice = Principal("alice", Role.CLIENT, requests_per_minute=6)
    passed = 0
    for _ in range(6):
        try:
            await limiter.check(alice)
            passed += 1
        except IrosError as exc:
            assert exc.status == 429
    assert passed == 2
    assert len(fallbacks) == 6 and limiter.fallbacks == 6


class Flaky(LocalState):
    """A LocalState that can be switched off: every call raises StateUnavailable while `down`."""

    down = False

    def _check(self) -> None:
        if self.down:
            raise StateUnavailable("switched off for the test")

    async def put(self, name: str, body: dict[str, Any], *, only_if_absent: bool = False) -> int:
        self._check()
        return await super().put(name, body, only_if_absent=only_if_absent)

    async def changed(self, since: int) -> tuple[int, dict[str, dict[str, Any]]]:
        self._check()
        return await super().changed(since)

    async def append(self, channel: str, body: bytes, *, maxlen: int | None = None) -> str:
        self._check()
        return await super().append(channel, body, maxlen=maxlen)


async def test_changes_made_while_the_state_is_down_go_out_when_it_returns(tmp_path: Path) -> None:
    """A document published and a log entry appended while the backend is down reach the other worker
    once it answers again; the outage shows in describe()."""
    flaky = Flaky(tmp_path)
    here, there = SharedState(flaky, poll=0.05), SharedState(LocalState(tmp_path), poll=0.05)
    applied: list[Any] = []
    heard: list[Any] = []
    here.register("doc", lambda: {"v": 3}, lambda body: None)
    there.register("doc", lambda: {}, applied.append)
    there.follow("acks", lambda entries: heard.extend(e["id"] for e in entries), from_start=False)
    await here.start()
    await there.start()
    flaky.down = True
    assert not await here.publish("doc")
    assert not await here.append("acks", {"id": "a1"})
    assert here.describe()["connected"] is False and here.describe()["pending"] == ["doc"]
    flaky.down = False
    for _ in range(100):
        if applied and heard:
            break
        await asyncio.sleep(0.05)
    assert applied == [{"v": 3}] and heard == ["a1"]
    assert here.connected and here.outages == 1
    await here.close()
    await there.close()
