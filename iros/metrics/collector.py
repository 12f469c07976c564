"""The metrics collector: request records in, samples out to Prometheus, the store and the live window.

The gateway's observer only appends the finished RequestRecord to a bounded deque. Everything else
happens off the request path, every INGEST_SECONDS, in slices: records become ResponseMetrics,
samples per series, histogram observations, one Sketch per series for the live window, and a batch
for the time-series store. System metrics are sampled every collection_interval_seconds.
(ResponseMetrics and its labels: response.py; the relevance score: relevance.py.)

collector = Collector(settings, models, store, exposition, sampler)
gateway.observers.append(collector.observe)
await collector.start(); ...; await collector.close()
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from iros.config import MetricsSettings
from iros.core.periodic import cancel_all, every
from iros.core.record import RequestRecord
from iros.core.spans import STAGES
from iros.metrics.catalog import METRICS, OTHER, Group
from iros.metrics.exposition import Exposition, observe_many
from iros.metrics.relevance import relevance
from iros.metrics.response import OUTCOMES, ResponseMetrics, code_label, outcome_of, response_metrics
from iros.metrics.sampler import SystemMetrics, SystemSampler
from iros.metrics.sketch import Sketch
from iros.metrics.store import MetricsStore, Samples, SeriesKey

log = logging.getLogger("iros.metrics")

MAX_PENDING = 200_000  # records waiting to be taken in; beyond it the oldest are dropped and counted
LIVE_WINDOW_SECONDS = 300  # how far back /api/metrics/current can look without the store
RECENT_IDS = 100_000  # request ids remembered for feedback
RECENT_PER_TICK = 10  # ResponseMetrics kept per slice, for /api/metrics/current
INGEST_SECONDS = 0.2  # how often pending records are taken in
INGEST_SLICE = 1000  # records taken in between two yields to the event loop (a few ms of work)
# stage_ms labels: the pipeline's laps, `other` (time between laps: stream headers, error replies),
# and stages timed beside the pipeline: `embedding` (inside cache) and `metering` (this ingest, amortised).
PIPELINE_STAGES = (*STAGES, "retry")
SIDE_STAGES = frozenset({"embedding", "metering"})

Floats = npt.NDArray[np.float64]


@dataclass(slots=True)
class Frame:
    """One second's samples, kept in memory for the live window: a Sketch per series."""

    at: float
    series: dict[SeriesKey, Sketch]


_PER_MODEL = (
    "overhead_ms",
    "cpu_per_response_percent",
    "prompt_tokens",
    "completion_tokens",
    "content_length_bytes",
    "ttft_ms",
    "stream_max_gap_ms",
    "stream_stalls",
    "relevance",
    "tpot_ms",
)
_TOKEN_SERIES = frozenset({"prompt_tokens", "completion_tokens"})  # labelled by usage source too


