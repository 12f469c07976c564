"""Spans and resource built from one RequestRecord, in-process (end to end: test_export.py)."""

from __future__ import annotations

import itertools
import time

import pytest

from iros.core.record import RequestRecord
from iros.core.spans import Spans
from iros.core.tracecontext import TraceContext
from iros.otel.env import OtelEnv
from iros.otel.export import Sdk, request_spans


def finished(status: int = 200, error: str | None = None) -> RequestRecord:
    spans = Spans()
    for stage in ("auth", "parse", "cache", "route", "queue", "upstream_connect", "upstream_ttft", "respond"):
        spans.lap(stage)
    spans.finish()
    record = RequestRecord("r1", time.time(), spans, model="large", deployment="large#0", status=status)
    record.error, record.cache, record.attempts = error, "miss", 1
    record.upstream_start_ns, record.upstream_end_ns = spans.start + 1000, spans.end - 1000
    record.trace = TraceContext.start(None)
    return record


@pytest.fixture
def sdk(monkeypatch: pytest.MonkeyPatch) -> Sdk:
    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_SAMPLER"):
        monkeypatch.delenv(name, raising=False)
    return Sdk(OtelEnv((), ()))


def test_iros_names_itself_unless_otel_service_name_does(sdk: Sdk, monkeypatch: pytest.MonkeyPatch) -> None:
    """service.name is `iros` by default and OTEL_SERVICE_NAME's value when set."""
    assert sdk.resource.attributes["service.name"] == "iros"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-eu")
    assert Sdk(OtelEnv((), ())).resource.attributes["service.name"] == "gateway-eu"


def test_stage_spans_lie_inside_the_request_in_order(sdk: Sdk) -> None:
    """Each timed stage is a child span, one after another from the request's start, within it."""
    record = finished()
    server, *children = request_spans(record, sdk.resource, sdk.scope, "large")
    stages = [s for s in children if s.name.startswith("iros.")]
    assert [s.name for s in stages] == [f"iros.{k}" for k in record.spans.durations]
    assert stages[0].start_time == server.start_time
    for before, after in itertools.pairwise(stages):
        assert before.end_time == after.start_time
    assert stages[-1].end_time <= server.end_time
    assert all(s.parent.span_id == server.context.span_id for s in children)


def test_a_server_error_marks_the_span_as_an_error(sdk: Sdk) -> None:
    """A 5xx answer sets the span's status to ERROR and error.type to the error's code."""
    server = request_spans(finished(502, "upstream_error"), sdk.resource, sdk.scope, "large")[0]
    assert server.status.status_code.name == "ERROR"
    assert server.attributes["error.type"] == "upstream_error"
