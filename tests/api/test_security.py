"""Who may call what: every route with no key, a client key and an admin key; rate limits per key; no
secret in logs, metrics or API output; upstream targets only from the configuration."""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.routing import Route

from iros.api.openapi import role
from iros.app import create_app
from iros.config import Settings
from iros.testing.iros import IrosProcess
from tests.conftest import ADMIN_KEY, CLIENT_KEY, UPSTREAM_KEY, RecordingUpstream

pytestmark = pytest.mark.e2e

LIMITED_KEY = "sk-limited-test"
SECRETS = (ADMIN_KEY, CLIENT_KEY, UPSTREAM_KEY, LIMITED_KEY)

# Pages people open: without the admin key they are sent to the login form instead of a 401.
PAGES = re.compile(r"^/dashboard(/optimization)?$")


def _config(upstream: IrosProcess, recorder: RecordingUpstream) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "data_dir": tempfile.mkdtemp(prefix="iros-sec-")},
        "auth": {
            "api_keys": [CLIENT_KEY, {"name": "limited", "key": LIMITED_KEY, "requests_per_minute": 6}],
            "admin_keys": [{"name": "ops", "key_env": "TEST_ADMIN_KEY"}],
            "burst": 2,
        },
        "cache": {"enabled": True, "semantic": False},
        "models": [
            {"name": "fast", "base_url": f"{upstream.url}/v1", "upstream_model": "instant"},
            {
                "name": "keyed",
                "base_url": recorder.url,
                "upstream_model": "rec-model",
                "api_key_env": "UPSTREAM_KEY",
            },
        ],
    }


@pytest.fixture(scope="module")
def secured(upstream: IrosProcess, recorder: RecordingUpstream) -> Iterator[tuple[IrosProcess, list[Route]]]:
    config = _config(upstream, recorder)
    env = {"TEST_ADMIN_KEY": ADMIN_KEY, "UPSTREAM_KEY": UPSTREAM_KEY}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        # The same configuration in-process, only to list the routes the server has.
        routes = [r for r in create_app(Settings(**config)).routes.routes if isinstance(r, Route)]
    with IrosProcess.serve(config, env=env) as proc:
        yield proc, routes


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "unknown-id", path)


