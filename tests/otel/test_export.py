"""OpenTelemetry end to end: a real `iros serve` configured only by OTEL_* variables, exporting over
OTLP/HTTP to a real receiver that decodes with opentelemetry-proto's own messages."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from iros.testing.iros import IrosProcess, ProcessFailed, wait_until
from iros.testing.otlp import OtlpReceiver, ReceivedSpan
from tests.conftest import RecordingUpstream

pytestmark = pytest.mark.e2e

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def config(recorder: RecordingUpstream) -> dict[str, Any]:
    return {
        "auth": {"open": True},
        "retry": {"attempts": 1},
        "models": [
            {"name": "rec", "backend": "openai", "base_url": recorder.url},
            {"name": "sim", "backend": "simulated", "profile": "instant"},
        ],
        "cache": {"enabled": True, "semantic": False},
    }


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def traced(otlp: OtlpReceiver, recorder: RecordingUpstream) -> Iterator[IrosProcess]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
        "OTEL_SERVICE_NAME": "iros-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
    }
    with IrosProcess.serve(config(recorder), env=env) as proc:
        yield proc


def chat(
    proc: IrosProcess, model: str, text: str, headers: dict[str, str] | None = None, **extra: Any
) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    resp = httpx.post(f"{proc.url}/v1/chat/completions", json=body, headers=headers or {}, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp


def trace_of(otlp: OtlpReceiver, request_id: str) -> list[ReceivedSpan]:
    """Every span of the trace whose request span carries `request_id`, once the upstream span (if any)
    has arrived too."""
    spans = otlp.spans()
    root = next((s for s in spans if s.attributes.get("iros.request_id") == request_id), None)
    if root is None:
        return []
    return [s for s in spans if s.trace_id == root.trace_id]


def wait_trace(otlp: OtlpReceiver, resp: httpx.Response) -> list[ReceivedSpan]:
    rid = resp.headers["x-iros-request-id"]
    return wait_until(lambda: trace_of(otlp, rid), f"the spans of request {rid}", timeout=20)


def test_a_request_continues_the_clients_trace_with_genai_attributes_and_stage_spans(
    traced: IrosProcess, otlp: OtlpReceiver, recorder: RecordingUpstream
) -> None:
    """The client's traceparent is continued: one SERVER span with the GenAI attributes, a child per
    pipeline stage, and a CLIENT span for the upstream call, whose id the model server was told."""
    header = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
    resp = chat(traced, "rec", "what is OTLP", header)
    spans = wait_trace(otlp, resp)
    (server,) = [s for s in spans if s.kind == "SPAN_KIND_SERVER"]
    assert server.trace_id == CLIENT_TRACE and server.parent_span_id == CLIENT_SPAN
    assert server.name == "chat rec"
    a = server.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "rec" and a["gen_ai.response.model"] == "rec"
    assert a["gen_ai.usage.input_tokens"] == 3 and a["gen_ai.usage.output_tokens"] == 1
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["iros.cache"] == "miss" and a["iros.cache.hit"] is False
    assert a["http.response.status_code"] == 200
    assert server.resource["service.name"] == "iros-under-test"
    stages = {s.name: s for s in spans if s.kind == "SPAN_KIND_INTERNAL"}
    assert {
        "iros.auth",
        "iros.parse",
        "iros.cache",
        "iros.route",
        "iros.upstream_connect",
        "iros.respond",
    } <= set(stages)
    for stage in stages.values():
        assert stage.parent_span_id == server.span_id
        assert server.start_ns <= stage.start_ns <= stage.end_ns <= server.end_ns + 1_000_000
    (client,) = [s for s in spans if s.kind == "SPAN_KIND_CLIENT"]
    assert client.parent_span_id == server.span_id
    sent = recorder.requests[-1]["headers"]
    traceparent = {k.lower(): v for k, v in sent.items()}["traceparent"]
    assert traceparent == f"00-{CLIENT_TRACE}-{client.span_id}-01"


def test_a_cache_hit_is_an_attribute_and_calls_no_upstream(traced: IrosProcess, otlp: OtlpReceiver) -> None:
    """The same question again is answered by the cache: its span says so and has no upstream call."""
    chat(traced, "rec", "is this cached")
    resp = chat(traced, "rec", "is this cached")
    spans = wait_trace(otlp, resp)
    (server,) = [s for s in spans if s.kind == "SPAN_KIND_SERVER"]
    assert server.attributes["iros.cache"] == "hit" and server.attributes["iros.cache.hit"] is True
    assert not [s for s in spans if s.kind == "SPAN_KIND_CLIENT"]


def test_without_a_traceparent_iros_starts_the_trace_the_upstream_joins(
    traced: IrosProcess, otlp: OtlpReceiver, recorder: RecordingUpstream
) -> None:
    """A request without a (valid) traceparent starts a trace; the model server's header names it."""
    resp = chat(traced, "rec", "a fresh trace", {"traceparent": "not-a-trace"})
    spans = wait_trace(otlp, resp)
    (server,) = [s for s in spans if s.kind == "SPAN_KIND_SERVER"]
    assert server.parent_span_id == "" and server.trace_id != CLIENT_TRACE
    traceparent = {k.lower(): v for k, v in recorder.requests[-1]["headers"].items()}["traceparent"]
    assert traceparent.split("-")[1] == server.trace_id


