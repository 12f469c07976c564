"""One response's metrics as the seed names them, and the bounded labels of its status.

metrics = response_metrics(record, "gpt-4o-mini", cpu_ms=0.2, overhead_ms=0.4, system=sampler.latest)
metrics.outcome              # "ok" | "client_error" | "server_error" | "cancelled"
code_label(418)              # "4xx": statuses Iros sends keep their number, others only their class
"""

from __future__ import annotations

from dataclasses import dataclass, field

from iros.core.record import RequestRecord
from iros.metrics.relevance import relevance
from iros.metrics.sampler import SystemMetrics


@dataclass(slots=True)
class ResponseMetrics:
    """The seed's ResponseMetrics for one response (plus the fields the KPIs need)."""

    request_id: str
    timestamp: float
    response_time: float  # ms, request received to last byte
    cpu_usage: float  # % of this response's time that Iros spent on CPU (cpu_per_response_percent)
    memory_usage: int  # Iros resident bytes at the latest system sample
    gpu_usage: float | None
    cache_hit: bool
    model_used: str
    content_length: int
    optimization_applied: tuple[str, ...]
    user_satisfaction: float | None = None
    status: int = 0
    outcome: str = "ok"
    cache: str = "bypass"
    stream: bool = False
    overhead_ms: float = 0.0
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    max_gap_ms: float | None = None
    stalls: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    principal: str = "-"
    relevance: float | None = field(default=None, repr=False)


def outcome_of(status: int) -> str:
    if status < 400:
        return "ok"
    if status == 499:
        return "cancelled"
    if status == 429 or status >= 500:
        return "server_error"
    return "client_error"


def code_label(status: int) -> str:
    # Bounded: the statuses Iros sends, anything else by class.
    return CODES.get(status) or f"{status // 100}xx"


CODES = {
    s: str(s) for s in (200, 400, 401, 403, 404, 405, 408, 409, 413, 415, 422, 429, 499, 500, 502, 503, 504)
}
OUTCOMES = {s: outcome_of(s) for s in CODES}


def optimizations_of(record: RequestRecord) -> tuple[str, ...]:
    applied = []
    if record.cache.endswith("hit"):
        applied.append(f"cache_{record.cache}")
    if record.attempts > 1:
        applied.append("failover" if "retry" not in record.spans.durations else "retry")
    if record.stream:
        applied.append("streaming")
    return tuple(applied)


def response_metrics(
    record: RequestRecord, model: str, cpu_ms: float, overhead_ms: float, system: SystemMetrics | None
) -> ResponseMetrics:
    """The seed's ResponseMetrics of one finished request; `model` is its bounded model label."""
    spans = record.spans
    total_ms = spans.total_ns / 1e6
    cache = record.cache
    hit = cache.endswith("hit")
    optimizations: tuple[str, ...] = ()
    if hit or record.attempts > 1 or record.stream:
        optimizations = optimizations_of(record)
    usage = record.usage
    metrics = ResponseMetrics(
        record.request_id,
        record.started_at + total_ms / 1000,
        total_ms,
        100.0 * cpu_ms / total_ms if total_ms > 0 else 0.0,
        system.process_memory_bytes if system else 0,
        system.gpu_utilization if system else None,
        hit,
        model,
        record.body_bytes,
        optimizations,
        None,
        record.status,
        OUTCOMES.get(record.status) or outcome_of(record.status),
        cache,
        record.stream,
        overhead_ms,
        prompt_tokens=usage.get("prompt_tokens", 0),
        completion_tokens=usage.get("completion_tokens", 0),
        principal=record.principal,
    )
    if record.first_chunk_ns:
        metrics.ttft_ms = (record.first_chunk_ns - spans.start) / 1e6
        metrics.max_gap_ms = record.max_gap_ns / 1e6
        metrics.stalls = record.stalls
        tokens = metrics.completion_tokens or record.chunks
        if tokens > 1:
            metrics.tpot_ms = (record.last_chunk_ns - record.first_chunk_ns) / 1e6 / (tokens - 1)
    if record.sampled and metrics.outcome == "ok":
        metrics.relevance = relevance(record)
    return metrics
