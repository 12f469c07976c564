"""Fixtures and helpers every test package shares, and the e2e rule: a test that starts a process (Iros,
a model server, Redis, Prometheus, Chromium, wrk) is marked e2e, so `pytest -m "not e2e"` is the fast
loop. A test that starts one without the mark fails and says so."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from iros.cache.engine import ResponseCache
from iros.cache.plan import Plan
from iros.core.schema import parse_request
from iros.testing.iros import IrosProcess, free_port

CLIENT_KEY = "sk-client-test"
ADMIN_KEY = "sk-admin-test"
UPSTREAM_KEY = "sk-upstream-test"

# The seed's dashboard panels: the web dashboard and the Grafana export each show every one.
SEED_PANELS = (
    "Average Response Time",
    "CPU Usage",
    "Cache Hit Rate",
    "System Health",
    "Response Time Trend",
    "Response Time Distribution",
    "CPU and Memory Usage",
    "GPU Utilization",
    "Throughput",
    "Error rate",
    "Time to first token",
    "Active alerts",
    "Model comparison",
    "Cache efficiency",
)


E2E_HINT = "starts a process: mark it e2e (pytestmark = pytest.mark.e2e, or @pytest.mark.e2e)"
_UNMARKED: list[str] = []  # the unmarked test now running (set up, called), if any
_STARTS_A_PROCESS = frozenset({"subprocess.Popen", "os.posix_spawn", "os.spawn", "os.system", "os.exec"})


def _refuse_unmarked_processes(event: str, args: tuple[Any, ...]) -> None:
    # Every way Python starts a program raises one of these audit events first (asyncio's too).
    if _UNMARKED and event in _STARTS_A_PROCESS:
        raise AssertionError(f"{_UNMARKED[-1]} {E2E_HINT}")


sys.addaudithook(_refuse_unmarked_processes)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _unless_e2e(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _unless_e2e(item):
        return (yield)


@contextlib.contextmanager
def _unless_e2e(item: pytest.Item) -> Iterator[None]:
    if item.get_closest_marker("e2e") is not None:
        yield
        return
    _UNMARKED.append(item.nodeid)
    try:
        yield
    finally:
        _UNMARKED.pop()


def stale_database(path: Path, table: str) -> None:
    """A SQLite file that says schema version 1 but holds only `table` (a CREATE TABLE statement): the
    layout a pre-release build could leave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute(table)
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()


def serve_in_thread(port: int, routes: Sequence[web.AbstractRouteDef], timeout: float = 10.0) -> None:
    """Serve `routes` on 127.0.0.1:`port` from a daemon thread with its own event loop, for the rest of
    the test run; returns once it listens.

    serve_in_thread(port, [web.post("/v1/chat/completions", self._chat)])
    """
    ready = threading.Event()

    async def main() -> None:
        app = web.Application()
        app.add_routes(routes)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
    ready.wait(timeout)


def completion(content: str, model: str = "m") -> dict[str, Any]:
    """A whole OpenAI chat completion answering `content`, as a fake upstream sends it."""
    message = {"role": "assistant", "content": content}
    return {
        "id": "chatcmpl-up",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
    }


def cache_plan(cache: ResponseCache, text: str, principal: str = "tenant") -> Plan:
    """The cache's plan for one user question to model "m", as the gateway would make it."""
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "temperature": 0}
    made = cache.plan(parse_request(orjson.dumps(body)), principal, None)
    assert made is not None
    return made


