"""One Iros across replicas: two replicas of two workers each share one real redis-server as their state
backend. A tune on one worker is what all four serve; a key's burst holds for the whole cluster; the
live numbers are the cluster's; an alert notifies a real webhook receiver once; Redis restarted,
requests go on and state converges; the leader replica killed with SIGKILL, the other evaluates and
notifies."""

from __future__ import annotations

import os
import secrets
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from aiohttp import web

from iros.testing.iros import IrosProcess, free_port, wait_until
from iros.testing.redis import RedisServer
from tests.conftest import ADMIN_KEY, CLIENT_KEY, serve_in_thread

pytestmark = pytest.mark.e2e

LIMITED_KEY = "sk-cluster-limited"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
CLIENT = {"authorization": f"Bearer {CLIENT_KEY}"}
BURST = 10
PER_SECOND = 1.0


class Hook:
    """A real webhook receiver keeping every payload."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.payloads: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    async def _keep(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self.lock:
            self.payloads.append(body)
        return web.json_response({"ok": True})

    def start(self) -> Hook:
        serve_in_thread(self.port, [web.post("/hook", self._keep)])
        return self

    def alerts(self, rule: str, status: str) -> list[dict[str, Any]]:
        with self.lock:
            return [
                a
                for p in self.payloads
                for a in p["alerts"]
                if a["labels"]["alertname"] == rule and a["status"] == status
            ]


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def hook() -> Hook:
    return Hook().start()


@pytest.fixture(scope="module")
def cluster(redis: RedisServer, hook: Hook) -> Iterator[list[IrosProcess]]:
    prefix = f"iros:test:{secrets.token_hex(4)}"

    def replica() -> IrosProcess:
        config = {
            "server": {"data_dir": tempfile.mkdtemp(prefix="iros-cluster-")},
            "auth": {
                "api_keys": [CLIENT_KEY, {"key": LIMITED_KEY, "requests_per_minute": PER_SECOND * 60}],
                "admin_keys": [ADMIN_KEY],
                "burst": BURST,
            },
            "models": [{"name": "local", "backend": "simulated", "profile": "instant"}],
            "cache": {"enabled": True, "semantic": False},
            "state": {"backend": "redis", "url": redis.url, "prefix": prefix},
            "metrics_collection": {"live_interval_seconds": 0.2},
            "alerting": {
                "evaluation_interval_seconds": 2,
                "kpi_window_seconds": 30,
                "target_rules": False,
                "channels": [{"name": "hook", "type": "webhook", "config": {"url": hook.url}}],
            },
        }
        return IrosProcess.serve(config, extra=["--workers", "2"])

    replicas = [replica(), replica()]
    try:
        with ThreadPoolExecutor(2) as pool:  # started side by side: the slowest start is the wait
            list(pool.map(lambda r: r.start(60), replicas))
        yield replicas
    finally:
        for r in replicas:
            r.stop()


def _get(proc: IrosProcess, path: str) -> Any:
    # A new connection each time: the kernel hands it to either worker of the replica.
    response = httpx.get(f"{proc.url}{path}", headers=ADMIN, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def _states(
    cluster: list[IrosProcess], want: Callable[[dict[str, Any]], bool], timeout: float = 20
) -> dict[str, Any]:
    """/api/state from every worker of every replica, once each shows what `want` accepts."""
    seen: dict[str, dict[str, Any]] = {}

    def all_four() -> bool:
        for proc in cluster:
            state = _get(proc, "/api/state")
            if want(state):
                seen[state["worker"]] = {**state, "replica": cluster.index(proc)}
        return len(seen) == 2 * len(cluster)

    wait_until(all_four, "every worker to agree", timeout=timeout, interval=0.02)
    return seen


def _ask(proc: IrosProcess, key: str, text: str) -> int:
    body = {"model": "local", "messages": [{"role": "user", "content": text}]}
    headers = {"authorization": f"Bearer {key}"}
    return httpx.post(f"{proc.url}/v1/chat/completions", json=body, headers=headers, timeout=30).status_code


def test_a_rule_firing_under_load_notifies_once_and_every_replica_agrees(
    cluster: list[IrosProcess], hook: Hook
) -> None:
    """A rule set on one replica fires on the cluster's traffic; the webhook hears it once; history and
    an acknowledgement made on one replica are what the other shows."""
    one, two = cluster
    rule = {"name": "cluster_load", "condition": "count > 40", "channels": ["hook"]}
    got = _get(two, "/api/alerts/rules")
    rules = [r for r in got["alert_rules"] if r["name"] != "cluster_load"] + [rule]
    put = httpx.put(f"{two.url}/api/alerts/rules", json={**got, "alert_rules": rules}, headers=ADMIN)
    assert put.status_code == 200, put.text
    with ThreadPoolExecutor(8) as pool:  # 30 requests on each replica: only together past 40
        codes = list(pool.map(lambda i: _ask(cluster[i % 2], CLIENT_KEY, f"load {i}"), range(60)))
    assert codes.count(200) == 60

    # Whichever worker answers, the live numbers are the whole cluster's: all 60, not its own share.
    def counted(proc: IrosProcess) -> bool:
        return all(_get(proc, "/api/metrics/current")["response"]["count"] >= 60 for _ in range(4))

    for proc in cluster:
        wait_until(lambda p=proc: counted(p), "the cluster's count on every worker", timeout=10)
    wait_until(lambda: hook.alerts("cluster_load", "firing"), "the firing notification", timeout=20)
    time.sleep(4)  # two evaluations later: still one notification for the whole cluster
    assert len(hook.alerts("cluster_load", "firing")) == 1
    alert_id = wait_until(
        lambda: next((a["id"] for a in _get(two, "/api/alerts/active")["alerts"]), None), "the alert on two"
    )
    ack = httpx.post(f"{one.url}/api/alerts/{alert_id}/acknowledge", json={"who": "kim"}, headers=ADMIN)
    assert ack.status_code == 200, ack.text
    for proc in cluster:
        wait_until(lambda p=proc: all(_get(p, f"/api/alerts/{alert_id}")["acknowledged"] for _ in range(4)),
                   "the acknowledgement everywhere", timeout=10)  # fmt: skip
        history = _get(proc, "/api/alerts/history?rule=cluster_load")
        assert [a["id"] for a in history["alerts"]] == [alert_id]


def test_a_tune_on_one_worker_is_served_by_all_four(cluster: list[IrosProcess]) -> None:
    """PUT .../cache/tune on one replica: within about a second every worker of both serves the value."""
    one, _ = cluster
    put = httpx.put(
        f"{one.url}/api/optimization/cache/tune", json={"similarity_threshold": 0.93}, headers=ADMIN
    )
    assert put.status_code == 200
    done = time.monotonic()
    _states(cluster, lambda s: s["settings"]["cache.similarity_threshold"] == 0.93)
    assert time.monotonic() - done < 10
    time.sleep(1.0)
    for proc in cluster:  # a second later no worker answers with the old value
        for _ in range(8):
            assert _get(proc, "/api/optimization/settings")["cache.similarity_threshold"] == 0.93


def test_a_key_burst_holds_across_the_cluster(cluster: list[IrosProcess]) -> None:
    """40 concurrent requests on a key with burst 10, spread over both replicas: at most the burst plus
    what refills while they run get through."""
    began = time.monotonic()
    with ThreadPoolExecutor(40) as pool:
        codes = list(pool.map(lambda i: _ask(cluster[i % 2], LIMITED_KEY, f"burst {i}"), range(40)))
    elapsed = time.monotonic() - began
    passed = codes.count(200)
    assert set(codes) <= {200, 429}
    assert BURST - 1 <= passed <= BURST + PER_SECOND * elapsed + 1, (passed, elapsed)


def test_redis_restarted_requests_go_on_and_state_converges(
    cluster: list[IrosProcess], redis: RedisServer
) -> None:
    """While Redis is down every request is answered (limits per worker); once it is back, empty, the
    workers put their state back and a new tune reaches all four again."""
    one, two = cluster
    redis.stop()
    try:
        for i in range(6):
            assert _ask(cluster[i % 2], CLIENT_KEY, f"redis down {i}") == 200
            assert _ask(cluster[i % 2], LIMITED_KEY, f"redis down limited {i}") in (200, 429)
        wait_until(
            lambda: not _get(one, "/api/state")["state"]["connected"], "the outage to show", timeout=10
        )
    finally:
        redis.start()
    _states(
        cluster, lambda s: s["state"]["connected"] and s["settings"]["cache.similarity_threshold"] == 0.93
    )
    put = httpx.put(
        f"{two.url}/api/optimization/settings", json={"cache.max_temperature": 0.5}, headers=ADMIN
    )
    assert put.status_code == 200, put.text
    _states(cluster, lambda s: s["settings"]["cache.max_temperature"] == 0.5)


def test_killing_the_leader_replica_leaves_the_other_evaluating_and_notifying(
    cluster: list[IrosProcess], hook: Hook
) -> None:
    """SIGKILL to every process of the replica holding the lease: a worker of the other takes over within
    two evaluation intervals and a rule set afterwards notifies from there."""
    leaders = [s for s in _states(cluster, lambda s: True).values() if s["lease"]["leader"]]
    assert len(leaders) == 1
    victim = cluster[leaders[0]["replica"]]
    survivor = next(p for p in cluster if p is not victim)
    assert victim.proc is not None
    os.killpg(victim.proc.pid, signal.SIGKILL)
    killed = time.monotonic()

    def survivor_leads() -> bool:
        return any(s["lease"]["leader"] for s in _states([survivor], lambda s: True, timeout=10).values())

    wait_until(survivor_leads, "a survivor to lead", timeout=15, interval=0.05)
    took = time.monotonic() - killed
    assert took < 2 * 2.0 + 2.0, took  # two intervals, plus the test's own polling of both workers
    rule = {"name": "after_takeover", "condition": "count >= 0", "channels": ["hook"]}
    put = httpx.put(f"{survivor.url}/api/alerts/rules", json={"alert_rules": [rule]}, headers=ADMIN)
    assert put.status_code == 200, put.text
    wait_until(
        lambda: hook.alerts("after_takeover", "firing"), "the notification from the survivor", timeout=15
    )
    time.sleep(4)
    assert len(hook.alerts("after_takeover", "firing")) == 1