class Collector:
    def __init__(
        self,
        settings: MetricsSettings,
        models: Iterable[str],
        store: MetricsStore,
        exposition: Exposition,
        sampler: SystemSampler,
        load: Callable[[], tuple[int, int]],
    ) -> None:
        self.settings = settings
        self.models = frozenset(models)
        self.store = store
        self.exposition = exposition
        self.sampler = sampler
        self.load = load
        self.groups = self.groups_for(settings)
        self.per_model = settings.custom_metrics.model_performance_metrics
        # Per-model series of answered responses that the enabled groups record.
        self._series = [name for name in _PER_MODEL if METRICS[name].group in self.groups]
        self._pending: deque[RequestRecord] = deque(maxlen=MAX_PENDING)
        self._batch: dict[SeriesKey, tuple[list[Floats], list[Floats]]] = {}  # per series: ts, values
        self.frames: deque[Frame] = deque()
        self.recent: deque[ResponseMetrics] = deque(maxlen=1000)
        # request id -> (the model that answered, the key that asked), oldest first
        self._ids: dict[str, tuple[str, str]] = {}
        self._model_of: dict[str, str] = {}
        self._feedback_seen: set[str] = set()
        self.dropped = 0
        self.responses = 0
        self.started_at = time.time()
        self._cpu_at = time.thread_time()
        self._cpu_counted = False  # the CPU KPI's samples start once start-up work is over (started())
        self._loop_lag = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._listeners: list[Callable[[], None]] = []
        self._side: deque[tuple[str, float, float]] = deque(maxlen=MAX_PENDING)

    @staticmethod
    def groups_for(settings: MetricsSettings) -> set[Group]:
        """The catalog groups the seed's custom_metrics flags switch on."""
        flags = settings.custom_metrics
        groups: set[Group] = {"core", "system"}
        if flags.business_metrics:
            groups.add("business")
        if flags.user_journey_metrics:
            groups.add("user_journey")
        if flags.model_performance_metrics:
            groups.add("model_performance")
        return groups

    # The request path: one append.
    def observe(self, record: RequestRecord) -> None:
        pending = self._pending
        if len(pending) == MAX_PENDING:
            self.dropped += 1
        pending.append(record)

    def note_stage(self, stage: str, ms: float) -> None:
        """A stage timed beside the pipeline (an embedding call); taken in with the next ingest."""
        if stage in SIDE_STAGES:
            self._side.append((stage, time.time(), ms))

    def gauge(self, name: str, labels: tuple[tuple[str, str], ...], value: float) -> None:
        """A reading of a catalog gauge taken outside the sampler (a key's budget share): to /metrics,
        the live window (so conditions read it) and the store."""
        self._add(name, labels, time.time(), value)
        found = self.exposition.gauges.get(name)
        if found is not None:
            self.exposition.child(found, tuple(v for _, v in labels)).set(value / METRICS[name].scale)  # type: ignore[attr-defined]

    def on_tick(self, listener: Callable[[], None]) -> None:
        """Call `listener` every live_interval_seconds (the live hub publishes then)."""
        self._listeners.append(listener)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(every(INGEST_SECONDS, self.ingest, log, "metrics")),
            asyncio.create_task(every(self.settings.live_interval_seconds, self.publish, log, "metrics")),
            asyncio.create_task(
                every(self.settings.collection_interval_seconds, self.sample_system, log, "metrics")
            ),
            asyncio.create_task(self._watch_loop_lag()),
        ]
        await self.sample_system()

    def started(self) -> None:
        """Start-up work (loading the embedding model) is over: the CPU KPI counts from now on.

        Loading takes a core for seconds; counted, a fresh gateway would read critical for a minute."""
        self.sampler.restart_cpu()
        self._cpu_counted = True

    async def close(self) -> None:
        await cancel_all(self._tasks)
        await self.tick()
        self.sampler.close()

    async def _watch_loop_lag(self) -> None:
        # A timer that fires late measures how saturated the event loop is.
        interval = 0.1
        while True:
            before = time.perf_counter()
            await asyncio.sleep(interval)
            self._loop_lag = max(self._loop_lag, time.perf_counter() - before - interval)

    # --- the tick -------------------------------------------------------------------------------
    async def tick(self) -> None:
        """Take in what is pending, then tell the listeners (tests and shutdown call this directly)."""
        await self.ingest()
        self.publish()

    def publish(self) -> None:
        for listener in self._listeners:
            listener()

    async def ingest(self) -> None:
        records = self._pending
        self._pending = deque(maxlen=MAX_PENDING)
        now = time.time()
        # CPU of the event loop's thread (the gateway's work, not the store's writer thread) since the
        # last ingest, shared among the responses that ended by the Iros time each spent, and never
        # more than that time: an idle second's timers are not charged to the one request in it.
        cpu = time.thread_time()
        spent_ms = (cpu - self._cpu_at) * 1000
        self._cpu_at = cpu
        if self.dropped:
            self.exposition.dropped.inc(self.dropped)
            self.dropped = 0
        if records:
            rows = list(records)
            metering = 0.0
            total_overhead = sum(r.spans.overhead_ns() for r in rows) / 1e6 or 1.0
            # Often and in slices, yielding between them: a busy second's records in one go would hold
            # the event loop for milliseconds that every request in flight would wait out.
            for i in range(0, len(rows), INGEST_SLICE):
                if i:
                    await asyncio.sleep(0)
                began = time.perf_counter()
                self._ingest(rows[i : i + INGEST_SLICE], spent_ms / total_overhead)
                metering += time.perf_counter() - began
            self.note_stage("metering", metering * 1000 / len(rows))
        if self._side:
            side, self._side = self._side, deque(maxlen=MAX_PENDING)
            for stage in SIDE_STAGES:
                taken = [(at, ms) for name, at, ms in side if name == stage]
                if taken:
                    at, ms = np.array(taken).T
                    self._extend("stage_ms", (("stage", stage),), at, ms, (stage,))
        self.responses += len(records)
        parts, self._batch = self._batch, {}
        if parts:
            batch = {key: Samples(_joined(ts), _joined(values)) for key, (ts, values) in parts.items()}
            sketches = {key: Sketch.of(s.values) for key, s in batch.items()}
            last = self.frames[-1] if self.frames else None
            if last is not None and int(last.at) == int(now):
                for key, sketch in sketches.items():
                    last.series.setdefault(key, Sketch()).merge(sketch)
            else:
                self.frames.append(Frame(now, sketches))
            self.store.append(batch)
        while self.frames and self.frames[0].at < now - LIVE_WINDOW_SECONDS:
            self.frames.popleft()

    def _model_label(self, record: RequestRecord) -> str:
        if not self.per_model:
            return "all"
        if record.deployment:
            model = self._model_of.get(record.deployment)
            if model is None:
                model = self._model_of[record.deployment] = record.deployment.rsplit("#", 1)[0]
            return model
        return record.model if record.model in self.models else OTHER

    def _add(self, name: str, labels: tuple[tuple[str, str], ...], ts: float, value: float) -> None:
        self._extend(name, labels, np.array([ts]), np.array([value]), tuple(v for _, v in labels))

    def _extend(
        self,
        name: str,
        labels: tuple[tuple[str, str], ...],
        ts: Floats,
        values: Floats,
        prom_labels: tuple[str, ...],
    ) -> None:
        key = (name, labels)
        parts = self._batch.get(key)
        if parts is None:
            parts = self._batch[key] = ([], [])
        parts[0].append(ts)
        parts[1].append(values)
        histogram = self.exposition.histograms.get(name)
        if histogram is not None:
            observe_many(self.exposition.child(histogram, prom_labels), values / METRICS[name].scale)

    def _ingest(self, records: list[RequestRecord], cpu_per_ms: float) -> None:
        """Records to series as columns: a few numpy operations per series per slice, not per record."""
        n = len(records)
        expo = self.exposition
        # One pass over the records into one array; everything after is numpy on its columns.
        table = np.array(
            [
                (
                    r.spans.start,
                    r.spans.end,
                    r.spans.overhead_ns(),
                    r.started_at,
                    r.usage.get("prompt_tokens", 0),
                    r.usage.get("completion_tokens", 0),
                    r.body_bytes,
                    r.first_chunk_ns,
                    r.last_chunk_ns,
                    r.max_gap_ns,
                    r.stalls,
                    r.chunks,
                    r.usage_counted,
                )
                for r in records
            ],
            dtype=np.float64,
        ).T
        total_ms = (table[1] - table[0]) / 1e6
        overhead = table[2] / 1e6
        ts = table[3] + total_ms / 1000
        # The loop thread's CPU, shared by the Iros time each response spent and capped at it.
        cpu_ms = np.minimum(overhead * cpu_per_ms, overhead)
        models = [self._model_label(r) for r in records]
        caches = [r.cache for r in records]
        statuses = [r.status for r in records]
        outcomes = [OUTCOMES.get(code) or outcome_of(code) for code in statuses]
        owners = zip(models, [r.principal for r in records], strict=True)
        self._ids.update(zip([r.request_id for r in records], owners, strict=True))
        self._forget()
        for labels, count in Counter(zip(models, map(code_label, statuses), caches, strict=True)).items():
            expo.child(expo.requests, labels).inc(count)  # type: ignore[attr-defined]
        self._money(records, models)
        system = self.sampler.latest
        self.recent.extend(
            response_metrics(records[i], models[i], float(cpu_ms[i]), float(overhead[i]), system)
            for i in range(max(0, n - RECENT_PER_TICK), n)
        )

        columns = self._columns(records, table, total_ms)
        columns["overhead_ms"] = overhead
        columns["cpu_per_response_percent"] = 100 * cpu_ms / np.maximum(total_ms, 1e-9)
        keys: dict[tuple[str, str, str], int] = {}
        group = np.array([keys.setdefault(k, len(keys)) for k in zip(models, caches, outcomes, strict=True)])
        answered: dict[str, list[npt.NDArray[np.int64]]] = {}
        for (model, cache, outcome), g in keys.items():
            idx = np.flatnonzero(group == g)
            if cache.endswith("hit"):
                kind = cache.removesuffix("hit").rstrip("_") or "exact"
                expo.child(expo.cache_hits, (model, kind)).inc(idx.size)  # type: ignore[attr-defined]
            elif cache == "miss":
                expo.child(expo.cache_misses, (model,)).inc(idx.size)  # type: ignore[attr-defined]
            if outcome == "cancelled":
                continue  # the client left: neither a response time nor an error of ours
            series = (("cache", cache), ("model", model), ("outcome", outcome))
            self._extend("response_time_ms", series, ts[idx], total_ms[idx], (model, cache, outcome))
            if outcome == "ok":
                answered.setdefault(model, []).append(idx)
        self._stages(records, ts, total_ms, np.array([o != "cancelled" for o in outcomes]))
        counted = table[12] > 0
        for model, parts in answered.items():
            idx = np.concatenate(parts)
            for name in self._series:
                if name in _TOKEN_SERIES:
                    continue
                values = columns[name][idx]
                present = ~np.isnan(values)
                if present.any():
                    self._extend(name, (("model", model),), ts[idx][present], values[present], (model,))
            if "business" not in self.groups:
                continue
            # Token counts say where they come from: the model server's usage, or Iros's count of it.
            for usage, which in (("reported", idx[~counted[idx]]), ("counted", idx[counted[idx]])):
                if not which.size:
                    continue
                by_usage = (("model", model), ("usage", usage))
                for kind, name in (("input", "prompt_tokens"), ("output", "completion_tokens")):
                    self._extend(name, by_usage, ts[which], columns[name][which], (model, usage))
                    tokens = int(columns[name][which].sum())
                    if tokens:
                        expo.child(expo.tokens, (model, kind, usage)).inc(tokens)  # type: ignore[attr-defined]

    def _money(self, records: list[RequestRecord], models: list[str]) -> None:
        """iros_cost_usd_total and iros_cost_saved_usd_total by model and key (a configured key's name)."""
        spent: dict[tuple[str, str], float] = {}
        saved: dict[tuple[str, str], float] = {}
        for record, model in zip(records, models, strict=True):
            if record.cost_usd:
                key = (model, record.principal)
                spent[key] = spent.get(key, 0.0) + record.cost_usd
            if record.saved_usd:
                key = (model, record.principal)
                saved[key] = saved.get(key, 0.0) + record.saved_usd
        expo = self.exposition
        for counter, sums in ((expo.cost, spent), (expo.cost_saved, saved)):
            for labels, usd in sums.items():
                expo.child(counter, labels).inc(usd)  # type: ignore[attr-defined]

    def _stages(
        self, records: list[RequestRecord], ts: Floats, total_ms: Floats, keep: npt.NDArray[np.bool_]
    ) -> None:
        """stage_ms per pipeline stage; `other` is the time no lap claimed: stages sum to the total."""
        idx = np.flatnonzero(keep)
        if not idx.size:
            return
        spans = [records[i].spans.durations for i in idx]
        ts, total = ts[idx], total_ms[idx]
        accounted = np.zeros(idx.size)
        for stage in PIPELINE_STAGES:
            ns = np.fromiter((d.get(stage, -1) for d in spans), np.float64, idx.size)
            present = ns >= 0
            if present.any():
                ms = ns[present] / 1e6
                accounted[present] += ms
                self._extend("stage_ms", (("stage", stage),), ts[present], ms, (stage,))
        self._extend("stage_ms", (("stage", "other"),), ts, np.maximum(total - accounted, 0.0), ("other",))

    def _columns(self, records: list[RequestRecord], table: Floats, total_ms: Floats) -> dict[str, Floats]:
        """Per-response values by series name; NaN where a response has none (TTFT of a non-stream)."""
        start, prompt, completion, size, first, last, gap, stalls, chunks = table[[0, *range(4, 12)]]
        streamed = first > 0
        tokens = np.where(completion > 0, completion, chunks)
        with np.errstate(divide="ignore", invalid="ignore"):
            out: dict[str, Floats] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "content_length_bytes": size,
                "ttft_ms": np.where(streamed, (first - start) / 1e6, np.nan),
                "stream_max_gap_ms": np.where(streamed, gap / 1e6, np.nan),
                "stream_stalls": np.where(streamed, stalls, np.nan),
                "tpot_ms": np.where(streamed & (tokens > 1), (last - first) / 1e6 / (tokens - 1), np.nan),
                "relevance": np.full(len(records), np.nan),
            }
        for i, r in enumerate(records):
            if r.sampled and 200 <= r.status < 300:
                score = relevance(r)
                if score is not None:
                    out["relevance"][i] = score
        return out

    def _forget(self) -> None:
        # Oldest first: a dict keeps insertion order, and trimming in bulk keeps each insert cheap.
        excess = len(self._ids) - RECENT_IDS
        if excess > 0:
            for old in list(itertools.islice(self._ids, excess)):
                del self._ids[old]
                self._feedback_seen.discard(old)

    # --- feedback -------------------------------------------------------------------------------
    def feedback(self, request_id: str, score: float, principal: str | None = None) -> str:
        """Record a user's score for a response; returns the model that answered it. With `principal`
        (a key's name), only a response to that key counts; None (an admin) may score any.

        Raises KeyError for a request id this process has not seen (or no longer remembers), or one
        another key made, and ValueError for a second score on the same response.
        """
        if "user_journey" not in self.groups:
            raise PermissionError("user journey metrics are off (metrics_collection.custom_metrics)")
        model, owner = self._ids[request_id]
        if principal is not None and principal != owner:
            raise KeyError(request_id)  # the same answer as an unknown id: nothing about others' requests
        if request_id in self._feedback_seen:
            raise ValueError(f"request {request_id} already has feedback")
        self._feedback_seen.add(request_id)
        for m in self.recent:
            if m.request_id == request_id:
                m.user_satisfaction = score
        self._add("user_satisfaction", (("model", model),), time.time(), score)
        self.exposition.child(self.exposition.feedback, (model,)).inc()  # type: ignore[attr-defined]
        return model

    # --- system ---------------------------------------------------------------------------------
    async def sample_system(self) -> SystemMetrics:
        sample = await asyncio.to_thread(self.sampler.sample)
        lag, self._loop_lag = self._loop_lag, 0.0
        ts = sample.timestamp.timestamp()
        values: dict[str, float] = {
            "cpu_percent": sample.cpu_utilization,
            # The CPU KPI: the whole process (event loop, store writer, embedder threads) as a share of
            # every core, so an idle gateway reads near 0 however CPU-bound its few responses were.
            "cpu_usage_percent": sample.process_cpu_percent / sample.cpu_count,
            "memory_percent": sample.memory_utilization,
            "process_cpu_percent": sample.process_cpu_percent,
            "process_memory_bytes": float(sample.process_memory_bytes),
            "disk_usage_percent": sample.disk_usage,
            "network_rx_bytes_per_second": sample.network_io["rx_bytes_per_second"],
            "network_tx_bytes_per_second": sample.network_io["tx_bytes_per_second"],
            "active_connections": float(sample.active_connections),
            "queue_length": float(sample.queue_length),
            "event_loop_lag_ms": lag * 1000,
        }
        if not self._cpu_counted:
            del values["cpu_usage_percent"]
        gauges = self.exposition.gauges
        for name, value in values.items():
            self._add(name, (), ts, value)
            gauges[name].set(value / METRICS[name].scale)
        for gpu in sample.gpus:
            label = (("gpu", str(gpu.index)),)
            for name, value in (
                ("gpu_utilization_percent", gpu.utilization_percent),
                ("gpu_memory_percent", gpu.memory_percent),
            ):
                self._add(name, label, ts, value)
                gauges[name].labels(str(gpu.index)).set(value)
        return sample

    def refresh_load(self) -> None:
        """In-flight and queued requests change every instant: /metrics reads them when scraped."""
        active, queued = self.load()
        self.exposition.gauges["active_connections"].set(active)
        self.exposition.gauges["queue_length"].set(queued)


def _joined(parts: list[Floats]) -> Floats:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
