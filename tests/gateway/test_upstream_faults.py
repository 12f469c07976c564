"""Upstream faults are retried or failed over; what cannot be saved becomes a clear 502 or 504."""

from __future__ import annotations

import httpx
import openai
import orjson
import pytest

from iros.testing.iros import IrosProcess
from tests.conftest import CLIENT_KEY

pytestmark = pytest.mark.e2e

AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}


def _ask(model: str, stream: bool = False) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "stream": stream}


# (model, stream, status, code)
FAULTS = [
    ("refused", False, 502, "upstream_connect"),
    ("refused", True, 502, "upstream_connect"),
    ("hanging", False, 504, "upstream_timeout"),
    ("hanging", True, 504, "upstream_timeout"),
    ("broken", False, 502, "upstream_status"),
    ("broken", True, 502, "upstream_status"),
    ("cutting", False, 502, "upstream_truncated"),
    ("keyless", False, 502, "upstream_auth"),
]


@pytest.mark.parametrize(
    ("model", "stream", "status", "code"),
    FAULTS,
    ids=[f"{m}-{'stream' if s else 'whole'}" for m, s, *_ in FAULTS],
)
def test_upstream_fault_becomes_a_clear_error(
    iros: IrosProcess, model: str, stream: bool, status: int, code: str
) -> None:
    """A fault before the first byte reaches the client as one error status, after the retries."""
    resp = httpx.post(f"{iros.url}/v1/chat/completions", json=_ask(model, stream), headers=AUTH, timeout=20)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert error["code"] == code
    assert error["type"] == "upstream_error"
    # The model and the kind of failure; never the model server's address (it may hold credentials).
    assert error["message"].startswith(f"model {model!r}: ") and "127.0.0.1" not in error["message"]


def test_stream_cut_midway_ends_with_an_error_event_and_no_done(iros: IrosProcess) -> None:
    """Once chunks have been relayed, a cut upstream ends the stream with an error event, never [DONE]."""
    with httpx.stream(
        "POST", f"{iros.url}/v1/chat/completions", json=_ask("cutting", True), headers=AUTH, timeout=20
    ) as resp:
        assert resp.status_code == 200
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert "[DONE]" not in events
    assert len(events) >= 2
    last = orjson.loads(events[-1])
    assert last["error"]["code"] == "upstream_truncated"


def test_sdk_raises_on_a_cut_stream(iros: IrosProcess) -> None:
    """The openai SDK sees the error event as an error, so a truncated answer is never taken as whole."""
    client = openai.OpenAI(base_url=f"{iros.url}/v1", api_key=CLIENT_KEY, max_retries=0)
    stream = client.chat.completions.create(
        model="cutting", messages=[{"role": "user", "content": "x"}], stream=True
    )
    with pytest.raises(openai.APIError):
        list(stream)


@pytest.mark.parametrize("stream", [False, True])
def test_failover_to_the_next_deployment(iros: IrosProcess, stream: bool) -> None:
    """A deployment that refuses connections is skipped for the next one of the same model."""
    for _ in range(3):
        resp = httpx.post(
            f"{iros.url}/v1/chat/completions", json=_ask("failover", stream), headers=AUTH, timeout=20
        )
        assert resp.status_code == 200
        assert resp.headers["x-iros-model"] == "failover"


def test_ready_names_the_model_that_cannot_be_reached(iros: IrosProcess) -> None:
    """/ready fails while a model has no reachable deployment, and says which."""
    resp = httpx.get(f"{iros.url}/ready", timeout=10)
    assert resp.status_code == 503
    models = resp.json()["models"]
    assert models["refused"]["ready"] is False
    assert models["fast"]["ready"] is True
    assert models["failover"]["ready"] is True  # one of its two deployments answers
    assert "127.0.0.1" not in resp.text


def test_ready_is_200_when_every_model_answers(upstream: IrosProcess) -> None:
    """With every upstream up, /ready is 200."""
    config = {
        "auth": {"open": True},
        "models": [{"name": "m", "base_url": f"{upstream.url}/v1"}, {"name": "sim", "backend": "simulated"}],
    }
    with IrosProcess.serve(config) as proc:
        resp = httpx.get(f"{proc.url}/ready")
    assert resp.status_code == 200
    assert resp.json()["ready"] is True
