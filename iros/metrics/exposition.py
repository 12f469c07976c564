"""Prometheus exposition at /metrics: the catalog's series as prometheus_client instruments.

Response metrics are histograms (one observation per response), system metrics are gauges. Buckets
follow the OpenTelemetry GenAI semantic conventions (gen_ai.client.operation.duration,
gen_ai.server.time_to_first_token, gen_ai.server.time_per_output_token, gen_ai.client.token.usage),
with the seed dashboard's boundaries (0.5, 1, 2, 5, 10 s) added so its histogram reads exactly.

With several worker processes (PROMETHEUS_MULTIPROC_DIR set before start), prometheus_client keeps each
worker's values in shared files and /metrics merges them: counters and histograms add up, process
gauges sum over live workers, host gauges take the latest reading.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

from iros.metrics.catalog import METRICS, Group

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_DURATION: tuple[float, ...] = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.5, 0.64, 1.0, 1.28, 2.0, 2.56)
_DURATION += (5.0, 5.12, 10.0, 10.24, 20.48, 40.96, 81.92)
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_TPOT = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
_BYTES = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
_SCORE = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_PERCENT = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 7.0, 10.0, 25.0, 50.0, 100.0)
_COUNT = (0, 1, 2, 5, 10, 25)

BUCKETS: dict[str, tuple[float, ...]] = {
    "response_time_ms": _DURATION,
    "overhead_ms": _OVERHEAD,
    "cpu_per_response_percent": _PERCENT,
    "ttft_ms": _TTFT,
    "tpot_ms": _TPOT,
    "stream_max_gap_ms": _TTFT,
    "stream_stalls": _COUNT,
    "user_satisfaction": _SCORE,
    "relevance": _SCORE,
    "prompt_tokens": _TOKENS,
    "completion_tokens": _TOKENS,
    "content_length_bytes": _BYTES,
    "stage_ms": (*_OVERHEAD, 2.5, 5.0, 10.0, 30.0),
}

# Process-level gauges add up across workers; host-level ones are one reading of the same machine.
_PROCESS_GAUGES = frozenset(
    {"process_cpu_percent", "process_memory_bytes", "active_connections", "queue_length"}
    | {"cpu_usage_percent"}  # each worker's share of the machine: together, the gateway's
    | {"backend_queue_length"}  # each worker has its own deployment queues
)


class Exposition:
    def __init__(self, groups: Iterable[Group]) -> None:
        # *_created series double what Prometheus stores and nothing here reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV)
        self.registry = CollectorRegistry(auto_describe=True)
        enabled = set(groups)
        self.histograms: dict[str, Histogram] = {}
        self.gauges: dict[str, Gauge] = {}
        for d in METRICS.values():
            if d.group not in enabled:
                continue
            if d.kind == "response":
                self.histograms[d.name] = Histogram(
                    d.prom.removesuffix("_total"),
                    f"{d.description} ({_base_unit(d.prom)})",
                    d.labels,
                    registry=self.registry,
                    buckets=BUCKETS[d.name],
                )
            else:
                self.gauges[d.name] = Gauge(
                    d.prom,
                    f"{d.description} ({_base_unit(d.prom)})",
                    d.labels,
                    registry=self.registry,
                    multiprocess_mode="livesum" if d.name in _PROCESS_GAUGES else "mostrecent",
                )
        self.requests = Counter(
            "iros_requests",
            "responses by model, HTTP status and cache result",
            ("model", "code", "cache"),
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "iros_cache_hits", "responses served from the cache", ("model", "kind"), registry=self.registry
        )
        self.cache_misses = Counter(
            "iros_cache_misses", "cache lookups that went to the model", ("model",), registry=self.registry
        )
        self.cache_skipped = Counter(
            "iros_cache_skipped_lookups",
            "semantic lookups skipped because the embedder was behind (served as misses)",
            registry=self.registry,
        )
        # usage: "reported" by the model server, or "counted" by Iros where it reported none (llama.cpp).
        self.tokens = Counter(
            "iros_tokens",
            "tokens by model, direction and where the count comes from",
            ("model", "type", "usage"),
            registry=self.registry,
        )
        # Money, by model and API key name (configured keys only: bounded). saved: what answers served
        # without a model call (cache hits, shared calls) would have cost.
        self.cost = Counter(
            "iros_cost_usd", "what answers cost, in US dollars", ("model", "key"), registry=self.registry
        )
        self.cost_saved = Counter(
            "iros_cost_saved_usd",
            "what answers from the cache (or a shared call) would have cost, in US dollars",
            ("model", "key"),
            registry=self.registry,
        )
        self.feedback = Counter(
            "iros_feedback", "feedback scores received", ("model",), registry=self.registry
        )
        self.dropped = Counter(
            "iros_metrics_dropped_records",
            "request records dropped because the collector fell behind",
            registry=self.registry,
        )
        if not self.multiprocess_dir:
            ProcessCollector(registry=self.registry)
        self._children: dict[tuple[str, tuple[str, ...]], MetricWrapperBase] = {}

    def child(self, metric: MetricWrapperBase, labels: tuple[str, ...]) -> MetricWrapperBase:
        # labels() takes a lock and builds a tuple each call; the collector observes thousands a second.
        key = (metric._name, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels) if labels else metric
        return found

    def render(self) -> tuple[bytes, str]:
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def observe_many(child: MetricWrapperBase, values: npt.NDArray[np.float64]) -> None:
    """Histogram.observe for a whole batch: one bucket count and one sum update per tick.

    Reaches into the child's `_upper_bounds`, `_buckets` (per-bucket, not cumulative) and `_sum`, which
    observe() itself uses; prometheus_client is pinned, and a test reads the exposition back.
    """
    if values.size == 0:
        return
    bounds = child._upper_bounds  # type: ignore[attr-defined]
    index = np.searchsorted(np.asarray(bounds), values, side="left")
    counts = np.bincount(index, minlength=len(bounds))
    buckets = child._buckets  # type: ignore[attr-defined]
    for i in np.flatnonzero(counts):
        buckets[i].inc(float(counts[i]))
    child._sum.inc(float(values.sum()))  # type: ignore[attr-defined]


def reset_multiprocess_dir(data_dir: Path) -> Path:
    """An empty directory for the workers' shared metric files."""
    path = data_dir / "prometheus-multiproc"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def mark_worker_gone() -> None:
    """Drop this worker's live gauges from the merged view when it exits."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def _base_unit(prom: str) -> str:
    for suffix, unit in (("_seconds", "seconds"), ("_bytes", "bytes"), ("_percent", "percent")):
        if prom.endswith(suffix) or suffix + "_" in prom:
            return unit
    return "1"
