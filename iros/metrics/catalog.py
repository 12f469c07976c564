"""The metric catalog: every series Iros records, its unit, labels, group and Prometheus twin.

One table serves the collector (what to record), the time-series stores (how to read a series back,
from SQLite or from Prometheus through PromQL) and the API (what may be asked for).

METRICS["response_time_ms"].prom        # "iros_request_duration_seconds"
METRICS["response_time_ms"].scale       # 1000: Prometheus seconds -> catalog milliseconds
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The seed's custom_metrics flags switch groups on and off; "core" and "system" are always on.
Group = Literal["core", "system", "business", "user_journey", "model_performance"]


@dataclass(frozen=True, slots=True)
class MetricDef:
    name: str
    unit: str
    description: str
    group: Group
    # "response": one sample per response (a Prometheus histogram); "gauge": one sample per interval.
    kind: Literal["response", "gauge"]
    prom: str
    scale: float = 1.0
    labels: tuple[str, ...] = ()


_DEFS = (
    MetricDef(
        "response_time_ms",
        "ms",
        "end-to-end response time, request received to last byte sent",
        "core",
        "response",
        "iros_request_duration_seconds",
        1000.0,
        ("model", "cache", "outcome"),
    ),
    MetricDef(
        "overhead_ms",
        "ms",
        "time spent inside Iros (response time less the model server's)",
        "core",
        "response",
        "iros_overhead_seconds",
        1000.0,
        ("model",),
    ),
    MetricDef(
        "cpu_per_response_percent",
        "%",
        "Iros CPU time per response as a share of that response's time",
        "core",
        "response",
        "iros_response_cpu_percent",
        1.0,
        ("model",),
    ),
    MetricDef(
        "ttft_ms",
        "ms",
        "time to first token of a streamed response",
        "user_journey",
        "response",
        "iros_time_to_first_token_seconds",
        1000.0,
        ("model",),
    ),
    MetricDef(
        "tpot_ms",
        "ms",
        "time per output token after the first",
        "model_performance",
        "response",
        "iros_time_per_output_token_seconds",
        1000.0,
        ("model",),
    ),
    MetricDef(
        "stream_max_gap_ms",
        "ms",
        "longest pause between two chunks of a streamed response",
        "user_journey",
        "response",
        "iros_stream_max_gap_seconds",
        1000.0,
        ("model",),
    ),
    MetricDef(
        "stream_stalls",
        "count",
        "pauses between chunks longer than the stall threshold, per streamed response",
        "user_journey",
        "response",
        "iros_stream_stalls",
        1.0,
        ("model",),
    ),
    MetricDef(
        "user_satisfaction",
        "score 0-1",
        "feedback scores sent to POST /api/feedback",
        "user_journey",
        "response",
        "iros_user_satisfaction_score",
        1.0,
        ("model",),
    ),
    MetricDef(
        "relevance",
        "score 0-1",
        "automatic question-answer relevance of sampled responses",
        "user_journey",
        "response",
        "iros_response_relevance_score",
        1.0,
        ("model",),
    ),
    MetricDef(
        "prompt_tokens",
        "tokens",
        "input tokens per response",
        "business",
        "response",
        "iros_input_tokens",
        1.0,
        ("model", "usage"),
    ),
    MetricDef(
        "completion_tokens",
        "tokens",
        "output tokens per response",
        "business",
        "response",
        "iros_output_tokens",
        1.0,
        ("model", "usage"),
    ),
    MetricDef(
        "content_length_bytes",
        "bytes",
        "bytes of response body sent to the client",
        "business",
        "response",
        "iros_response_content_bytes",
        1.0,
        ("model",),
    ),
    MetricDef("cpu_percent", "%", "host CPU utilisation", "system", "gauge", "iros_system_cpu_percent"),
    MetricDef(
        "memory_percent", "%", "host memory utilisation", "system", "gauge", "iros_system_memory_percent"
    ),
    # The CPU KPI (performance_targets.cpu_usage_percent): what the gateway takes of the machine.
    MetricDef(
        "cpu_usage_percent",
        "%",
        "Iros CPU utilisation as a share of the machine (100 = every core busy)",
        "system",
        "gauge",
        "iros_cpu_usage_percent",
    ),
    MetricDef(
        "process_cpu_percent",
        "%",
        "Iros process CPU utilisation (100 = one core)",
        "system",
        "gauge",
        "iros_process_cpu_percent",
    ),
    MetricDef(
        "process_memory_bytes",
        "bytes",
        "Iros resident memory",
        "system",
        "gauge",
        "iros_process_resident_memory_bytes",
    ),
    MetricDef(
        "gpu_utilization_percent",
        "%",
        "GPU utilisation, per GPU",
        "system",
        "gauge",
        "iros_gpu_utilization_percent",
        1.0,
        ("gpu",),
    ),
    MetricDef(
        "gpu_memory_percent",
        "%",
        "GPU memory in use, per GPU",
        "system",
        "gauge",
        "iros_gpu_memory_percent",
        1.0,
        ("gpu",),
    ),
    MetricDef(
        "disk_usage_percent",
        "%",
        "use of the disk holding the data directory",
        "system",
        "gauge",
        "iros_disk_usage_percent",
    ),
    MetricDef(
        "network_rx_bytes_per_second",
        "bytes/s",
        "host network receive rate",
        "system",
        "gauge",
        "iros_network_receive_bytes_per_second",
    ),
    MetricDef(
        "network_tx_bytes_per_second",
        "bytes/s",
        "host network transmit rate",
        "system",
        "gauge",
        "iros_network_transmit_bytes_per_second",
    ),
    MetricDef(
        "active_connections",
        "connections",
        "requests being served (in flight)",
        "system",
        "gauge",
        "iros_requests_in_flight",
    ),
    MetricDef(
        "queue_length", "requests", "requests waiting for a slot", "system", "gauge", "iros_queue_length"
    ),
    MetricDef(
        "backend_queue_length",
        "requests",
        "requests waiting for one of a model deployment's connections (its max_connections)",
        "system",
        "gauge",
        "iros_backend_queue_length",
        1.0,
        ("deployment",),
    ),
    MetricDef(
        "event_loop_lag_ms",
        "ms",
        "how late the event loop runs a timer: a saturated process shows it first",
        "system",
        "gauge",
        "iros_event_loop_lag_seconds",
        1000.0,
    ),
    MetricDef(
        "budget_used_ratio",
        "ratio",
        "share of its budget a key has spent this period (auth.api_keys[].budget)",
        "core",
        "gauge",
        "iros_budget_used_ratio",
        1.0,
        ("key",),
    ),
    # Bottleneck analysis: each request's time per pipeline stage (spans.STAGES, plus `other` for
    # time between laps and `embedding`, `metering` measured beside the pipeline; see collector.py).
    MetricDef(
        "stage_ms",
        "ms",
        "time a request spent in one pipeline stage",
        "core",
        "response",
        "iros_stage_duration_seconds",
        1000.0,
        ("stage",),
    ),
)

METRICS: dict[str, MetricDef] = {d.name: d for d in _DEFS}

# Label values that are not configured model names are folded into this one, so label sets stay bounded.
OTHER = "other"
