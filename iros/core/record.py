"""RequestRecord: what happened to one request, handed to every observer when it ends.

record = RequestRecord(request_id, time.time(), Spans())
gateway.observers.append(lambda record: print(record.status, record.spans.ms()["overhead"]))
note_result(record, completion)   # usage and finish_reason from a whole answer (note_chunk: a chunk)
"""

from __future__ import annotations

import base64
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from iros.core.redact import log_value
from iros.core.spans import Spans
from iros.core.tracecontext import TraceContext

access_log = logging.getLogger("iros.access")


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request; observers (metrics, logs, analysis) read it when it ends."""

    request_id: str
    started_at: float
    spans: Spans
    principal: str = "-"
    operation: str = "chat"  # chat, text_completion or embeddings (gen_ai.operation.name)
    model: str | None = None
    deployment: str | None = None
    stream: bool = False
    status: int = 0
    cache: str = "bypass"
    attempts: int = 0
    chunks: int = 0
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    client_gone: bool = False
    body_bytes: int = 0
    # Streams: perf_counter_ns of the first and last chunk sent, the longest pause between two, and
    # how many pauses exceeded the stall threshold.
    first_chunk_ns: int = 0
    last_chunk_ns: int = 0
    max_gap_ns: int = 0
    stalls: int = 0
    # Kept for a sample of requests only (metrics_collection.relevance_sample_rate): the request and
    # the answer, for the question-answer relevance score computed off the request path.
    sampled: bool = False
    payload: dict[str, Any] | None = None
    answer: dict[str, Any] | None = None
    chunk_log: list[bytes] | None = None
    # perf_counter_ns when the call that answered began and (not streaming) ended; 0 for none.
    upstream_start_ns: int = 0
    upstream_end_ns: int = 0
    coalesced: bool = False  # answered by an identical request's upstream call (single-flight)
    usage_counted: bool = False  # the model server reported no usage: Iros counted it (core.tokens)
    trace: TraceContext | None = None  # only while traces are exported (OTEL_*): iros/otel
    # US dollars (gateway/costs.py): what the answer cost (None: no pricing), and what an answer served
    # without a model call (cache hit, shared call) would have cost.
    cost_usd: float | None = None
    saved_usd: float = 0.0


Observer = Callable[[RequestRecord], None]


class RequestIds:
    """Unguessable request ids (a key must not guess another's: feedback names a request by its id):
    120 random bits each, 20 base64url characters, drawn from the OS in blocks so that one costs
    about 0.15 µs, less than the prefix-and-counter it replaced.

    next_id = RequestIds()
    next_id()        # 'q3V0cC1Vb2tZc0xfRkFh'
    """

    BLOCK = 256

    def __init__(self) -> None:
        self._ids: Iterator[str] = iter(())
        # A forked child must not hand out its parent's remaining ids.
        os.register_at_fork(after_in_child=self._drop)

    def _drop(self) -> None:
        self._ids = iter(())

    def __call__(self) -> str:
        try:
            return next(self._ids)
        except StopIteration:
            raw = base64.urlsafe_b64encode(os.urandom(15 * self.BLOCK)).decode()
            self._ids = iter([raw[i : i + 20] for i in range(0, len(raw), 20)])
            return next(self._ids)


def upstream_ms(spans: Spans) -> float:
    d = spans.durations
    return (d.get("upstream_connect", 0) + d.get("upstream_ttft", 0) + d.get("stream", 0)) / 1e6


def usage_of(usage: dict[str, Any]) -> dict[str, int]:
    """The counts of an OpenAI usage object, with the prompt tokens served from the upstream's cache
    (prompt_tokens_details.cached_tokens) as `cached_tokens`."""
    counts = {k: v for k, v in usage.items() if isinstance(v, int)}
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        counts["cached_tokens"] = details["cached_tokens"]
    return counts


def note_result(record: RequestRecord, data: dict[str, Any]) -> None:
    usage = data.get("usage")
    if isinstance(usage, dict):
        record.usage = usage_of(usage)
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        record.finish_reason = choices[0].get("finish_reason")


# A chunk that names a finish reason or carries usage, however the server spaces its JSON (llama.cpp
# writes `"finish_reason": "stop"`); the others, most of a stream, are not parsed.
NOTABLE_CHUNK = re.compile(rb'"(?:finish_reason"\s*:\s*"|usage"\s*:\s*\{)')


def note_chunk(record: RequestRecord, data: bytes) -> None:
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    if isinstance(chunk, dict):
        usage, choices = chunk.get("usage"), chunk.get("choices")
        if isinstance(usage, dict):
            record.usage = usage_of(usage)
        if (
            isinstance(choices, list)
            and choices
            and isinstance(choices[0], dict)
            and choices[0].get("finish_reason")
        ):
            record.finish_reason = choices[0]["finish_reason"]


def log_access(record: RequestRecord) -> None:
    ms = record.spans.ms()
    access_log.info(
        "%s %s model=%s via=%s status=%d cache=%s stream=%s total_ms=%.2f overhead_ms=%.3f attempts=%d%s",
        record.request_id,
        record.principal,
        log_value(record.model),  # the client's string: quoted if it could forge a line or a field
        record.deployment,
        record.status,
        record.cache,
        record.stream,
        ms["total"],
        ms["overhead"],
        record.attempts,
        f" error={record.error}" if record.error else "",
    )
