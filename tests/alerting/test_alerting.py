"""Alerting end to end: a real `iros serve` whose upstream is made slow on purpose, a real SMTP server
(aiosmtpd) and a real HTTP receiver for the Slack, webhook and Alertmanager payloads; the alert goes
pending, fires after its duration, is acknowledged, resolves after recovery, is silenced, and keeps
its state across a kill -9."""

from __future__ import annotations

import asyncio
import email
import email.message
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from websockets.sync.client import connect

from iros.testing.alertmanager import AlertmanagerServer
from iros.testing.iros import IrosProcess, free_port, wait_until
from tests.conftest import serve_in_thread

pytestmark = pytest.mark.e2e

CLIENT_KEY = "sk-alerts-client"
ADMIN_KEY = "sk-alerts-admin"
CLIENT = {"authorization": f"Bearer {CLIENT_KEY}"}
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
SECRET_PATH = "hooks/T000/B000/secret-token-4711"
DEAD_SECRET = "dead-secret-0815"


class Receiver:
    """One real HTTP server: an OpenAI-shaped upstream whose latency the test sets, and endpoints that
    keep every Slack, webhook and Alertmanager payload they are sent."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.delay = 0.0
        self.received: dict[str, list[Any]] = {"hook": [], "slack": [], "am": []}

    async def _chat(self, request: web.Request) -> web.Response:
        await request.read()
        if self.delay:
            await asyncio.sleep(self.delay)
        body = {
            "id": "chatcmpl-x",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
        }
        return web.json_response(body)

    def _keeper(self, kind: str) -> Callable[[web.Request], Any]:
        async def keep(request: web.Request) -> web.Response:
            self.received[kind].append(await request.json())
            return web.json_response({"status": "success"})

        return keep

    def start(self) -> Receiver:
        routes = [
            web.post("/v1/chat/completions", self._chat),
            web.post("/hook", self._keeper("hook")),
            web.post(f"/{SECRET_PATH}", self._keeper("slack")),
            web.post("/am/api/v2/alerts", self._keeper("am")),
        ]
        serve_in_thread(self.port, routes)
        return self

    def webhook_alerts(self, rule: str, status: str) -> list[dict[str, Any]]:
        """Alerts of `rule` with `status` in every webhook payload received."""
        return [
            a
            for p in self.received["hook"]
            for a in p["alerts"]
            if a["labels"]["alertname"] == rule and a["status"] == status
        ]


class Inbox:
    """aiosmtpd handler: keeps every message."""

    def __init__(self) -> None:
        self.messages: list[email.message.Message] = []
        self.port = free_port()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 Message accepted for delivery"


@pytest.fixture(scope="module")
def receiver() -> Receiver:
    return Receiver().start()


@pytest.fixture(scope="module")
def inbox() -> Iterator[Inbox]:
    handler = Inbox()
    controller = Controller(handler, hostname="127.0.0.1", port=handler.port)
    controller.start()
    try:
        yield handler
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def alertmanager() -> Iterator[AlertmanagerServer]:
    with AlertmanagerServer() as am:
        yield am


def config(
    data_dir: Path, receiver: Receiver, smtp_port: int, am_url: str | None = None, **alerting: Any
) -> dict[str, Any]:
    real_am = [{"name": "alertmanager", "type": "alertmanager", "config": {"url": am_url}}] if am_url else []
    return {
        "server": {"data_dir": str(data_dir)},
        "auth": {"api_keys": [CLIENT_KEY], "admin_keys": [ADMIN_KEY]},
        "retry": {"attempts": 1},
        "models": [{"name": "m", "base_url": f"{receiver.url}/v1", "timeouts": {"read_seconds": 10}}],
        "metrics_collection": {
            "live_interval_seconds": 0.2,
            "collection_interval_seconds": 0.5,
            "storage": {"flush_interval_seconds": 0.5},
        },
        "alerting": {
            "evaluation_interval_seconds": 0.2,
            "kpi_window_seconds": 2,
            "target_rules": False,
            "channels": [
                {"name": "ops-hook", "type": "webhook", "config": {"url": f"{receiver.url}/hook"}},
                {
                    "name": "slack",
                    "type": "slack",
                    "config": {"webhook_url_env": "SLACK_WEBHOOK_URL", "channel": "#ops-alerts"},
                },
                {
                    "name": "email",
                    "type": "email",
                    "config": {"smtp_server": f"127.0.0.1:{smtp_port}", "recipients": ["ops@example.com"]},
                },
                {"name": "am", "type": "alertmanager", "config": {"url": f"{receiver.url}/am"}},
                {"name": "dead", "type": "webhook", "config": {"url_env": "DEAD_HOOK_URL"}},
                *real_am,
            ],
            "retry": {"backoff_seconds": 0.2, "max_backoff_seconds": 1},
            **alerting,
        },
    }


def serve(
    data_dir: Path,
    receiver: Receiver,
    smtp_port: int,
    port: int | None = None,
    am_url: str | None = None,
    **alerting: Any,
) -> IrosProcess:
    env = {
        "SLACK_WEBHOOK_URL": f"{receiver.url}/{SECRET_PATH}",
        "DEAD_HOOK_URL": f"http://127.0.0.1:{free_port()}/{DEAD_SECRET}",
    }
    return IrosProcess.serve(config(data_dir, receiver, smtp_port, am_url, **alerting), port=port, env=env)


def api(
    proc: IrosProcess, method: str, path: str, headers: dict[str, str] = ADMIN, **kw: Any
) -> httpx.Response:
    return httpx.request(method, f"{proc.url}{path}", headers=headers, timeout=30, **kw)


# Alerts take an evaluation interval or two to move: a longer default wait.
eventually = partial(wait_until, timeout=20.0, interval=0.05)


class Traffic:
    """Requests in a background thread until stopped (the load whose latency the alert watches)."""

    def __init__(self, proc: IrosProcess) -> None:
        self.proc = proc
        self.stop = threading.Event()
        self.statuses: list[int] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                r = client.post(f"{self.proc.url}/v1/chat/completions", json=body, headers=CLIENT)
                self.statuses.append(r.status_code)
                time.sleep(0.02)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def outbox(proc: IrosProcess, channel: str) -> dict[str, int]:
    channels = api(proc, "GET", "/api/alerts/channels").json()["channels"]
    return next(c["outbox"] for c in channels if c["name"] == channel)


def active(proc: IrosProcess, rule: str) -> dict[str, Any] | None:
    alerts = api(proc, "GET", "/api/alerts/active").json()["alerts"]
    return next((a for a in alerts if a["rule"] == rule), None)


HIGH = {
    "name": "high_response_time",
    "condition": "response_time_avg > 150",
    "duration": "2s",
    "severity": "warning",
    "channels": ["ops-hook", "slack", "email", "am"],
}


@pytest.fixture(scope="module")
def iros(
    tmp_path_factory: pytest.TempPathFactory,
    receiver: Receiver,
    inbox: Inbox,
    alertmanager: AlertmanagerServer,
) -> Iterator[IrosProcess]:
    rules = [{**HIGH, "channels": [*HIGH["channels"], "alertmanager"]}]
    data_dir = tmp_path_factory.mktemp("alerts")
    with serve(data_dir, receiver, inbox.port, am_url=alertmanager.url, alert_rules=rules) as proc:
        yield proc


def test_injected_latency_takes_the_alert_through_its_states(
    iros: IrosProcess, receiver: Receiver, inbox: Inbox, alertmanager: AlertmanagerServer
) -> None:
    """Slow upstream answers: pending, firing once held for its duration, notified on every channel;
    acknowledged; resolved after recovery, with the resolution sent; the episode in the history."""
    receiver.delay = 0.3
    with Traffic(iros) as load:
        first = eventually(lambda: active(iros, "high_response_time"), what="the alert to appear")
        # Seen pending while the 2 s duration runs (the transitions below show it in any case).
        assert first["state"] == "pending" and first["fired_at"] is None
        firing = eventually(
            lambda: (a := active(iros, "high_response_time")) and a["state"] == "firing" and a, what="firing"
        )
        assert firing["id"] == first["id"]
        held = datetime.fromisoformat(firing["fired_at"]) - datetime.fromisoformat(firing["active_at"])
        assert held.total_seconds() >= 2  # the rule's duration: Prometheus's `for`
        assert firing["value"] > 150

        # Every channel got the firing alert.
        hook = eventually(lambda: receiver.webhook_alerts("high_response_time", "firing"), what="webhook")
        payload = receiver.received["hook"][0]
        assert (
            payload["version"] == "4" and payload["status"] == "firing" and payload["receiver"] == "ops-hook"
        )
        assert payload["groupLabels"] == {"alertname": "high_response_time"}
        assert hook[0]["labels"]["severity"] == "warning" and hook[0]["fingerprint"]
        slack = eventually(lambda: receiver.received["slack"], what="slack")
        assert slack[0]["channel"] == "#ops-alerts"
        assert slack[0]["attachments"][0]["title"] == "FIRING: high_response_time (warning)"
        am = eventually(lambda: receiver.received["am"], what="alertmanager")
        assert am[0][0]["labels"]["alertname"] == "high_response_time" and am[0][0]["startsAt"]
        held_by_am = eventually(
            lambda: [a for a in alertmanager.alerts() if a["labels"]["alertname"] == "high_response_time"],
            what="a real Alertmanager to hold the alert",
        )
        assert (
            held_by_am[0]["status"]["state"] == "active" and held_by_am[0]["labels"]["severity"] == "warning"
        )
        mail = eventually(
            lambda: [m for m in inbox.messages if "high_response_time" in m["Subject"]], what="email"
        )
        assert mail[0]["Subject"] == "[iros] [FIRING:1] [warning] high_response_time"
        assert mail[0]["To"] == "ops@example.com"
        text = mail[0].get_payload(decode=True).decode()
        assert firing["id"] in text and "response_time_avg > 150" in text

        # Alerts reach the live stream too.
        with connect(f"ws://127.0.0.1:{iros.port}/ws/metrics", additional_headers=ADMIN) as ws:
            first = orjson.loads(ws.recv(timeout=10))
        assert [a["id"] for a in first["alerts"]["active"]] == [firing["id"]]

        ack = api(
            iros, "POST", f"/api/alerts/{firing['id']}/acknowledge", json={"who": "kim", "comment": "on it"}
        )
        assert ack.status_code == 200 and ack.json()["acknowledged_by"] == "kim"
        shown = active(iros, "high_response_time")
        assert shown is not None and shown["acknowledged"] and shown["ack_comment"] == "on it"

        receiver.delay = 0.0  # recovery
        eventually(lambda: active(iros, "high_response_time") is None, what="resolution")
        resolved = eventually(
            lambda: receiver.webhook_alerts("high_response_time", "resolved"), what="resolved"
        )
        assert resolved[0]["endsAt"] > resolved[0]["startsAt"]
        eventually(
            lambda: (
                not [a for a in alertmanager.alerts() if a["labels"]["alertname"] == "high_response_time"]
            ),
            what="the Alertmanager to see the resolution",
        )
    assert set(load.statuses) == {200}

    history = api(iros, "GET", "/api/alerts/history", params={"rule": "high_response_time"}).json()
    assert history["total"] == 1
    episode = history["alerts"][0]
    assert episode["state"] == "resolved" and episode["acknowledged_by"] == "kim"
    detail = api(iros, "GET", f"/api/alerts/{episode['id']}").json()
    steps = [(t["from"], t["to"]) for t in detail["transitions"]]
    assert (
        ("inactive", "pending") in steps
        and ("pending", "firing") in steps
        and steps[-1] == ("firing", "resolved")
    )


def test_silences_hold_notifications_back_until_they_end(iros: IrosProcess, receiver: Receiver) -> None:
    """A matcher silence lets the alert fire but notify no one; expiring it sends the firing alert."""
    made = api(
        iros,
        "POST",
        "/api/alerts/silences",
        json={"matchers": {"alertname": "high_response_time"}, "duration_minutes": 60, "comment": "deploy"},
    )
    assert made.status_code == 201 and made.json()["active"]
    before = len(receiver.received["hook"])
    receiver.delay = 0.3
    try:
        with Traffic(iros):
            firing = eventually(
                lambda: (a := active(iros, "high_response_time")) and a["state"] == "firing" and a,
                what="firing",
            )
            assert firing["silenced_by"] == [made.json()["id"]]
            time.sleep(1.0)  # several evaluations: a notification would have gone out by now
            assert len(receiver.received["hook"]) == before

            per_alert = api(iros, "POST", f"/api/alerts/{firing['id']}/silence", json={"duration_minutes": 1})
            assert per_alert.status_code == 200
            assert per_alert.json()["silence"]["matchers"] == [
                {"name": "alertname", "value": "high_response_time", "isEqual": True}
            ]
            for s in api(iros, "GET", "/api/alerts/silences").json()["silences"]:
                assert api(iros, "DELETE", f"/api/alerts/silences/{s['id']}").status_code == 200
            eventually(lambda: len(receiver.webhook_alerts("high_response_time", "firing")) == 2, what="sent")
    finally:
        receiver.delay = 0.0
    eventually(lambda: active(iros, "high_response_time") is None, what="resolution")
    page = api(iros, "GET", "/api/alerts/history", params={"rule": "high_response_time", "limit": 1}).json()
    assert page["total"] == 2 and page["next_offset"] == 1 and len(page["alerts"]) == 1
    later = api(iros, "GET", "/api/alerts/history", params={"start": "2999-01-01"}).json()
    assert later["total"] == 0
    warnings = api(
        iros, "GET", "/api/alerts/history", params={"severity": "warning", "state": "resolved"}
    ).json()
    assert warnings["total"] == 2 and {a["rule"] for a in warnings["alerts"]} == {"high_response_time"}


def test_channel_tests_deliver_and_failures_keep_secrets(
    iros: IrosProcess, receiver: Receiver, inbox: Inbox
) -> None:
    """A test notification reaches the channel; a failing channel says why without its URL."""
    assert api(iros, "POST", "/api/alerts/channels/email/test").json() == {"channel": "email", "sent": True}
    assert any("test notification" in m["Subject"] for m in inbox.messages)
    slack_before = len(receiver.received["slack"])
    assert api(iros, "POST", "/api/alerts/channels/slack/test").status_code == 200
    assert len(receiver.received["slack"]) == slack_before + 1
    dead = api(iros, "POST", "/api/alerts/channels/dead/test")
    assert dead.status_code == 502 and dead.json()["error"]["code"] == "channel_failed"
    missing = api(iros, "POST", "/api/alerts/channels/pager/test")
    assert missing.status_code == 404 and "ops-hook" in missing.json()["error"]["message"]
    for path in ("/api/alerts/channels", "/api/config", "/api/alerts/rules"):
        text = api(iros, "GET", path).text
        assert DEAD_SECRET not in text and SECRET_PATH not in text
    assert DEAD_SECRET not in dead.text and SECRET_PATH not in iros.output()


def test_rules_change_live_and_bad_rules_say_what_is_wrong(iros: IrosProcess) -> None:
    """PUT replaces the rules after checking each; a bad one is a 422 naming the problem."""
    bad = api(
        iros,
        "PUT",
        "/api/alerts/rules",
        json={"alert_rules": [{"name": "x", "condition": "respone_time_p95 > 1", "channels": ["pagr"]}]},
    )
    assert bad.status_code == 422
    message = bad.json()["error"]["message"]
    assert "unknown KPI 'respone_time_p95'" in message and "did you mean" in message
    rules = [HIGH, {"name": "errors", "condition": "rate(errors, 1m) > 0.5", "duration": "30s"}]
    ok = api(iros, "PUT", "/api/alerts/rules", json={"alert_rules": rules})
    assert ok.status_code == 200 and ok.json()["source"] == "api"
    assert [r["name"] for r in ok.json()["alert_rules"]] == ["high_response_time", "errors"]
    assert api(iros, "GET", "/api/alerts/rules", headers=CLIENT).status_code in (401, 403)
    back = api(iros, "DELETE", "/api/alerts/rules").json()
    assert back["source"] == "config" and [r["name"] for r in back["alert_rules"]] == ["high_response_time"]
    assert api(iros, "GET", "/api/alerts/history", params={"severity": "loud"}).status_code == 400
    assert api(iros, "POST", "/api/alerts/nope/acknowledge", json={}).status_code == 404
    for body, param in (
        ({"matchers": {}, "duration_minutes": 5}, "matchers"),
        ({"matchers": {"alertname": "x"}, "duration_minutes": -5}, "duration_minutes"),
        ({"matchers": [{"name": "alertname", "value": "x.*", "isRegex": True}]}, "matchers"),
    ):
        refused = api(iros, "POST", "/api/alerts/silences", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param
    assert api(iros, "POST", "/api/alerts/silences", content=b"{not json").status_code == 400


def test_a_kill_9_while_firing_keeps_the_state_and_sends_no_duplicate(
    tmp_path: Path, receiver: Receiver, inbox: Inbox
) -> None:
    """After a SIGKILL and a restart the same alert is firing and its channel hears nothing new."""
    quiet = {"name": "no_traffic", "condition": "count == 0", "duration": "1s", "channels": ["ops-hook"]}
    port = free_port()
    first = serve(tmp_path, receiver, inbox.port, port=port, alert_rules=[quiet]).start()
    try:
        firing = eventually(lambda: (a := active(first, "no_traffic")) and a["state"] == "firing" and a)
        eventually(lambda: receiver.webhook_alerts("no_traffic", "firing"), what="the firing notification")
        # Delivered and recorded as such (a kill between the receiver's answer and that record would
        # resend it: delivery is at least once).
        eventually(lambda: outbox(first, "ops-hook").get("sent") == 1, what="the delivery to be recorded")
        first.signal(signal.SIGKILL)
        first.proc.wait(10)  # type: ignore[union-attr]
    finally:
        first.stop()
    with serve(tmp_path, receiver, inbox.port, port=port, alert_rules=[quiet]) as second:
        again = active(second, "no_traffic")
        assert again is not None and again["id"] == firing["id"] and again["state"] == "firing"
        evaluations = api(second, "GET", "/api/alerts/status").json()["evaluations"]
        eventually(lambda: api(second, "GET", "/api/alerts/status").json()["evaluations"] >= evaluations + 10)
        assert active(second, "no_traffic")["id"] == firing["id"]  # type: ignore[index]
    assert len(receiver.webhook_alerts("no_traffic", "firing")) == 1


@pytest.fixture(scope="module")
def tls_inbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inbox]:
    """An SMTP server that offers STARTTLS (a self-signed certificate) and needs a login."""
    import ssl
    import subprocess

    from aiosmtpd.smtp import AuthResult

    certs = tmp_path_factory.mktemp("smtp-tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(certs / "key.pem"), "-out", str(certs / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "cert.pem", certs / "key.pem")

    def login(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = data.login == b"iros" and data.password == b"s3cret-smtp"
        return AuthResult(success=ok, handled=False)

    handler = Inbox()
    controller = Controller(
        handler, hostname="127.0.0.1", port=handler.port, tls_context=context, require_starttls=True,
        auth_required=True, authenticator=login,
    )  # fmt: skip
    controller.start()
    try:
        yield handler
    finally:
        controller.stop()


async def test_email_uses_starttls_and_a_password_from_the_environment(
    tls_inbox: Inbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STARTTLS and login work with the password read from the environment; a wrong one fails for good,
    and its error does not show it."""
    from iros.alerting.channels.base import ChannelError, Notification
    from iros.alerting.channels.email import EmailChannel
    from iros.config import EmailChannelConfig

    def channel() -> EmailChannel:
        config = EmailChannelConfig(
            smtp_server=f"127.0.0.1:{tls_inbox.port}", recipients=["ops@example.com"], tls="starttls",
            username="iros", password_env="IROS_TEST_SMTP_PASSWORD", validate_certs=False,
        )  # fmt: skip
        return EmailChannel("email", config)

    note = Notification("email", "firing", "k", {}, [], test=True)
    monkeypatch.setenv("IROS_TEST_SMTP_PASSWORD", "s3cret-smtp")
    await channel().send(note)
    assert tls_inbox.messages[-1]["Subject"] == "[iros] test notification from Iros (email)"

    monkeypatch.setenv("IROS_TEST_SMTP_PASSWORD", "wrong-s3cret")
    with pytest.raises(ChannelError) as err:
        await channel().send(note)
    assert not err.value.retryable and "wrong-s3cret" not in str(err.value)


