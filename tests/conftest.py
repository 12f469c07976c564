from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from iros.testing import IrosProcess, free_port

CLIENT_KEY = "sk-client-test"
ADMIN_KEY = "sk-admin-test"
UPSTREAM_KEY = "sk-upstream-test"


class RecordingUpstream:
    """A real OpenAI-shaped server on a socket that keeps every request it receives."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.requests: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append({"body": body, "headers": dict(request.headers)})
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

    def _run(self) -> None:
        import asyncio

        async def main() -> None:
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._chat)
            app.router.add_get("/v1/models", self._models)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._ready.set()
            await asyncio.Event().wait()

        asyncio.run(main())

    def start(self) -> RecordingUpstream:
        self._thread.start()
        self._ready.wait(10)
        return self


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
