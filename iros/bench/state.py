"""`iros bench state`: how long a live setting takes to reach every worker of every replica.

result = run_state(changes=40)     # a JSON-able dict: propagation P50/P99/max in ms

A redis-server and two replicas of two workers each (state.backend redis) start here. Settings are
changed through PUT /api/optimization/settings, alternating between the replicas; every worker keeps how
long each change took from its publish to its apply (GET /api/state, propagation_ms), measured on the
clock of this one host. Each change is applied by the three workers that did not make it.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from typing import Any

import httpx
import numpy as np

from iros.bench.processes import BenchError
from iros.testing.iros import IrosProcess, wait_until
from iros.testing.redis import RedisServer

ADMIN_KEY = "sk-bench-state-admin"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def run_state(
    changes: int = 40, replicas: int = 2, workers: int = 2, spacing: float = 0.25
) -> dict[str, Any]:
    if changes < 1 or replicas < 1 or workers < 1:
        raise BenchError("--changes, --replicas and --workers must be 1 or more")
    with RedisServer() as redis:
        procs: list[IrosProcess] = []
        try:
            for _ in range(replicas):
                config = {
                    "server": {"data_dir": tempfile.mkdtemp(prefix="iros-bench-state-")},
                    "auth": {"admin_keys": [ADMIN_KEY]},
                    "models": [{"name": "local", "backend": "simulated", "profile": "instant"}],
                    "cache": {"enabled": True, "semantic": False},
                    "state": {"backend": "redis", "url": redis.url},
                }
                procs.append(IrosProcess.serve(config, extra=["--workers", str(workers)]).start(60))
            _collect(procs, replicas * workers)  # every worker up before the first change
            for i in range(changes):
                proc = procs[i % replicas]
                value = round(0.5 + 0.001 * (i + 1), 4)
                body = {"cache.similarity_threshold": value}
                answer = httpx.put(
                    f"{proc.url}/api/optimization/settings", json=body, headers=ADMIN, timeout=10
                )
                if answer.status_code != 200:
                    raise BenchError(
                        f"PUT /api/optimization/settings answered {answer.status_code}: {answer.text}"
                    )
                time.sleep(spacing)
            time.sleep(1.0)
            delays = _collect(procs, replicas * workers)
        finally:
            for proc in procs:
                proc.stop()
    ms = np.array(delays, dtype=np.float64)
    expected = changes * (replicas * workers - 1)
    return {
        "benchmark": "state",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "replicas": replicas,
        "workers_per_replica": workers,
        "changes": changes,
        "applies": int(ms.size),
        "applies_expected": expected,
        "propagation_ms": {
            "p50": _percentile(ms, 50),
            "p99": _percentile(ms, 99),
            "max": _percentile(ms, 100),
        },
    }


def _collect(procs: list[IrosProcess], total: int) -> list[float]:
    """Every worker's delays: asked over fresh connections until each worker has answered once."""
    seen: dict[str, list[float]] = {}

    def everyone() -> bool:
        for proc in procs:
            state = httpx.get(f"{proc.url}/api/state", headers=ADMIN, timeout=10).json()
            seen[state["worker"]] = state["state"]["propagation_ms"]
        return len(seen) >= total

    wait_until(everyone, "every worker to answer", timeout=30, interval=0.01)
    return [d for delays in seen.values() for d in delays]


def _percentile(ms: Any, q: float) -> float | None:
    return round(float(np.percentile(ms, q)), 2) if ms.size else None