def test_with_several_workers_one_evaluates_and_all_answer(
    tmp_path: Path, receiver: Receiver, inbox: Inbox
) -> None:
    """Under --workers 2 one worker holds the lock and notifies once; every worker shows the alert."""
    quiet = {"name": "quiet_workers", "condition": "count == 0", "channels": ["ops-hook"]}
    proc = serve(tmp_path, receiver, inbox.port, alert_rules=[quiet])
    proc.args += ["--workers", "2"]
    with proc:
        eventually(lambda: receiver.webhook_alerts("quiet_workers", "firing"), what="the firing notification")
        leaders = set()
        for _ in range(300):  # each new connection lands on either worker
            leaders.add(api(proc, "GET", "/api/alerts/status").json()["leader"])
            shown = eventually(lambda: active(proc, "quiet_workers"), what="every worker to show the alert")
            assert shown["state"] == "firing"
            if leaders == {True, False}:
                break
        assert leaders == {True, False}
        time.sleep(1.0)  # several evaluation intervals
    assert len(receiver.webhook_alerts("quiet_workers", "firing")) == 1


def test_smtp_down_holds_the_email_until_the_server_returns(
    tmp_path: Path, receiver: Receiver, inbox: Inbox
) -> None:
    """An email accepted for delivery while the SMTP server is down waits in the outbox, is retried, and
    arrives once when the server comes back."""
    late = Inbox()  # its port has no server yet
    rule = {
        "name": "smtp_outage",
        "condition": "response_time_avg >= 0",
        "duration": "0s",
        "channels": ["email"],
    }
    with serve(tmp_path, receiver, late.port, alert_rules=[rule]) as proc, Traffic(proc):
        eventually(lambda: active(proc, "smtp_outage"), what="the alert to fire")
        eventually(
            lambda: outbox(proc, "email").get("queued", 0) >= 1, what="the email to wait in the outbox"
        )
        assert late.messages == []
        controller = Controller(late, hostname="127.0.0.1", port=late.port)
        controller.start()
        try:
            eventually(lambda: late.messages, timeout=30, what="the email to arrive after the outage")
            eventually(lambda: outbox(proc, "email").get("queued", 0) == 0, what="the outbox to empty")
            assert len([m for m in late.messages if "smtp_outage" in str(m["Subject"])]) == 1
        finally:
            controller.stop()