def test_genai_metrics_are_exported(traced: IrosProcess, otlp: OtlpReceiver) -> None:
    """Operation duration and token usage for every answer, TTFT and time per output token for streams."""
    chat(traced, "sim", "count to ten slowly", stream=True, max_tokens=16)
    names = (
        "gen_ai.client.operation.duration",
        "gen_ai.client.token.usage",
        "gen_ai.server.time_to_first_token",
        "gen_ai.server.time_per_output_token",
    )
    metrics = wait_until(
        lambda: (m := otlp.metrics()) and all(n in m for n in names) and m, "the four GenAI instruments", 20
    )
    duration = metrics["gen_ai.client.operation.duration"]
    assert {p["unit"] for p in duration} == {"s"} and {p["kind"] for p in duration} == {"histogram"}
    by_model = {p["attributes"]["gen_ai.request.model"] for p in duration}
    assert {"rec", "sim"} <= by_model
    assert all(p["attributes"]["gen_ai.operation.name"] == "chat" for p in duration)
    kinds = {p["attributes"]["gen_ai.token.type"] for p in metrics["gen_ai.client.token.usage"]}
    assert kinds == {"input", "output"}
    ttft = [
        p
        for p in metrics["gen_ai.server.time_to_first_token"]
        if p["attributes"]["gen_ai.request.model"] == "sim"
    ]
    assert ttft and ttft[-1]["count"] >= 1


def test_an_unknown_model_name_is_bounded_in_metrics(traced: IrosProcess, otlp: OtlpReceiver) -> None:
    """A model name Iros does not serve is `other` in metric attributes (bounded series)."""
    resp = httpx.post(
        f"{traced.url}/v1/chat/completions",
        json={"model": "no-such-model-xyz", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert resp.status_code == 404
    points = wait_until(
        lambda: [
            p
            for p in otlp.metrics().get("gen_ai.client.operation.duration", [])
            if p["attributes"].get("error.type")
        ],
        "an errored operation",
        20,
    )
    assert {p["attributes"]["gen_ai.request.model"] for p in points} == {"other"}


def test_without_otel_variables_nothing_is_exported_nor_imported(recorder: RecordingUpstream) -> None:
    """With no OTEL_* set the SDK is never imported and the upstream call carries no traceparent."""
    code = (
        "import sys, os\n"
        "from iros.config import load_settings\n"
        "from iros.app import create_app\n"
        "create_app(load_settings(None))\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    with IrosProcess.serve(config(recorder), env={"OTEL_SDK_DISABLED": "true"}) as proc:
        chat(proc, "rec", "no tracing here")
        headers = {k.lower() for k in recorder.requests[-1]["headers"]}
    assert "traceparent" not in headers


def test_the_start_banner_says_what_is_exported(traced: IrosProcess) -> None:
    """`iros serve` says which signals OTEL_* switched on."""
    assert "OpenTelemetry (OTEL_*): traces otlp, metrics otlp" in traced.log_path.read_text()


def test_an_unsupported_protocol_stops_the_start_naming_the_variable(recorder: RecordingUpstream) -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc is refused at start with a message, not ignored."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    proc = IrosProcess.serve(config(recorder), env=env)
    with pytest.raises(ProcessFailed):
        proc.start(timeout=30)
    proc.stop()
    assert "OTEL_EXPORTER_OTLP_PROTOCOL='grpc'" in proc.log_path.read_text()
