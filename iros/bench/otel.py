"""`iros bench otel`: the CPU OpenTelemetry export spends per request, in-process, stage by stage.

result = run_otel_bench(requests=2000)   # {"build_us_per_request": ..., "encode_us_per_request": ...}

Synthetic finished requests (every pipeline stage timed, an upstream call, usage) go through what a
drain does (iros/otel/export.py): spans built as SDK ReadableSpans, the four GenAI instruments recorded
(an in-memory reader aggregates, as a periodic one would), and the spans encoded to OTLP protobuf by
the SDK's own encoder, as the exporter's thread does before sending. CPU is the process's clock.
"""

from __future__ import annotations

import time
from typing import Any

from iros.core.record import RequestRecord
from iros.core.spans import STAGES, Spans
from iros.core.tracecontext import TraceContext
from iros.otel.env import OtelEnv
from iros.otel.export import Instruments, Sdk, request_spans


def _finished(i: int) -> RequestRecord:
    spans = Spans()
    for stage in STAGES:
        if stage != "stream":
            spans.lap(stage)
    spans.finish()
    record = RequestRecord(f"bench{i:08x}", time.time(), spans, model="large", deployment="large#0")
    record.status, record.cache, record.attempts, record.finish_reason = 200, "miss", 1, "stop"
    record.usage = {"prompt_tokens": 12, "completion_tokens": 40}
    record.upstream_start_ns, record.upstream_end_ns = spans.start, spans.end
    record.trace = TraceContext.start(None)
    return record


def run_otel_bench(requests: int = 2000) -> dict[str, Any]:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    sdk = Sdk(OtelEnv((), ()))
    instruments = Instruments(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    records = [_finished(i) for i in range(requests)]

    began = time.process_time()
    built = [request_spans(r, sdk.resource, sdk.scope, "large") for r in records]
    build = time.process_time() - began

    began = time.process_time()
    for r in records:
        instruments.record(r, "large", "large")
    record = time.process_time() - began

    flat = [span for spans in built for span in spans]
    began = time.process_time()
    body = encode_spans(flat).SerializeToString()
    encode = time.process_time() - began
    return {
        "benchmark": "otel",
        "requests": requests,
        "spans_per_request": round(len(flat) / requests, 2),
        "build_us_per_request": round(build / requests * 1e6, 1),
        "metrics_us_per_request": round(record / requests * 1e6, 1),
        "encode_us_per_request": round(encode / requests * 1e6, 1),
        "total_us_per_request": round((build + record + encode) / requests * 1e6, 1),
        "otlp_bytes_per_request": round(len(body) / requests, 1),
    }
