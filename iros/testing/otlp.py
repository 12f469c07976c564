"""An OTLP/HTTP receiver on loopback: what an OpenTelemetry exporter sends, decoded with the protocol's
own messages (opentelemetry-proto), for tests and `iros bench overhead --otel`.

with OtlpReceiver() as otlp:                                   # a thread serving 127.0.0.1:<free port>
    IrosProcess.serve(config, env={"OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint})
    otlp.spans()                                               # [ReceivedSpan, ...], every span so far
    otlp.metrics()                                     # {"gen_ai.client.operation.duration": [point, ...]}
"""

from __future__ import annotations

import gzip
import threading
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from iros.testing.process import free_port

__all__ = ["OtlpReceiver", "ReceivedSpan"]

MAX_BODY = 64 * 1024 * 1024


@dataclass(slots=True)
class ReceivedSpan:
    name: str
    trace_id: str  # hex, as in a traceparent
    span_id: str
    parent_span_id: str  # "" for a root
    kind: str  # SPAN_KIND_SERVER, ...
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str
    status: str = "STATUS_CODE_UNSET"
    events: list[str] = field(default_factory=list)


def value_of(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [value_of(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return attributes_of(v.kvlist_value.values)
    return getattr(v, which) if which else None


def attributes_of(items: Any) -> dict[str, Any]:
    kv: list[KeyValue] = list(items)
    return {a.key: value_of(a.value) for a in kv}


class OtlpReceiver:
    """Receives OTLP/HTTP protobuf on /v1/traces and /v1/metrics; `decode=False` only counts (benches)."""

    def __init__(self, port: int | None = None, decode: bool = True) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.decode = decode
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {"/v1/traces": 0, "/v1/metrics": 0}
        self.bytes = 0
        self._spans: list[ReceivedSpan] = []
        self._metrics: list[dict[str, Any]] = []  # data points, flattened
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> OtlpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length > MAX_BODY or self.path not in receiver.requests:
                    self.send_error(404 if self.path not in receiver.requests else 413)
                    return
                body = self.rfile.read(length)
                encoding = (self.headers.get("content-encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                reply = receiver.take(self.path, body)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # a request line per export would drown the test's output

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def take(self, path: str, body: bytes) -> bytes:
        with self.lock:
            self.requests[path] += 1
            self.bytes += len(body)
        if path == "/v1/traces":
            if self.decode:
                self._take_spans(ExportTraceServiceRequest.FromString(body))
            return bytes(ExportTraceServiceResponse().SerializeToString())
        if self.decode:
            self._take_metrics(ExportMetricsServiceRequest.FromString(body))
        return bytes(ExportMetricsServiceResponse().SerializeToString())

    def _take_metrics(self, request: ExportMetricsServiceRequest) -> None:
        got = []
        for rm in request.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    for p in getattr(m, kind).data_points:
                        point: dict[str, Any] = {
                            "name": m.name,
                            "unit": m.unit,
                            "kind": kind,
                            "attributes": attributes_of(p.attributes),
                            "time_ns": p.time_unix_nano,
                        }
                        if kind == "histogram":
                            point.update(
                                count=p.count,
                                sum=p.sum,
                                bucket_counts=list(p.bucket_counts),
                                explicit_bounds=list(p.explicit_bounds),
                            )
                        else:
                            point["value"] = p.as_double if p.WhichOneof("value") == "as_double" else p.as_int
                        got.append(point)
        with self.lock:
            self._metrics.extend(got)

    def _take_spans(self, request: ExportTraceServiceRequest) -> None:
        got = []
        for rs in request.resource_spans:
            resource = attributes_of(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        ReceivedSpan(
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            kind=Span.SpanKind.Name(s.kind),
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            attributes=attributes_of(s.attributes),
                            resource=resource,
                            scope=ss.scope.name,
                            status=Status.StatusCode.Name(s.status.code),
                            events=[e.name for e in s.events],
                        )
                    )
        with self.lock:
            self._spans.extend(got)

    def spans(self) -> list[ReceivedSpan]:
        with self.lock:
            return list(self._spans)

    def metrics(self) -> dict[str, list[dict[str, Any]]]:
        """Every data point received, oldest first, by metric name: its `unit`, `kind` (histogram, sum,
        gauge), `attributes`, and `count`, `sum`, `bucket_counts`, `explicit_bounds` or `value`."""
        out: dict[str, list[dict[str, Any]]] = {}
        with self.lock:
            for point in self._metrics:
                out.setdefault(point["name"], []).append(point)
        return out
