"""System metrics: the host and the Iros process through psutil, GPUs through NVML when present.

sampler = SystemSampler(data_dir, load=lambda: (active, queued))
sample = sampler.sample()          # SystemMetrics; call every collection interval
sample.gpus                        # [] where no NVIDIA GPU or driver is present: reported as absent
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from iros.core.timefmt import iso

log = logging.getLogger("iros.metrics")


@dataclass(slots=True)
class GpuSample:
    index: int
    name: str
    utilization_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    temperature_c: float | None
    power_watts: float | None

    @property
    def memory_percent(self) -> float:
        return 100.0 * self.memory_used_bytes / self.memory_total_bytes if self.memory_total_bytes else 0.0


@dataclass(slots=True)
class SystemMetrics:
    """The seed's SystemMetrics, plus the process's own figures and per-GPU detail."""

    timestamp: datetime
    cpu_utilization: float
    memory_utilization: float
    gpu_utilization: float | None  # mean over GPUs; None where there is none
    disk_usage: float
    network_io: dict[str, float]  # bytes per second since the previous sample
    active_connections: int
    queue_length: int
    process_cpu_percent: float
    process_memory_bytes: int
    memory_total_bytes: int
    cpu_count: int
    gpus: list[GpuSample] = field(default_factory=list)
    gpu_status: str = "absent"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["timestamp"] = iso(self.timestamp.timestamp())
        for gpu, raw in zip(out["gpus"], self.gpus, strict=True):
            gpu["memory_percent"] = round(raw.memory_percent, 2)
        return out


class GpuProbe:
    """NVML through nvidia-ml-py. Without a driver or device it reports itself absent, once."""

    def __init__(self, nvml: Any = None) -> None:
        self.status = "absent"
        self.handles: list[Any] = []
        self.nvml: Any = None
        try:
            if nvml is None:
                import pynvml

                nvml = pynvml
            nvml.nvmlInit()
            self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            self.nvml = nvml
            self.status = "present" if self.handles else "absent"
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError...
            self.nvml = None
            self.status = "absent"
            log.info("no GPU metrics: NVML unavailable (%s)", exc.__class__.__name__)

    def sample(self) -> list[GpuSample]:
        nvml = self.nvml
        if nvml is None:
            return []
        out = []
        for i, handle in enumerate(self.handles):
            try:
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = nvml.nvmlDeviceGetName(handle)
                out.append(
                    GpuSample(
                        index=i,
                        name=name.decode() if isinstance(name, bytes) else str(name),
                        utilization_percent=float(util.gpu),
                        memory_used_bytes=int(mem.used),
                        memory_total_bytes=int(mem.total),
                        temperature_c=_optional(
                            nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU
                        ),
                        power_watts=_milli(_optional(nvml.nvmlDeviceGetPowerUsage, handle)),
                    )
                )
            except Exception as exc:
                # A GPU that falls off the bus is a fact to report, not a reason to stop sampling.
                log.warning("GPU %d: NVML query failed: %s", i, exc)
                self.status = "error"
        return out


def _optional(read: Callable[..., Any], *args: Any) -> float | None:
    # Temperature and power are not reported by every board; their absence is not an error.
    try:
        return float(read(*args))
    except Exception:
        return None


def _milli(value: float | None) -> float | None:
    return None if value is None else value / 1000


class SystemSampler:
    def __init__(
        self,
        data_dir: Path,
        load: Callable[[], tuple[int, int]],
        gpu: GpuProbe | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.load = load
        self.gpu = gpu if gpu is not None else GpuProbe()
        self.process = psutil.Process(os.getpid())
        # cpu_percent() measures since the previous call: prime both so the first sample is real.
        psutil.cpu_percent(None)
        self.process.cpu_percent(None)
        self._net = psutil.net_io_counters()
        self._net_at = time.monotonic()
        self.latest: SystemMetrics | None = None

    def sample(self) -> SystemMetrics:
        now = time.monotonic()
        net = psutil.net_io_counters()
        elapsed = max(now - self._net_at, 1e-6)
        rates = {
            "rx_bytes_per_second": (net.bytes_recv - self._net.bytes_recv) / elapsed,
            "tx_bytes_per_second": (net.bytes_sent - self._net.bytes_sent) / elapsed,
        }
        self._net, self._net_at = net, now
        memory = psutil.virtual_memory()
        gpus = self.gpu.sample()
        active, queued = self.load()
        self.latest = SystemMetrics(
            timestamp=datetime.now(UTC),
            cpu_utilization=psutil.cpu_percent(None),
            memory_utilization=memory.percent,
            gpu_utilization=sum(g.utilization_percent for g in gpus) / len(gpus) if gpus else None,
            disk_usage=psutil.disk_usage(str(self.data_dir)).percent,
            network_io=rates,
            active_connections=active,
            queue_length=queued,
            process_cpu_percent=self.process.cpu_percent(None),
            process_memory_bytes=self.process.memory_info().rss,
            memory_total_bytes=memory.total,
            cpu_count=psutil.cpu_count() or 1,
            gpus=gpus,
            gpu_status=self.gpu.status,
        )
        return self.latest

    def restart_cpu(self) -> None:
        """The next sample's process CPU covers only the time from now."""
        self.process.cpu_percent(None)

    def close(self) -> None:
        nvml = self.gpu.nvml
        if nvml is not None:
            with contextlib.suppress(Exception):
                nvml.nvmlShutdown()
