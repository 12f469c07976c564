"""Issue 20's application-layer rows against a real `iros serve`: what a tenant with a valid key, a
guesser without one, and a logged-out browser can no longer do. Each test speaks from a loopback address
of its own (127.0.0.x), since wrong keys slow down the address that sends them."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from iros.config import MIN_KEY_CHARS
from iros.core.limits import MAX_NESTING
from iros.gateway.keyguard import MAX_FAILURES, MAX_PENALTY
from iros.gateway.warming import MAX_PROMPT_CHARS, MAX_PROMPTS, MAX_TOTAL_CHARS
from iros.testing.iros import IrosProcess, free_port, wait_until

pytestmark = pytest.mark.e2e

ALICE, BOB, ADMIN = "sk-alice-hardening-0001", "sk-bob-hardening-0002", "sk-admin-hardening-0003"
MODEL_PASSWORD, CHANNEL_PASSWORD = "model-s3cret-pw", "channel-s3cret-pw"
TTL = 1.0


def _config(upstream: IrosProcess) -> dict[str, Any]:
    closed = free_port()
    return {
        "server": {"host": "127.0.0.1", "access_log": True},
        "auth": {
            "api_keys": [{"name": "alice", "key": ALICE}, {"name": "bob", "key": BOB}],
            "admin_keys": [{"name": "ops", "key": ADMIN}],
        },
        "retry": {"attempts": 1},
        "cache": {"enabled": True, "semantic": False, "ttl_seconds": TTL},
        "models": [
            {"name": "fast", "base_url": f"{upstream.url}/v1", "upstream_model": "instant"},
            {"name": "light", "base_url": f"{upstream.url}/v1", "upstream_model": "lightweight"},
            {"name": "guarded", "base_url": f"http://operator:{MODEL_PASSWORD}@127.0.0.1:{closed}/v1"},
        ],
        "alerting": {
            "channels": [
                {
                    "name": "am",
                    "type": "alertmanager",
                    "config": {"url": f"http://am-user:{CHANNEL_PASSWORD}@127.0.0.1:{closed}"},
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def config(upstream: IrosProcess) -> dict[str, Any]:
    return _config(upstream)


@pytest.fixture(scope="module")
def server(config: dict[str, Any]) -> Iterator[IrosProcess]:
    with IrosProcess.serve(config) as proc:
        yield proc


def client(proc: IrosProcess, address: str, key: str | None = None) -> httpx.Client:
    """A client that connects from `address` (any 127.0.0.x is this machine)."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=proc.url, headers=headers, transport=transport, timeout=30)


def ask(model: str = "fast", content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def write_config(config: dict[str, Any]) -> Path:
    path = Path(tempfile.mkstemp(prefix="iros-hardening-", suffix=".yaml")[1])
    path.write_text(yaml.safe_dump(config))
    return path


def logged(proc: IrosProcess, text: str) -> str:
    """The server's output once it holds `text`."""

    def holds() -> str | None:
        out = proc.output()
        return out if text in out else None

    return wait_until(holds, f"{text!r} in the log")


def iros_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iros", *args], capture_output=True, text=True, timeout=60, check=False
    )


class TestSecrets:
    def test_a_failing_upstream_is_named_by_model_never_by_url(self, server: IrosProcess) -> None:
        """An unreachable model server whose URL holds a password: the client gets the model name and
        the kind of failure, and neither the answer nor the log holds the password."""
        with client(server, "127.0.0.11", ALICE) as c:
            r = c.post("/v1/chat/completions", json=ask("guarded"))
        assert r.status_code == 502
        error = r.json()["error"]
        assert error["code"] == "upstream_connect"
        assert error["message"] == "model 'guarded': could not connect to the model server"
        log = logged(server, "guarded")
        assert MODEL_PASSWORD not in log and "operator:" not in log
        assert "http://***@127.0.0.1" in log  # the operator still sees which server failed

    def test_config_and_channels_never_print_url_passwords(
        self, server: IrosProcess, config: dict[str, Any]
    ) -> None:
        """/api/config, /api/alerts/channels and `iros config show` redact every URL's userinfo."""
        with client(server, "127.0.0.12", ADMIN) as c:
            shown = c.get("/api/config")
            channels = c.get("/api/alerts/channels")
        assert shown.status_code == channels.status_code == 200
        cli = iros_cli("config", "show", "--config", str(write_config(config)))
        assert cli.returncode == 0, cli.stderr
        for text in (shown.text, channels.text, cli.stdout):
            assert MODEL_PASSWORD not in text and CHANNEL_PASSWORD not in text
            assert "***@127.0.0.1" in text

    def test_userinfo_and_an_api_key_env_together_are_refused_at_load(self, config: dict[str, Any]) -> None:
        """A base_url with user:pass@ and an api_key_env cannot both be sent: `config check` says so
        instead of every request (and /ready) failing later."""
        models = [{"name": "both", "base_url": "http://u:p@127.0.0.1:9/v1", "api_key_env": "UPSTREAM_KEY"}]
        result = iros_cli("config", "check", str(write_config({**config, "models": models})))
        assert result.returncode != 0
        assert "models[0]: base_url holds credentials" in " ".join(result.stderr.split())


