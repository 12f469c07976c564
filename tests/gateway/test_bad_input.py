"""Bad input gets a clear 4xx in the OpenAI error shape: never a 500, a hang or a crash."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest

from iros.testing.iros import IrosProcess
from tests.conftest import ADMIN_KEY, CLIENT_KEY

pytestmark = pytest.mark.e2e

OK = {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}


def _with(**changes: Any) -> bytes:
    return orjson.dumps({**OK, **changes})


def _without(key: str) -> bytes:
    return orjson.dumps({k: v for k, v in OK.items() if k != key})


# (name, body, headers, status, code, param)
BAD_REQUESTS: list[tuple[str, bytes, dict[str, str] | None, int, str | None, str | None]] = [
    ("malformed json", b'{"model": "fast", "messages": [', None, 400, "invalid_json", None),
    ("empty body", b"", None, 400, "invalid_json", None),
    ("not an object", b"[1, 2]", None, 400, "invalid_json", None),
    ("missing messages", _without("messages"), None, 400, "invalid_value", "messages"),
    ("missing model", _without("model"), None, 400, "invalid_value", "model"),
    ("empty messages", _with(messages=[]), None, 400, "invalid_value", "messages"),
    (
        "unknown role",
        _with(messages=[{"role": "robot", "content": "x"}]),
        None,
        400,
        "invalid_value",
        "messages[0]",
    ),
    (
        "message without content",
        _with(messages=[{"role": "user"}]),
        None,
        400,
        "invalid_value",
        "messages[0].content",
    ),
    (
        "tool message without id",
        _with(messages=[{"role": "tool", "content": "x"}]),
        None,
        400,
        "invalid_value",
        "messages[0].tool_call_id",
    ),
    ("temperature out of range", _with(temperature=3), None, 400, "invalid_value", "temperature"),
    ("top_p out of range", _with(top_p=1.5), None, 400, "invalid_value", "top_p"),
    ("max_tokens zero", _with(max_tokens=0), None, 400, "invalid_value", "max_tokens"),
    ("max_tokens not a number", _with(max_tokens="many"), None, 400, "invalid_value", "max_tokens"),
    ("n above one", _with(n=3), None, 400, "invalid_value", "n"),
    ("five stop sequences", _with(stop=["a", "b", "c", "d", "e"]), None, 400, "invalid_value", None),
    (
        "stream_options without stream",
        _with(stream_options={"include_usage": True}),
        None,
        400,
        "invalid_value",
        None,
    ),
    (
        "bad response_format",
        _with(response_format={"type": "yaml"}),
        None,
        400,
        "invalid_value",
        "response_format.type",
    ),
    ("tool of unknown type", _with(tools=[{"type": "magic"}]), None, 400, "invalid_value", "tools[0].type"),
    (
        "tool without a name",
        _with(tools=[{"type": "function", "function": {}}]),
        None,
        400,
        "invalid_value",
        "tools[0].function.name",
    ),
    ("unknown model", _with(model="nope"), None, 404, "model_not_found", "model"),
    ("no api key", orjson.dumps(OK), {"authorization": ""}, 401, "missing_api_key", None),
    ("wrong api key", orjson.dumps(OK), {"authorization": "Bearer sk-wrong"}, 401, "invalid_api_key", None),
    (
        "not a bearer key",
        orjson.dumps(OK),
        {"authorization": f"Basic {CLIENT_KEY}"},
        401,
        "invalid_api_key",
        None,
    ),
]


@pytest.mark.parametrize(
    ("name", "body", "headers", "status", "code", "param"), BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS]
)
def test_bad_request_gets_a_clear_openai_error(
    iros: IrosProcess,
    name: str,
    body: bytes,
    headers: dict[str, str] | None,
    status: int,
    code: str | None,
    param: str | None,
) -> None:
    """Each bad request gets its status and an OpenAI-shaped error naming what is wrong."""
    sent = {"authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json", **(headers or {})}
    resp = httpx.post(f"{iros.url}/v1/chat/completions", content=body, headers=sent, timeout=10)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["code"] == code
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error
    assert resp.headers["x-iros-request-id"]


def test_gateway_still_serves_after_bad_input(iros: IrosProcess) -> None:
    """A burst of bad requests leaves the server answering good ones."""
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    for _name, body, *_ in BAD_REQUESTS:
        httpx.post(f"{iros.url}/v1/chat/completions", content=body, headers=auth, timeout=10)
    assert httpx.post(f"{iros.url}/v1/chat/completions", json=OK, headers=auth, timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
        ("GET", "/v1/nothing-here", 404, "not_found"),
        ("DELETE", "/v1/models", 405, "method_not_allowed"),
        ("GET", "/v1/models/nope", 404, "model_not_found"),
    ],
)
def test_wrong_routes_get_openai_errors(
    iros: IrosProcess, method: str, path: str, status: int, code: str
) -> None:
    """Wrong paths and methods answer in the same error shape."""
    resp = httpx.request(method, iros.url + path, headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert resp.status_code == status
    assert resp.json()["error"]["code"] == code


class TestAuthorization:
    @pytest.mark.parametrize(
        ("path", "key", "status"),
        [
            ("/v1/models", None, 401),
            ("/v1/models", CLIENT_KEY, 200),
            ("/v1/models", ADMIN_KEY, 200),
            ("/api/system/status", None, 401),
            ("/api/system/status", CLIENT_KEY, 200),
            ("/api/config", None, 401),
            ("/api/config", CLIENT_KEY, 403),
            ("/api/config", ADMIN_KEY, 200),
            ("/health", None, 200),
        ],
    )
    def test_each_endpoint_needs_its_key(
        self, iros: IrosProcess, path: str, key: str | None, status: int
    ) -> None:
        """Clients read the model API; only admin keys read settings; health needs none."""
        headers = {"authorization": f"Bearer {key}"} if key else {}
        assert httpx.get(iros.url + path, headers=headers).status_code == status

    def test_admin_key_also_serves_completions(self, iros: IrosProcess) -> None:
        """An admin key is a client key too."""
        resp = httpx.post(
            f"{iros.url}/v1/chat/completions", json=OK, headers={"authorization": f"Bearer {ADMIN_KEY}"}
        )
        assert resp.status_code == 200

    def test_config_api_never_shows_a_key(self, iros: IrosProcess) -> None:
        """The effective config names keys but never shows them."""
        text = httpx.get(f"{iros.url}/api/config", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text
        assert CLIENT_KEY not in text and ADMIN_KEY not in text
        assert "TEST_ADMIN_KEY" in text


class TestLimits:
    def test_body_over_the_limit_is_refused_with_413(self, tight: IrosProcess) -> None:
        """A body over max_body_bytes is refused before it is parsed."""
        big = _with(messages=[{"role": "user", "content": "x" * 10_000}], model="slow")
        resp = httpx.post(f"{tight.url}/v1/chat/completions", content=big)
        assert resp.status_code == 413
        assert resp.json()["error"]["code"] == "body_too_large"

    def test_chunked_body_over_the_limit_is_refused_with_413(self, tight: IrosProcess) -> None:
        """A body without a length is counted as it arrives."""

        def parts() -> Any:
            yield b'{"model": "slow", "messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}]}'

        resp = httpx.post(f"{tight.url}/v1/chat/completions", content=parts())
        assert resp.status_code == 413

    async def test_full_queue_answers_429_and_keeps_the_accepted(self, tight: IrosProcess) -> None:
        """With one slot and one queue place, extra concurrent requests get a 429; the accepted finish."""
        body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        async with httpx.AsyncClient(base_url=tight.url, timeout=30) as http:
            replies = await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(4)))
        statuses = sorted(r.status_code for r in replies)
        assert statuses.count(200) >= 2
        rejected = [r for r in replies if r.status_code == 429]
        assert rejected, statuses
        assert rejected[0].json()["error"]["code"] == "queue_full"
        assert rejected[0].headers["retry-after"] == "1"


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ({"x-big": "a" * 40_000}, "request headers too large"),
        ({f"x-h{i}": "v" for i in range(150)}, "too many request headers"),
    ],
    ids=["one huge header", "too many headers"],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/metrics/current"])
def test_oversized_headers_are_refused_with_431(
    iros: IrosProcess, headers: dict[str, str], says: str, path: str
) -> None:
    """Headers beyond the configured bounds get a 431 in the OpenAI shape, on the model API and elsewhere."""
    r = httpx.post(f"{iros.url}{path}", headers={"authorization": f"Bearer {CLIENT_KEY}", **headers}, json={})
    assert r.status_code == 431
    assert r.json()["error"]["code"] == "headers_too_large"
    assert says in r.json()["error"]["message"]


def test_a_body_that_trickles_in_is_cut_off_with_408(upstream: IrosProcess) -> None:
    """A client that sends part of its body and stalls gets a 408 after body_timeout_seconds, and the
    server keeps answering others meanwhile."""
    import socket

    config = {
        "auth": {"open": True},
        "server": {"body_timeout_seconds": 1},
        "models": [{"name": "fast", "base_url": f"{upstream.url}/v1", "upstream_model": "instant"}],
    }
    with IrosProcess.serve(config) as proc, socket.create_connection(("127.0.0.1", proc.port), 10) as s:
        s.settimeout(10)
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 500\r\n\r\n"
        )
        s.sendall(b'{"model": "fast",')
        other = httpx.post(f"{proc.url}/v1/chat/completions", json=OK, timeout=10)
        reply = s.recv(4096)
        assert other.status_code == 200
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408")
        assert orjson.loads(body)["error"]["code"] == "body_timeout"