class RecordingUpstream:
    """A real OpenAI-shaped server on a socket that keeps every request it receives."""

    def __init__(self, delay: float = 0.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.requests: list[dict[str, Any]] = []
        self.delay = delay  # seconds before each answer: a model's time to answer, not a loopback's

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append({"body": body, "headers": dict(request.headers)})
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(
            body=orjson.dumps(
                {
                    "id": "chatcmpl-rec",
                    "object": "chat.completion",
                    "created": 1,
                    "model": body.get("model"),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "recorded"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
                }
            ),
            content_type="application/json",
        )

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    def start(self) -> RecordingUpstream:
        routes = [web.post("/v1/chat/completions", self._chat), web.get("/v1/models", self._models)]
        serve_in_thread(self.port, routes)
        return self


@pytest.fixture(scope="module")
def speeds() -> Iterator[dict[str, IrosProcess]]:
    """Three model servers: instant, lightweight (about 60 ms to the first token) and large (350 ms)."""
    procs = {p: IrosProcess.mock_upstream(p) for p in ("instant", "lightweight", "large")}
    for proc in procs.values():
        proc.start()
    yield procs
    for proc in procs.values():
        proc.stop()


@pytest.fixture(scope="session")
def upstream() -> Iterator[IrosProcess]:
    with IrosProcess.mock_upstream("instant") as proc:
        yield proc


@pytest.fixture(scope="session")
def keyed_upstream() -> Iterator[IrosProcess]:
    proc = IrosProcess.mock_upstream(
        "instant", None, "--api-key-env", "MOCK_KEY", env={"MOCK_KEY": UPSTREAM_KEY}
    )
    with proc:
        yield proc


@pytest.fixture(scope="session")
def recorder() -> RecordingUpstream:
    return RecordingUpstream().start()


def gateway_config(upstream: IrosProcess, keyed: IrosProcess, recorder: RecordingUpstream) -> dict[str, Any]:
    up = f"{upstream.url}/v1"
    closed = f"http://127.0.0.1:{free_port()}/v1"
    return {
        "server": {"host": "127.0.0.1"},
        "auth": {"api_keys": [CLIENT_KEY], "admin_keys": [{"name": "ops", "key_env": "TEST_ADMIN_KEY"}]},
        "retry": {"attempts": 2, "backoff_ms": 5},
        "models": [
            {"name": "fast", "base_url": up, "upstream_model": "instant", "group": "chat"},
            {"name": "light", "base_url": up, "upstream_model": "lightweight"},
            {"name": "local", "backend": "simulated", "profile": "instant"},
            {"name": "broken", "base_url": up, "upstream_model": "error-500"},
            {"name": "hanging", "base_url": up, "upstream_model": "hang", "timeouts": {"read_seconds": 0.5}},
            {"name": "cutting", "base_url": up, "upstream_model": "cut-stream"},
            {"name": "refused", "base_url": closed},
            {"name": "failover", "base_url": closed},
            {"name": "failover", "base_url": up, "upstream_model": "instant"},
            {
                "name": "keyed",
                "base_url": f"{keyed.url}/v1",
                "upstream_model": "instant",
                "api_key_env": "UPSTREAM_KEY",
            },
            {"name": "keyless", "base_url": f"{keyed.url}/v1", "upstream_model": "instant"},
            {"name": "recorded", "base_url": recorder.url, "upstream_model": "rec-model"},
        ],
    }


@pytest.fixture(scope="session")
def iros(
    upstream: IrosProcess, keyed_upstream: IrosProcess, recorder: RecordingUpstream
) -> Iterator[IrosProcess]:
    config = gateway_config(upstream, keyed_upstream, recorder)
    env = {"UPSTREAM_KEY": UPSTREAM_KEY, "TEST_ADMIN_KEY": ADMIN_KEY}
    with IrosProcess.serve(config, env=env) as proc:
        yield proc


@pytest.fixture(scope="session")
def tight(upstream: IrosProcess) -> Iterator[IrosProcess]:
    """A gateway with one slot, a one-place queue and a small body limit."""
    config = {
        "auth": {"open": True},
        "server": {"max_concurrency": 1, "max_queue": 1, "max_body_bytes": 4096},
        "models": [{"name": "slow", "base_url": f"{upstream.url}/v1", "upstream_model": "large"}],
    }
    with IrosProcess.serve(config) as proc:
        yield proc
