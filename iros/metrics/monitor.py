"""Monitoring, assembled: the store, the Prometheus exposition, the collector, the sampler, the live hub.

monitor = Monitor(settings, admission, shared=shared)   # shared: every worker's live numbers
gateway.observers.append(monitor.collector.observe)
await monitor.start(); monitor.current(60); await monitor.close()
monitor.frames()                                       # the live window: every worker's frames
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iros.config import MetricsSettings, Settings
from iros.core.admission import Admission
from iros.metrics import kpi
from iros.metrics.cluster import ClusterFrames
from iros.metrics.collector import LIVE_WINDOW_SECONDS, Collector, Frame
from iros.metrics.exposition import Exposition
from iros.metrics.live import LiveHub
from iros.metrics.sampler import SystemSampler
from iros.metrics.store import MetricsStore
from iros.state.sync import SharedState


def build_store(settings: MetricsSettings, data_dir: Path) -> MetricsStore:
    storage = settings.storage
    if storage.backend == "prometheus":
        from iros.metrics.prometheus import PrometheusStore

        assert storage.endpoint is not None  # validated in config
        return PrometheusStore(storage.endpoint, timeout=storage.timeout_seconds)
    from iros.metrics.tsdb.db import SQLiteStore

    return SQLiteStore(
        Path(storage.path) if storage.path else data_dir / "metrics.db",
        flush_interval=storage.flush_interval_seconds,
        retention_days=settings.retention_days,
        raw_retention_hours=storage.raw_retention_hours,
        intervals=settings.aggregation_intervals,
    )


class Monitor:
    def __init__(
        self,
        settings: Settings,
        admission: Admission,
        store: MetricsStore | None = None,
        shared: SharedState | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = settings.metrics_collection
        self.data_dir = Path(settings.server.data_dir)
        self.store = store or build_store(self.metrics, self.data_dir)

        def load() -> tuple[int, int]:
            return admission.active, admission.queued

        self.load = load
        self.sampler = SystemSampler(self.data_dir, load)
        collector_groups = Collector.groups_for(self.metrics)
        self.exposition = Exposition(collector_groups)
        self.collector = Collector(
            self.metrics, settings.model_names(), self.store, self.exposition, self.sampler, load
        )
        self.accuracy: dict[str, float | None] = {}
        for m in settings.models:
            self.accuracy.setdefault(m.name, m.accuracy)
        self.cluster = ClusterFrames(self.collector, shared)
        self.hub = LiveHub(self.live_message)
        # KPIs read from other parts at evaluation time (app.py registers the cache's), by name.
        self.extra_kpis: dict[str, Callable[[], float | None]] = {}
        self.collector.on_tick(self.hub.publish)

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        await self.store.start()
        await self.collector.start()
        await self.cluster.start()

    async def close(self) -> None:
        await self.cluster.close()
        await self.collector.close()
        await self.store.close()

    @property
    def sections(self) -> list[str]:
        return [g for g in ("business", "user_journey", "model_performance") if g in self.collector.groups]

    def current(self, seconds: float = 60.0) -> dict[str, Any]:
        seconds = min(max(seconds, 1.0), LIVE_WINDOW_SECONDS)
        sketches = kpi.window(self.frames(), time.time() - seconds)
        accuracy = self.accuracy if self.collector.per_model else {"all": None}
        return kpi.compute(
            sketches,
            seconds,
            self.settings.performance_targets,
            self.sampler.latest,
            accuracy,
            self.sections,
        )

    def frames(self) -> list[Frame]:
        """The live window of every worker (this one alone without shared state)."""
        return self.cluster.frames()

    def live_message(self) -> dict[str, Any]:
        report = self.current(60.0)
        message = {
            "type": "metrics",
            "timestamp": report["timestamp"],
            "status": report["status"],
            "metrics": kpi.flatten(report),
            "kpis": report["kpis"],
            "system": report["system"],
        }
        if "models" in report:
            message["models"] = report["models"]
        return message
