"""System metrics and KPI health: psutil on this machine, NVML through a stand-in for the GPU driver
(no GPU here), and the target levels that decide healthy / degraded / critical."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from iros.config import Target
from iros.metrics.kpi import assess, level
from iros.metrics.sampler import GpuProbe, SystemSampler


class FakeNvml:
    """The NVML calls Iros makes, answering like a driver with two GPUs (the one part off this machine)."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, fail_init: bool = False) -> None:
        self.fail_init = fail_init
        self.shut = False

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=[35, 85][h], memory=10)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(used=[4, 60][h] * 2**30, total=80 * 2**30)

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA H100"

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return 51

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        if h == 1:
            raise RuntimeError("Not Supported")
        return 250_000


def test_gpus_are_sampled_through_nvml(tmp_path: Path) -> None:
    nvml = FakeNvml()
    sampler = SystemSampler(tmp_path, lambda: (3, 1), GpuProbe(nvml))
    sample = sampler.sample()
    assert sample.gpu_status == "present"
    assert [g.utilization_percent for g in sample.gpus] == [35.0, 85.0]
    assert sample.gpu_utilization == 60.0
    assert sample.gpus[1].memory_percent == pytest.approx(75.0)
    assert sample.gpus[0].power_watts == 250.0 and sample.gpus[1].power_watts is None
    assert sample.to_json()["gpus"][0]["name"] == "NVIDIA H100"
    sampler.close()
    assert nvml.shut


def test_no_driver_means_gpus_reported_absent(tmp_path: Path) -> None:
    sample = SystemSampler(tmp_path, lambda: (0, 0), GpuProbe(FakeNvml(fail_init=True))).sample()
    assert sample.gpu_status == "absent" and sample.gpus == [] and sample.gpu_utilization is None


def test_host_and_process_figures_are_real(tmp_path: Path) -> None:
    sampler = SystemSampler(tmp_path, lambda: (7, 2))
    sample = sampler.sample()
    assert 0 < sample.memory_utilization < 100
    assert 0 <= sample.disk_usage <= 100
    assert sample.process_memory_bytes > 1_000_000
    assert (sample.active_connections, sample.queue_length) == (7, 2)
    assert sample.cpu_count >= 1


SEED = {
    "response_time_ms": Target(target=2000, warning_threshold=3000, critical_threshold=5000),
    "cache_hit_rate": Target(target=0.70, warning_threshold=0.50, critical_threshold=0.30),
}


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("response_time_ms", 1500, "ok"),
        ("response_time_ms", 3000, "warning"),
        ("response_time_ms", 6000, "critical"),
        # Lower is worse for a hit rate: the thresholds' order says so.
        ("cache_hit_rate", 0.8, "ok"),
        ("cache_hit_rate", 0.45, "warning"),
        ("cache_hit_rate", 0.1, "critical"),
        ("cache_hit_rate", None, None),
    ],
)
def test_levels_follow_the_direction_of_the_thresholds(name: str, value: float | None, expected: str) -> None:
    assert level(value, SEED[name]) == expected


def test_health_is_the_worst_level_and_ignores_kpis_without_data() -> None:
    status, kpis = assess({"response_time_avg": 2500, "cache_hit_rate": None}, SEED)
    assert status == "healthy"  # 2500 ms misses the target but is under the warning line
    assert kpis["response_time_ms"]["meets_target"] is False
    assert kpis["cache_hit_rate"]["level"] == "no_data"
    assert assess({"response_time_avg": 3500, "cache_hit_rate": 0.2}, SEED)[0] == "critical"
    assert assess({"response_time_avg": 3500, "cache_hit_rate": 0.9}, SEED)[0] == "degraded"
