"""`iros bench soak`: steady load through the whole pipeline for a long time; does anything creep?

An `iros mock-upstream` (the simulated lightweight model: real TTFT and token rate, streaming) sits
behind an `iros serve` with the cache (exact and semantic), metrics and alerting on. A fixed request
rate of repeated, paraphrase-free and one-off questions, half of them streamed, runs for `duration`
seconds; every `interval` the server's resident memory and the window's latency percentiles and errors
are recorded. After the warm-up, memory may not grow by more than 10%, no request may fail, and P99 may
not drift:

    report = run_soak(duration=600, rate=40)    # JSON-able; `targets` and `met` say how it went
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import psutil
import yaml

from iros.bench.processes import BenchError, bench_workdir, sigterm_as_interrupt, start_child
from iros.metrics.collector import LIVE_WINDOW_SECONDS
from iros.testing.iros import IrosProcess
from iros.testing.process import ChildProcess, free_port, tail

TARGETS = {"memory_growth_pct_max": 10.0, "errors_max": 0, "p99_drift_ratio_max": 1.5}
MODEL = "soak"
ONE_OFF_SHARE = 0.25  # questions asked once: each a new cache entry
_TOPICS = (
    "python decorators",
    "the french revolution",
    "black holes",
    "sourdough bread",
    "interest rates",
    "the immune system",
    "rust ownership",
    "photosynthesis",
    "tcp congestion control",
    "the roman empire",
)
_ASKS = ("Explain {} simply.", "What should a beginner know about {}?", "Give three facts about {}.")


@dataclass(slots=True)
class Window:
    """One interval of the run: what the server held and how the requests that ended in it went."""

    at_s: float
    rss_mb: float
    requests: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms or [math.nan])
        return {
            "at_s": round(self.at_s, 1),
            "rss_mb": round(self.rss_mb, 1),
            "requests": self.requests,
            "errors": self.errors,
            "p50_ms": _round(np.percentile(lat, 50)),
            "p99_ms": _round(np.percentile(lat, 99)),
        }


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 2)


def questions(seed: int = 7) -> Callable[[], str]:
    """Prompts with Zipf popularity over 30 base questions, plus ONE_OFF_SHARE asked only once."""
    rng = np.random.default_rng(seed)
    base = [ask.format(topic) for topic in _TOPICS for ask in _ASKS]
    weights = 1.0 / np.arange(1, len(base) + 1)
    weights /= weights.sum()
    counter = iter(range(sys.maxsize))

    def next_prompt() -> str:
        if rng.random() < ONE_OFF_SHARE:
            return f"Question {next(counter)}: what is {rng.integers(1, 10**9)} plus {rng.integers(1, 999)}?"
        return base[int(rng.choice(len(base), p=weights))]

    return next_prompt


def _config(port: int, upstream: int, data_dir: Path, cache_entries: int) -> dict[str, Any]:
    return {
        # The load generator is one address by design: no per-address connection cap.
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "data_dir": str(data_dir),
            "max_connections_per_address": 0,
        },
        "auth": {"open": True},
        "models": [{"name": MODEL, "backend": "openai", "base_url": f"http://127.0.0.1:{upstream}/v1"}],
        # A cache bound the warm-up reaches: after it, entries are evicted as fast as they come, so
        # growth then is a leak, not the cache filling up as configured.
        "cache": {"enabled": True, "exact": True, "semantic": True, "max_entries": cache_entries},
        "metrics_collection": {"enabled": True},
        "alerting": {
            "enabled": True,
            "evaluation_interval_seconds": 5,
            "alert_rules": [
                {
                    "name": "soak_slow",
                    "condition": "response_time_p95 > 5000",
                    "duration": "1m",
                    "severity": "warning",
                    "channels": [],
                }
            ],
        },
    }


async def _drive(
    url: str,
    server: psutil.Process,
    duration: float,
    rate: float,
    interval: float,
    concurrency: int,
    tick: Callable[[float], None],
) -> list[Window]:
    prompt = questions()
    started = time.monotonic()
    windows = [Window(0.0, server.memory_info().rss / 2**20)]
    limit = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=60)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt()}], "stream": i % 2 == 1}
        t0 = time.perf_counter()
        ok = False
        try:
            async with session.post(url, data=orjson.dumps(body), timeout=timeout) as resp:
                data = await resp.read()
                # A stream that ends without [DONE] was cut: count it as the failure it is.
                ok = resp.status == 200 and (not body["stream"] or data.rstrip().endswith(b"[DONE]"))
        except (aiohttp.ClientError, TimeoutError):
            ok = False
        finally:
            limit.release()
        window = windows[-1]
        window.requests += 1
        if ok:
            window.latencies_ms.append((time.perf_counter() - t0) * 1000)
        else:
            window.errors += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=connector, headers={"content-type": "application/json"}) as s:
        i = 0
        next_window = started + interval
        while (now := time.monotonic()) < started + duration:
            if now >= next_window:
                windows.append(Window(now - started, server.memory_info().rss / 2**20))
                next_window += interval
                tick(now - started)
            # Open loop: a request every 1/rate seconds whatever the server does, up to `concurrency`.
            await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
            await limit.acquire()
            task = asyncio.create_task(one(s, i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.wait(tasks, timeout=60)
    windows.append(Window(time.monotonic() - started, server.memory_info().rss / 2**20))
    return windows


def summarize(windows: list[Window], warmup: float) -> dict[str, Any]:
    """Growth and drift are measured from the end of the warm-up, when caches and pools are full."""
    after = [w for w in windows if w.at_s >= warmup] or windows[-1:]
    baseline_rss = after[0].rss_mb
    peak_rss = max(w.rss_mb for w in after)
    requests = sum(w.requests for w in windows)
    errors = sum(w.errors for w in windows)
    measured = [w for w in after if w.latencies_ms]
    quarter = max(1, len(measured) // 4)
    first = [x for w in measured[:quarter] for x in w.latencies_ms]
    last = [x for w in measured[-quarter:] for x in w.latencies_ms]
    p99_first = float(np.percentile(first, 99)) if first else math.nan
    p99_last = float(np.percentile(last, 99)) if last else math.nan
    everything = [x for w in windows for x in w.latencies_ms]
    return {
        "requests": requests,
        "errors": errors,
        "error_rate": round(errors / requests, 6) if requests else None,
        "rss_mb": {"after_warmup": round(baseline_rss, 1), "peak": round(peak_rss, 1)},
        "memory_growth_pct": round((peak_rss - baseline_rss) / baseline_rss * 100, 2),
        "p50_ms": _round(np.percentile(everything, 50)) if everything else None,
        "p99_ms": _round(np.percentile(everything, 99)) if everything else None,
        "p99_first_quarter_ms": _round(p99_first),
        "p99_last_quarter_ms": _round(p99_last),
        "p99_drift_ratio": _round(p99_last / p99_first) if first and last and p99_first else None,
        "windows": [w.summary() for w in windows],
    }


def run_soak(
    duration: float,
    *,
    rate: float = 40.0,
    interval: float = 10.0,
    warmup: float | None = None,
    concurrency: int = 64,
    cache_entries: int | None = None,
    progress: bool = True,
    keep_dir: Path | None = None,
) -> dict[str, Any]:
    if duration <= 0 or rate <= 0 or interval <= 0 or concurrency < 1:
        raise BenchError("--duration, --rate and --interval must be above 0, --concurrency 1 or more")
    # The warm-up lasts until every bounded in-memory structure can have filled: the live metrics
    # window (a sketch per series per second for LIVE_WINDOW_SECONDS) is the slowest; a short run
    # spends half its time warming up.
    warmup = min(duration / 2, float(LIVE_WINDOW_SECONDS)) if warmup is None else warmup
    # Default: half the one-off questions the warm-up sends, so the bound is reached before judging.
    cache_entries = cache_entries or max(100, int(warmup * rate * ONE_OFF_SHARE / 2))
    if not 0 <= warmup < duration:
        raise BenchError("--warmup must be 0 or more and shorter than --duration")
    upstream: ChildProcess | None = None
    iros: ChildProcess | None = None
    with sigterm_as_interrupt(), bench_workdir(keep_dir) as workdir:
        try:
            # The same children the tests start (iros.testing), with their logs kept in the workdir.
            upstream = start_child(IrosProcess.mock_upstream(log_path=workdir / "upstream.log"), 20.0)
            port = free_port()
            conf = workdir / "iros.yaml"
            conf.write_text(yaml.safe_dump(_config(port, upstream.port, workdir / "data", cache_entries)))
            iros = start_child(IrosProcess.serve(conf, port, log_path=workdir / "iros.log"), 60.0)
            assert iros.proc is not None
            server = psutil.Process(iros.proc.pid)
            with _bar(progress, duration) as tick:
                windows = asyncio.run(
                    _drive(
                        f"{iros.url}/v1/chat/completions", server, duration, rate, interval, concurrency, tick
                    )
                )
            if not iros.running:
                raise BenchError(f"Iros exited during the soak; its output:\n{tail(workdir / 'iros.log')}")
        finally:
            for child in (iros, upstream):
                if child is not None:
                    child.stop()
    result = summarize(windows, warmup)
    met = {
        "memory_growth": result["memory_growth_pct"] <= TARGETS["memory_growth_pct_max"],
        "errors": result["errors"] <= TARGETS["errors_max"],
        "p99_stable": result["p99_drift_ratio"] is not None
        and result["p99_drift_ratio"] <= TARGETS["p99_drift_ratio_max"],
    }
    return {
        "benchmark": "soak",
        "duration_s": duration,
        "warmup_s": warmup,
        "rate_rps": rate,
        "cache_max_entries": cache_entries,
        **result,
        "targets": dict(TARGETS),
        "met": met,
    }


@contextlib.contextmanager
def _bar(enabled: bool, duration: float) -> Any:
    if not enabled:
        yield lambda done: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]soak"),
        BarColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task("soak", total=duration)
    with bar:
        yield lambda done: bar.update(task, completed=done)