class TestTenants:
    def test_request_ids_are_random(self, server: IrosProcess) -> None:
        """Ids share no prefix a counter would give: nothing to guess another key's from."""
        with client(server, "127.0.0.13", ALICE) as c:
            ids = [c.post("/v1/chat/completions", json=ask()).headers["x-iros-request-id"] for _ in range(8)]
        assert len(set(ids)) == 8 and all(len(i) == 20 for i in ids)
        assert len({i[:6] for i in ids}) == 8

    def test_feedback_is_accepted_only_from_the_key_that_asked(self, server: IrosProcess) -> None:
        """Bob cannot score Alice's answer (told it does not exist, so he learns nothing); Alice and
        an admin can."""
        with client(server, "127.0.0.14", ALICE) as alice, client(server, "127.0.0.14", BOB) as bob:
            first = alice.post("/v1/chat/completions", json=ask(content="one")).headers["x-iros-request-id"]
            second = alice.post("/v1/chat/completions", json=ask(content="two")).headers["x-iros-request-id"]

            def score(who: httpx.Client, request_id: str) -> httpx.Response:
                return who.post("/api/feedback", json={"request_id": request_id, "score": 0.0})

            wait_until(lambda: score(alice, first).status_code == 200, "the request to be recorded")
            time.sleep(0.5)  # the collector takes in what ended since (every 0.2 s)
            refused = score(bob, second)
            assert refused.status_code == 404 and refused.json()["error"]["code"] == "request_not_found"
            assert "model" not in refused.json()
        with client(server, "127.0.0.14", ADMIN) as admin:
            assert score(admin, second).json()["model"] == "fast"


class TestInputBounds:
    def test_deeply_nested_json_is_a_400_naming_the_limit(self, server: IrosProcess) -> None:
        """JSON nested 255 levels (past what the cache key's serializer writes) is refused as bad input."""
        deep = "[" * 255 + "]" * 255
        body = f'{{"model": "fast", "messages": [{{"role": "user", "content": "hi"}}], "x": {deep}}}'
        with client(server, "127.0.0.15", ALICE) as c:
            r = c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            ok = c.post("/v1/chat/completions", json=ask(x=[[[["fine"]]]]))
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "nesting_too_deep"
        assert f"{MAX_NESTING} levels" in r.json()["error"]["message"]
        assert ok.status_code == 200

    def test_deeply_nested_conditions_are_refused_by_the_api_and_config_check(
        self, server: IrosProcess, config: dict[str, Any]
    ) -> None:
        """A rule with 250 nested parentheses gets a 422 on PUT and a clear error from `config check`."""
        condition = "(" * 250 + "error_rate > 0.5" + ")" * 250
        rule = {"name": "deep", "condition": condition}
        with client(server, "127.0.0.16", ADMIN) as c:
            r = c.put("/api/alerts/rules", json={"alert_rules": [rule]})
        assert r.status_code == 422
        assert f"nests parentheses 250 deep; at most {MAX_NESTING}" in r.json()["error"]["message"]
        checked = iros_cli(
            "config", "check", str(write_config({**config, "alerting": {"alert_rules": [rule]}}))
        )
        assert checked.returncode != 0 and "Traceback" not in checked.stderr
        assert "nests parentheses 250 deep" in " ".join(checked.stderr.split())

    def test_a_clients_ttl_is_clamped_to_the_operators(self, server: IrosProcess) -> None:
        """An answer cached with iros.ttl of a year still expires after the configured ttl_seconds."""
        body = ask(content=f"clamp {time.time()}", iros={"ttl": 365 * 86400})
        with client(server, "127.0.0.17", ALICE) as c:
            assert c.post("/v1/chat/completions", json=body).headers["x-iros-cache"] == "miss"
            wait_until(
                lambda: c.post("/v1/chat/completions", json=body).headers["x-iros-cache"] == "hit",
                "the answer to be cached",
            )
            time.sleep(TTL + 0.5)
            assert c.post("/v1/chat/completions", json=body).headers["x-iros-cache"] == "miss"

    def test_model_names_cannot_forge_log_lines(self, server: IrosProcess) -> None:
        """A model name with a newline and a NUL is logged as one quoted value on its own line."""
        forged = "fast\nINFO iros.access forged status=200\x00"
        with client(server, "127.0.0.18", ALICE) as c:
            assert c.post("/v1/chat/completions", json=ask(forged)).status_code == 404
        log = logged(server, "forged")
        lines = [line for line in log.splitlines() if "forged" in line]
        assert len(lines) == 1 and "\x00" not in log
        assert 'model="fast\\nINFO iros.access forged status=200\\u0000"' in lines[0]


