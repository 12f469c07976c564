"""Scale-out: two Iros replicas share one Redis cache and are scraped by one Prometheus, which sees the
sum of both; an answer cached through one replica is served by the other."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator

import httpx
import pytest

from iros.testing.iros import IrosProcess
from iros.testing.prometheus import PrometheusServer
from iros.testing.redis import RedisServer
from tests.conftest import ADMIN_KEY, CLIENT_KEY

pytestmark = pytest.mark.e2e

CLIENT = {"authorization": f"Bearer {CLIENT_KEY}"}


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def replicas(redis: RedisServer) -> Iterator[list[IrosProcess]]:
    def config() -> dict[str, object]:
        return {
            "server": {"data_dir": tempfile.mkdtemp(prefix="iros-replica-")},
            "auth": {"api_keys": [CLIENT_KEY], "admin_keys": [ADMIN_KEY]},
            "models": [{"name": "local", "backend": "simulated", "profile": "instant"}],
            # Shared answers: one namespace for every key, so both replicas see the same entries.
            "cache": {
                "enabled": True,
                "semantic": False,
                "namespace": "global",
                "store": {"backend": "redis", "url": f"redis://127.0.0.1:{redis.port}/0"},
            },
            "metrics_collection": {"live_interval_seconds": 0.2, "collection_interval_seconds": 1},
        }

    with IrosProcess.serve(config()) as one, IrosProcess.serve(config()) as two:
        yield [one, two]


def _ask(replica: IrosProcess, text: str) -> httpx.Response:
    body = {"model": "local", "messages": [{"role": "user", "content": text}], "temperature": 0}
    return httpx.post(f"{replica.url}/v1/chat/completions", json=body, headers=CLIENT, timeout=30)


def test_an_answer_cached_by_one_replica_is_a_hit_on_the_other(replicas: list[IrosProcess]) -> None:
    """The shared Redis store carries an answer from the replica that asked upstream to the other one."""
    one, two = replicas
    first = _ask(one, "scale-out: what is shared?")
    assert first.status_code == 200
    deadline = time.monotonic() + 15
    while True:
        second = _ask(two, "scale-out: what is shared?")
        if second.headers.get("x-iros-cache") == "hit" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert second.headers.get("x-iros-cache") == "hit"
    assert second.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]


def test_one_prometheus_sees_the_sum_of_both_replicas(replicas: list[IrosProcess]) -> None:
    """Prometheus scraping both replicas counts every request each of them answered."""
    sent = {0: 7, 1: 5}
    with PrometheusServer([r.url for r in replicas], scrape_interval="1s", bearer_token=ADMIN_KEY) as prom:
        prom.wait_for_targets_up(timeout=30)
        before = _total(prom)
        for i, n in sent.items():
            for k in range(n):
                assert _ask(replicas[i], f"replica {i} question {k} {time.time()}").status_code == 200
        deadline = time.monotonic() + 30
        while _total(prom) < before + sum(sent.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _total(prom) == before + sum(sent.values())
        instances = prom.instant("sum by (instance) (iros_requests_total)")
        assert len(instances) == 2


def _total(prom: PrometheusServer) -> float:
    result = prom.instant("sum(iros_requests_total)")
    return float(result[0]["value"][1]) if result else 0.0
