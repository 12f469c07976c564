"""Routing end to end: real `iros serve` in front of real `iros mock-upstream` processes of different
speeds and a gated upstream that counts its calls."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from iros.testing.iros import IrosProcess, free_port, wait_until
from tests.conftest import ADMIN_KEY, CLIENT_KEY, serve_in_thread

pytestmark = pytest.mark.e2e

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
CLIENT = {"authorization": f"Bearer {CLIENT_KEY}"}


class GatedUpstream:
    """A real OpenAI-shaped server that holds every request until the test opens the gate, and counts
    the requests it received."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.calls = 0
        self.gate = threading.Event()
        serve_in_thread(self.port, [web.post("/v1/chat/completions", self._chat)])

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls += 1
        n = self.calls
        # A threading.Event, set from the test's thread: polled, so the server's loop is never blocked.
        while not self.gate.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        text = body["messages"][-1]["content"]
        completion = {
            "id": f"chatcmpl-gated-{n}",
            "object": "chat.completion",
            "created": 1,
            "model": body.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"answer to {text}"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
        }
        return web.Response(body=orjson.dumps(completion), content_type="application/json")


wait_for = partial(wait_until, timeout=30.0, interval=0.05)


@pytest.fixture(scope="module")
def gated() -> GatedUpstream:
    return GatedUpstream()


def chat_models(speeds: dict[str, IrosProcess]) -> list[dict[str, Any]]:
    return [
        {
            "name": "quick",
            "base_url": f"{speeds['instant'].url}/v1",
            "upstream_model": "instant",
            "group": "chat",
            "accuracy": 0.8,
        },
        {
            "name": "mid",
            "base_url": f"{speeds['lightweight'].url}/v1",
            "upstream_model": "lightweight",
            "group": "chat",
            "accuracy": 0.8,
            "tags": ["lightweight"],
        },
        {
            "name": "slow",
            "base_url": f"{speeds['large'].url}/v1",
            "upstream_model": "large",
            "group": "chat",
            "accuracy": 0.8,
        },
    ]


@pytest.fixture(scope="module")
def iros(speeds: dict[str, IrosProcess], gated: GatedUpstream) -> Iterator[IrosProcess]:
    up = f"{speeds['instant'].url}/v1"
    closed = f"http://127.0.0.1:{free_port()}/v1"
    faults = []
    for group, bad in (
        ("g500", {"base_url": up, "upstream_model": "error-500"}),
        ("grefused", {"base_url": closed}),
        ("ghang", {"base_url": up, "upstream_model": "hang", "timeouts": {"read_seconds": 0.5}}),
    ):
        faults.append({"name": f"{group}-bad", "group": group, "accuracy": 0.99, **bad})
        faults.append(
            {
                "name": f"{group}-good",
                "group": group,
                "accuracy": 0.5,
                "base_url": up,
                "upstream_model": "instant",
            }
        )
    config = {
        "auth": {"api_keys": [CLIENT_KEY], "admin_keys": [ADMIN_KEY]},
        "retry": {"attempts": 3, "backoff_ms": 5},
        "models": [
            *chat_models(speeds),
            *faults,
            {"name": "twin", "base_url": closed},
            {"name": "twin", "base_url": up, "upstream_model": "instant"},
            {"name": "gated", "base_url": gated.url},
            {"name": "narrow", "base_url": gated.url, "max_connections": 1, "max_queue": 4},
        ],
        "optimization": {
            "model_optimization": {"exploration_rate": 0.2},
            "circuit_breaker": {"failure_threshold": 2, "window_seconds": 60, "open_seconds": 1},
        },
    }
    with IrosProcess.serve(config) as proc:
        yield proc


def ask(url: str, model: str, content: str = "hello", **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 3, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=CLIENT, timeout=60)


def deployment(url: str, label: str) -> dict[str, Any]:
    status = httpx.get(f"{url}/api/optimization/models", headers=ADMIN, timeout=10).json()
    return status["deployments"][label]  # type: ignore[no-any-return]