class TestCacheWarm:
    def test_a_warm_is_bounded_in_count_and_size(self, server: IrosProcess) -> None:
        """Too many prompts, one too long, too much text in all, or parameters nested too deep are
        refused before anything runs."""
        cases = [
            ["p"] * (MAX_PROMPTS + 1),
            ["x" * (MAX_PROMPT_CHARS + 1)],
            ["y" * MAX_PROMPT_CHARS] * (MAX_TOTAL_CHARS // MAX_PROMPT_CHARS + 1),
        ]
        deep = '{"model": "fast", "prompts": ["p"], "params": {"x": ' + "[" * 255 + "]" * 255 + "}}"
        with client(server, "127.0.0.23", ADMIN) as c:
            for prompts in cases:
                r = c.post("/api/optimization/cache/warm", json={"model": "fast", "prompts": prompts})
                assert r.status_code == 400 and r.json()["error"]["param"] == "prompts", r.text[:200]
            r = c.post(
                "/api/optimization/cache/warm", content=deep, headers={"content-type": "application/json"}
            )
            assert r.status_code == 400 and r.json()["error"]["code"] == "nesting_too_deep"
            assert c.get("/api/optimization/cache/warm").json()["jobs"] == []

    def test_a_warm_runs_in_the_background_with_progress(self, server: IrosProcess) -> None:
        """The POST answers 202 at once; progress is polled by id; a second warm waits its turn (409)."""
        prompts = [f"warm {i} {time.time()}" for i in range(8)]
        with client(server, "127.0.0.23", ADMIN) as c:
            # A model that takes a few hundred ms an answer: the job is still running when asked again.
            started = c.post("/api/optimization/cache/warm", json={"model": "light", "prompts": prompts})
            assert started.status_code == 202
            job = started.json()
            assert job["state"] == "running" and job["total"] == 8
            second = c.post("/api/optimization/cache/warm", json={"model": "fast", "prompts": ["more"]})
            assert second.status_code == 409 and job["id"] in second.json()["error"]["message"]
            done = wait_until(
                lambda: (view := c.get(job["progress"]).json())["state"] == "done" and view,
                "the warm to finish",
            )
        assert done["done"] == 8 and done["warmed"] == {"cached": 8} and len(done["results"]) == 8


class TestSessionsAndKeys:
    def test_logout_ends_the_session_on_the_server(self, server: IrosProcess) -> None:
        """The cookie kept from before a logout no longer opens anything."""
        with client(server, "127.0.0.19") as c:
            login = c.post("/dashboard/login", data={"key": ADMIN})
            assert login.status_code == 303
            cookie = c.cookies["iros_session"]
            assert c.get("/api/config").status_code == 200
            assert c.post("/dashboard/logout").status_code == 303
        with client(server, "127.0.0.19") as replay:
            r = replay.get("/api/config", headers={"cookie": f"iros_session={cookie}"})
        assert r.status_code == 401

    def test_logout_ends_the_session_in_every_worker(self, config: dict[str, Any]) -> None:
        """With two workers, the cookie kept from before a logout fails on every new connection,
        whichever worker takes it."""
        with IrosProcess.serve(config, extra=["--workers", "2"]) as proc:
            with client(proc, "127.0.0.24") as c:
                assert c.post("/dashboard/login", data={"key": ADMIN}).status_code == 303
                cookie = {"cookie": f"iros_session={c.cookies['iros_session']}"}
            # A new connection each time, so both workers check the cookie.
            config_url = f"{proc.url}/api/config"
            before = [httpx.get(config_url, headers=cookie, timeout=30).status_code for _ in range(10)]
            out = httpx.post(f"{proc.url}/dashboard/logout", headers=cookie, timeout=30)
            after = [httpx.get(config_url, headers=cookie, timeout=30).status_code for _ in range(10)]
        assert before == [200] * 10 and out.status_code == 303 and after == [401] * 10

    def test_wrong_keys_slow_their_address_down(self, server: IrosProcess) -> None:
        """After MAX_FAILURES wrong keys, each further guess from that address waits before it is
        checked, on the model API and /api/* alike; other addresses are untouched."""
        with client(server, "127.0.0.20") as c:
            for i in range(MAX_FAILURES + 3):
                guess = {"authorization": f"Bearer guess-{i}"}
                if i % 2:
                    r = c.post("/v1/chat/completions", json=ask(), headers=guess)
                else:
                    r = c.get("/api/config", headers=guess)
                assert r.status_code == 401
            began = time.monotonic()
            assert c.get("/api/config", headers={"authorization": "Bearer guess-last"}).status_code == 401
            slowed = time.monotonic() - began
        assert slowed >= 0.5, f"the guess took {slowed:.3f} s"
        with client(server, "127.0.0.21", ALICE) as other:
            began = time.monotonic()
            assert other.post("/v1/chat/completions", json=ask()).status_code == 200
            assert time.monotonic() - began < 0.5

    def test_an_attacker_cannot_lock_the_admin_out(self, server: IrosProcess) -> None:
        """Behind the attacker's address (one proxy), the real admin still signs in, after at most
        MAX_PENALTY seconds; a client key that worked there since the guessing began is not slowed."""
        with client(server, "127.0.0.22", ALICE) as known, client(server, "127.0.0.22") as attacker:
            assert attacker.post("/dashboard/login", data={"key": "guess"}).status_code == 401
            # A client at work while the guessing starts: its key is remembered as good here.
            assert known.post("/v1/chat/completions", json=ask()).status_code == 200
            for i in range(MAX_FAILURES + 10):
                assert attacker.post("/dashboard/login", data={"key": f"guess-{i}"}).status_code == 401
            began = time.monotonic()
            assert known.post("/v1/chat/completions", json=ask()).status_code == 200
            assert time.monotonic() - began < MAX_PENALTY / 2
        with client(server, "127.0.0.22") as admin:
            began = time.monotonic()
            assert admin.post("/dashboard/login", data={"key": ADMIN}).status_code == 303
            waited = time.monotonic() - began
        assert MAX_PENALTY / 2 <= waited < MAX_PENALTY + 2.0

    def test_config_check_refuses_short_keys_on_a_public_bind(self, config: dict[str, Any]) -> None:
        """On 0.0.0.0 a key shorter than MIN_KEY_CHARS is refused with the minimum named; loopback is
        left alone."""
        public = {**config, "server": {"host": "0.0.0.0"}, "auth": {"api_keys": ["short"]}}
        refused = iros_cli("config", "check", str(write_config(public)))
        assert refused.returncode != 0
        assert f"needs at least {MIN_KEY_CHARS} characters; this one has 5" in " ".join(
            refused.stderr.split()
        )
        local = {**public, "server": {"host": "127.0.0.1"}}
        assert iros_cli("config", "check", str(write_config(local))).returncode == 0
