"""`iros bench alerts`: what one alert evaluation costs the event loop.

result = run_alert_bench(models=10, seconds=60, evaluations=30)   # JSON-ready dict

A live window like a busy Iros's (per-second frames of every response series of `models` models), the
seed's and the issue's rule shapes plus the target rules, evaluated repeatedly by the real engine over
a real SQLite alert store; the figure is the CPU time of the evaluating thread (the event loop's), so
it does not depend on what else the machine is doing.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from iros.alerting.engine import AlertEngine
from iros.alerting.store import AlertStore
from iros.conditions.parse import LiveSource
from iros.config import AlertingSettings, load_settings
from iros.metrics.collector import Frame
from iros.metrics.sketch import Sketch
from iros.metrics.store import SeriesKey

RULES = (
    "response_time_avg > 3000",
    "response_time_p95 > 5000",
    "cpu_usage > 8.0",
    "cache_hit_rate < 0.5",
    "avg(response_time, 1m) > 3000",
    "p99(ttft, 1m) > 800",
    "rate(errors, 1m) > 0.1",
    "response_time_avg > 3000 and cache_hit_rate < 0.3",
)


def frames_like(models: int, seconds: int, per_second: int, now: float) -> list[Frame]:
    rng = np.random.default_rng(7)
    out = []
    for s in range(seconds):
        series: dict[SeriesKey, Sketch] = {}
        for m in range(models):
            model = ("model", f"m{m}")
            for cache in ("miss", "exact_hit", "semantic_hit"):
                for outcome in ("ok", "server_error"):
                    key = ("response_time_ms", (("cache", cache), model, ("outcome", outcome)))
                    series[key] = Sketch.of(rng.lognormal(5, 1, per_second))
            for name in ("overhead_ms", "cpu_per_response_percent", "ttft_ms", "tpot_ms", "prompt_tokens"):
                series[(name, (model,))] = Sketch.of(rng.lognormal(2, 1, per_second))
        series[("cpu_usage_percent", ())] = Sketch.of(rng.uniform(0, 10, 1))  # a gauge: one sample
        out.append(Frame(now - seconds + s + 1, series))
    return out


async def _run(
    models: int, seconds: int, evaluations: int, progress: Callable[[int], None]
) -> dict[str, Any]:
    now = time.time()
    frames = frames_like(models, seconds, 20, now)
    settings = load_settings(None)
    alerting = AlertingSettings.model_validate(
        {
            "alert_rules": [
                {"name": f"rule_{i}", "condition": c, "duration": "1m"} for i, c in enumerate(RULES)
            ]
        }
    )
    with tempfile.TemporaryDirectory(prefix="iros-alert-bench-") as tmp:
        source = LiveSource(lambda: frames, kpi_window=60)
        store = AlertStore(Path(tmp) / "alerts.db")
        engine = AlertEngine(alerting, dict(settings.performance_targets), source, store, {})
        await engine.start(background=False)
        cpu, wall = [], []
        try:
            for i in range(evaluations):
                t_cpu, t_wall = time.thread_time(), time.perf_counter()
                await engine.evaluate(now + i * 1e-3)
                cpu.append((time.thread_time() - t_cpu) * 1000)
                wall.append((time.perf_counter() - t_wall) * 1000)
                progress(1)
        finally:
            await engine.close()
    return {
        "rules": len(engine.rules),
        "series_per_second": len(frames[0].series),
        "window_seconds": seconds,
        "evaluations": evaluations,
        "event_loop_cpu_ms": {
            "median": round(statistics.median(cpu), 3),
            "p95": round(sorted(cpu)[int(0.95 * (len(cpu) - 1))], 3),
            "max": round(max(cpu), 3),
        },
        "wall_ms_median": round(statistics.median(wall), 3),
        "per_rule_cpu_ms_median": round(statistics.median(cpu) / len(engine.rules), 3),
    }


def run_alert_bench(
    models: int = 10,
    seconds: int = 60,
    evaluations: int = 30,
    progress: Callable[[int], None] = lambda n: None,
) -> dict[str, Any]:
    if models < 1 or not 1 <= seconds <= 300 or evaluations < 1:
        raise ValueError("models and evaluations must be 1 or more, seconds 1 to 300")
    return asyncio.run(_run(models, seconds, evaluations, progress))