class TestSelection:
    def test_group_and_auto_are_answered_by_a_member_named_in_the_header(self, iros: IrosProcess) -> None:
        """`chat` is served by one of its models, `auto` by any, and x-iros-model names which."""
        for target, allowed in (("chat", {"quick", "mid", "slow"}), ("auto", None)):
            response = ask(iros.url, target)
            assert response.status_code == 200, response.text
            assert allowed is None or response.headers["x-iros-model"] in allowed
            assert response.json()["choices"][0]["message"]["content"]
        missing = ask(iros.url, "nope")
        assert missing.status_code == 404 and "chat (group)" in missing.json()["error"]["message"]

    def test_traffic_shifts_to_the_fast_model(self, iros: IrosProcess) -> None:
        """Of three equally accurate models the fastest answers most, and the slowest was still tried."""
        served = Counter(ask(iros.url, "chat", f"question {i}").headers["x-iros-model"] for i in range(40))
        assert served["quick"] > served["slow"] and served["quick"] > served["mid"]
        assert served["slow"] >= 1
        models = httpx.get(f"{iros.url}/api/optimization/models", headers=ADMIN).json()["models"]
        assert models["quick"]["latency_ms_avg"] < models["slow"]["latency_ms_avg"]
        assert models["quick"]["selection_share"] > models["slow"]["selection_share"]

    def test_user_feedback_moves_the_accuracy_estimate(self, iros: IrosProcess) -> None:
        """Scores sent to POST /api/feedback reach the selector and lower the model's accuracy estimate."""
        ids = [ask(iros.url, "mid", f"rate me {i}").headers["x-iros-request-id"] for i in range(3)]
        for request_id in ids:
            wait_for(
                lambda rid=request_id: (
                    httpx.post(
                        f"{iros.url}/api/feedback", json={"request_id": rid, "score": 0.0}, headers=CLIENT
                    ).status_code
                    in (200, 409)
                ),
                "the response to be known to the feedback API",
            )

        def estimate() -> dict[str, Any] | None:
            models = httpx.get(f"{iros.url}/api/optimization/models", headers=ADMIN).json()["models"]
            mid: dict[str, Any] = models["mid"]
            return mid if mid["feedback_count"] >= 3 else None

        mid = wait_for(estimate, "the feedback to reach the selector")
        assert mid["accuracy_estimate"] < mid["accuracy_configured"] == 0.8


class TestFailover:
    @pytest.mark.parametrize("group", ["g500", "grefused", "ghang"])
    def test_failure_falls_over_to_the_next_candidate(self, iros: IrosProcess, group: str) -> None:
        """A model answering 500, refusing connections or timing out costs the client nothing."""
        for i in range(3):
            response = ask(iros.url, group, f"fail over {i}")
            assert response.status_code == 200, response.text
            assert response.headers["x-iros-model"] == f"{group}-good"

    def test_breaker_opens_and_half_opens(self, iros: IrosProcess) -> None:
        """A deployment that keeps failing is cut off, probed again after open_seconds, and cut off
        again when the probe fails; every client request is answered by the other deployment."""
        seen: list[str] = []

        def state() -> str:
            s: str = deployment(iros.url, "twin#0")["breaker"]["state"]
            if not seen or seen[-1] != s:
                seen.append(s)
            return s

        def answered() -> bool:
            response = ask(iros.url, "twin")
            assert response.status_code == 200, response.text
            return True

        wait_for(lambda: answered() and state() == "open", "the breaker to open")
        wait_for(lambda: state() == "half_open", "the breaker to half-open")
        wait_for(lambda: answered() and state() == "open", "the failed probe to reopen it")
        assert seen[-3:] == ["open", "half_open", "open"]
        assert deployment(iros.url, "twin#0")["breaker"]["times_opened"] >= 1