def _headers(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def _call(client: httpx.Client, method: str, path: str, key: str | None, body: Any) -> httpx.Response:
    """The response, with its body read unless it is a live stream (those never end)."""
    with client.stream(method, path, headers=_headers(key), json=body) as r:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            r._content = next(r.iter_bytes(), b"")
        else:
            r.read()
    return r


def _calls(routes: list[Route]) -> Iterator[tuple[str, str]]:
    for route in routes:
        for method in sorted((route.methods or set()) - {"HEAD"}):
            yield method, _concrete(route.path)


def test_the_documented_roles_are_the_intended_ones(secured: tuple[IrosProcess, list[Route]]) -> None:
    """Probes and the login form are public, the model API and feedback need a key, the rest an admin key."""
    _, routes = secured
    assert len(routes) > 20
    roles = {r.path: role(r.path) for r in routes}
    assert {p for p, r in roles.items() if r == "public"} >= {"/health", "/ready", "/openapi.json"}
    assert {p for p, r in roles.items() if r == "client"} == {
        "/v1/models",
        "/v1/models/{model:path}",
        "/api/feedback",
        "/api/system/status",
    }
    assert all(r == "admin" for p, r in roles.items() if p.startswith(("/api/metrics", "/api/optimization")))
    assert roles["/metrics"] == "admin"


def test_the_authorization_matrix(secured: tuple[IrosProcess, list[Route]]) -> None:
    """No key gets 401 except on public routes, a client key gets 403 on admin routes, the admin key
    passes everywhere, and no combination answers a 5xx."""
    proc, routes = secured
    wrong: list[str] = []
    with httpx.Client(base_url=proc.url, timeout=30) as client:
        for method, path in [*_calls(routes), ("POST", "/v1/chat/completions")]:
            public = role(path) == "public"
            admin_only = role(path) == "admin"
            for who, key in (("nobody", None), ("client", CLIENT_KEY), ("admin", ADMIN_KEY)):
                body = {} if method in ("POST", "PUT", "PATCH") else None
                r = _call(client, method, path, key, body)
                if r.status_code >= 500:
                    wrong.append(f"{who} {method} {path}: {r.status_code} {r.text[:120]}")
                elif public:
                    continue
                elif PAGES.search(path) and who != "admin":
                    if r.status_code != 303 or "/dashboard" not in r.headers["location"]:
                        wrong.append(f"{who} {method} {path}: {r.status_code}, expected the login form")
                    continue
                elif who == "nobody" and r.status_code != 401:
                    wrong.append(f"{who} {method} {path}: {r.status_code}, expected 401")
                elif who == "client" and admin_only and r.status_code != 403:
                    wrong.append(f"{who} {method} {path}: {r.status_code}, expected 403")
                elif who != "nobody" and (who == "admin" or not admin_only) and r.status_code in (401, 403):
                    wrong.append(f"{who} {method} {path}: {r.status_code}, expected access")
                if r.status_code in (401, 403):
                    assert r.json()["error"]["type"] in ("authentication_error", "permission_error")
    assert wrong == [], "\n".join(wrong)


def test_no_secret_in_logs_metrics_or_api_output(secured: tuple[IrosProcess, list[Route]]) -> None:
    """After traffic from every kind of caller, no key appears in any GET answer, /metrics or the log."""
    proc, routes = secured
    seen: list[str] = []
    with httpx.Client(base_url=proc.url, timeout=30) as client:
        for key in (CLIENT_KEY, ADMIN_KEY):
            chat = {"model": "keyed", "messages": [{"role": "user", "content": f"is {key} secret?"[:4]}]}
            client.post("/v1/chat/completions", json=chat, headers=_headers(key))
        for method, path in _calls(routes):
            if method == "GET":
                seen.append(_call(client, "GET", path, ADMIN_KEY, None).text)
    seen.append(proc.output())
    leaks = [s for s in SECRETS for text in seen if s in text]
    assert leaks == []


def test_a_key_over_its_rate_gets_429_with_retry_after(secured: tuple[IrosProcess, list[Route]]) -> None:
    """A key limited to 6 a minute with a burst of 2 gets its third quick request refused, and other
    keys are not affected."""
    proc, _ = secured
    chat = {"model": "fast", "messages": [{"role": "user", "content": "rate"}]}
    with httpx.Client(base_url=proc.url, timeout=30) as client:
        codes = [
            client.post("/v1/chat/completions", json=chat, headers=_headers(LIMITED_KEY)).status_code
            for _ in range(2)
        ]
        refused = client.post("/v1/chat/completions", json=chat, headers=_headers(LIMITED_KEY))
        other = client.post("/v1/chat/completions", json=chat, headers=_headers(CLIENT_KEY))
    assert codes == [200, 200]
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 10
    assert other.status_code == 200


def test_clients_cannot_choose_where_iros_connects(
    secured: tuple[IrosProcess, list[Route]], recorder: RecordingUpstream
) -> None:
    """A model name that is a URL, or a base_url in the body, reaches no upstream but the configured ones."""
    proc, _ = secured
    before = len(recorder.requests)
    with httpx.Client(base_url=proc.url, timeout=30) as client:
        as_model = client.post(
            "/v1/chat/completions",
            json={"model": f"{recorder.url}/chat", "messages": [{"role": "user", "content": "hi"}]},
            headers=_headers(CLIENT_KEY),
        )
        as_field = client.post(
            "/v1/chat/completions",
            json={"model": "fast", "base_url": recorder.url, "messages": [{"role": "user", "content": "hi"}]},
            headers=_headers(CLIENT_KEY),
        )
    time.sleep(0.2)
    assert as_model.status_code == 404
    assert as_field.status_code == 200
    assert len(recorder.requests) == before