class TestSingleFlight:
    async def test_identical_concurrent_requests_make_one_upstream_call(
        self, iros: IrosProcess, gated: GatedUpstream
    ) -> None:
        """Eight identical requests in flight together reach the model once and all get its answer."""
        gated.gate.clear()
        before = gated.calls
        body = {"model": "gated", "messages": [{"role": "user", "content": "same question"}]}
        async with httpx.AsyncClient(base_url=iros.url, headers=CLIENT, timeout=60) as http:
            tasks = [asyncio.create_task(http.post("/v1/chat/completions", json=body)) for _ in range(8)]

            async def all_inside() -> bool:
                status = (await http.get("/api/system/status")).json()
                return bool(status["active_requests"] >= 8)

            deadline = time.monotonic() + 30
            while not await all_inside():
                assert time.monotonic() < deadline, "the requests never all reached Iros"
                await asyncio.sleep(0.05)
            gated.gate.set()
            responses = await asyncio.gather(*tasks)
        assert [r.status_code for r in responses] == [200] * 8
        assert {r.json()["id"] for r in responses} == {f"chatcmpl-gated-{before + 1}"}
        assert gated.calls == before + 1

    async def test_backend_queue_length_is_a_metric(self, iros: IrosProcess, gated: GatedUpstream) -> None:
        """Requests waiting for a deployment's only connection show in iros_backend_queue_length."""
        gated.gate.clear()
        async with httpx.AsyncClient(base_url=iros.url, headers=CLIENT, timeout=60) as http:
            tasks = [
                asyncio.create_task(
                    http.post(
                        "/v1/chat/completions",
                        json={"model": "narrow", "messages": [{"role": "user", "content": f"q{i}"}]},
                    )
                )
                for i in range(3)
            ]

            async def queue_metric() -> float | None:
                text = (await http.get("/metrics", headers=ADMIN)).text
                for line in text.splitlines():
                    if line.startswith('iros_backend_queue_length{deployment="narrow#0"}'):
                        return float(line.split()[-1])
                return None

            deadline = time.monotonic() + 30
            while await queue_metric() != 2.0:
                assert time.monotonic() < deadline, "the queue of narrow#0 never showed 2 waiting"
                await asyncio.sleep(0.1)
            gated.gate.set()
            responses = await asyncio.gather(*tasks)
            assert [r.status_code for r in responses] == [200] * 3
            while await queue_metric() != 0.0:
                assert time.monotonic() < deadline + 30, "the queue metric never went back to 0"
                await asyncio.sleep(0.1)


class TestResources:
    def test_resource_limits_are_enforced_and_reported(self, iros: IrosProcess) -> None:
        """A CPU limit pins the process to that many cores and scales concurrency; lifting it restores
        both; the answer reports what is enforced."""
        import os

        assert iros.proc is not None
        cores = sorted(os.sched_getaffinity(iros.proc.pid))
        put = httpx.put(
            f"{iros.url}/api/optimization/resources/tune",
            json={"cpu_limit": 1, "memory_limit_mb": 512},
            headers=ADMIN,
        )
        assert put.status_code == 200, put.text
        enforced = put.json()["enforced"]
        assert enforced["cpu_cores"] == cores[:1]
        assert os.sched_getaffinity(iros.proc.pid) == set(cores[:1])
        status = httpx.get(f"{iros.url}/api/system/status", headers=CLIENT).json()
        assert status["max_concurrency"] == enforced["max_concurrency"] == max(1, 512 // len(cores))
        lifted = httpx.put(
            f"{iros.url}/api/optimization/resources/tune",
            json={"cpu_limit": None, "memory_limit_mb": None},
            headers=ADMIN,
        )
        assert lifted.json()["enforced"]["max_concurrency"] == 512
        assert os.sched_getaffinity(iros.proc.pid) == set(cores)
        bad = httpx.put(f"{iros.url}/api/optimization/resources/tune", json={"cpu_limit": -1}, headers=ADMIN)
        assert bad.status_code == 400 and "cpu_limit" in bad.json()["error"]["message"]
