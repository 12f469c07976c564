"""`iros bench tsdb`: ingest rate, query time and size of the embedded SQLite store.

Samples are spread evenly over the 30 days before now, in time order, so every rollup tier fills,
and written as the collector writes them: per flush, one Samples per series, through append+flush.
Queries then ask the ranges and steps a dashboard asks, all series of the metric merged.
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from iros.metrics.store import Query, Samples, SeriesKey
from iros.metrics.tsdb.db import SQLiteStore

# (description, completed, total): called as the bench moves on, e.g. to drive a progress bar.
ProgressFn = Callable[[str, float, float], None]

TARGET_INGEST = 200_000  # samples per second
TARGET_QUERY_30D_MS = 50.0
DAY = 86400
SPAN = 30 * DAY
METRIC = "response_time_ms"
# (range label, seconds, step label, step seconds): what the dashboard's range picker asks.
QUERIES = (
    ("1h", 3600, "1m", 60),
    ("24h", DAY, "5m", 300),
    ("7d", 7 * DAY, "1h", 3600),
    ("30d", SPAN, "1h", 3600),
    ("30d", SPAN, "1d", DAY),
)
QUERY_RUNS = 7


def _series_keys(n: int) -> list[SeriesKey]:
    keys = []
    for i in range(n):
        labels = {
            "model": f"model-{i // 4}",
            "cache": ("miss", "hit")[i % 2],
            "outcome": ("ok", "error")[(i // 2) % 2],
        }
        keys.append((METRIC, tuple(sorted(labels.items()))))
    return keys


def _batches(samples: int, keys: list[SeriesKey], batch: int, end: float) -> list[dict[SeriesKey, Samples]]:
    """Time-ordered flush batches; built before timing, as the collector builds its lists anyway."""
    rng = np.random.default_rng(42)
    ts = end - SPAN + np.sort(rng.uniform(0, SPAN, samples))
    values = rng.lognormal(mean=5.0, sigma=0.8, size=samples)  # latency-like, median ~150 ms
    owner = rng.integers(0, len(keys), samples)
    out = []
    for lo in range(0, samples, batch):
        hi = min(samples, lo + batch)
        part: dict[SeriesKey, Samples] = {}
        for i, key in enumerate(keys):
            mine = np.flatnonzero(owner[lo:hi] == i) + lo
            if mine.size:
                part[key] = Samples(ts[mine].tolist(), values[mine].tolist())
        out.append(part)
    return out


async def _bench(
    path: Path, samples: int, series: int, batch: int, progress: ProgressFn | None
) -> dict[str, Any]:
    def report(description: str, done: float, total: float) -> None:
        if progress is not None:
            progress(description, done, total)

    keys = _series_keys(series)
    end = time.time()
    report("generating samples", 0, samples)
    batches = _batches(samples, keys, batch, end)

    # No start(): no background task, so retention does not run inside the measurement.
    store = SQLiteStore(path)
    try:
        written = 0
        began = time.perf_counter()
        for part in batches:
            store.append(part)
            await store.flush()
            written += sum(len(s.ts) for s in part.values())
            report("ingesting", written, samples)
        ingest_seconds = time.perf_counter() - began
        if store.last_error is not None:
            raise RuntimeError(f"the store could not write: {store.last_error}")

        queries: list[dict[str, Any]] = []
        for n, (span_label, span, step_label, step) in enumerate(QUERIES):
            report(f"querying {span_label} at {step_label}", n, len(QUERIES))
            query = Query(METRIC, end - span, end, step)
            points = await store.query(query)  # warm-up: first read of the pages
            times = []
            for _ in range(QUERY_RUNS):
                t0 = time.perf_counter()
                await store.query(query)
                times.append((time.perf_counter() - t0) * 1000)
            queries.append(
                {
                    "range": span_label,
                    "step": step_label,
                    "points": len(points),
                    "samples": sum(p.count for p in points),
                    "median_ms": round(statistics.median(times), 2),
                }
            )
        report("querying", len(QUERIES), len(QUERIES))
        stats = await store.stats()
    finally:
        await store.close()

    rate = samples / ingest_seconds if ingest_seconds > 0 else float("inf")
    query_30d = max(float(q["median_ms"]) for q in queries if q["range"] == "30d" and q["step"] == "1h")
    return {
        "samples": samples,
        "series": series,
        "flushes": len(batches),
        "samples_per_flush": min(batch, samples),
        "ingest_seconds": round(ingest_seconds, 3),
        "ingest_samples_per_second": round(rate),
        "queries": queries,
        "raw_chunks": stats["raw_chunks"],
        "rollup_rows": stats["rollup_rows"],
        "sqlite_version": sqlite3.sqlite_version,
        "targets": {
            "ingest_samples_per_second": TARGET_INGEST,
            "query_30d_1h_ms": TARGET_QUERY_30D_MS,
        },
        "met": {
            "ingest": rate >= TARGET_INGEST,
            "query_30d_1h": query_30d < TARGET_QUERY_30D_MS,
        },
    }


def run_tsdb_bench(
    directory: Path,
    *,
    samples: int = 2_000_000,
    series: int = 12,
    batch: int = 50_000,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Measure a fresh store in `directory` (its bench-metrics.db is replaced); returns the report."""
    if samples < 1 or series < 1 or batch < 1:
        raise ValueError("samples, series and batch must each be 1 or more")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "bench-metrics.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    result = asyncio.run(_bench(path, samples, series, batch, progress))
    db_bytes = path.stat().st_size  # after close: the WAL is checkpointed into the file
    result["db_bytes"] = db_bytes
    result["bytes_per_million_samples"] = round(db_bytes / samples * 1_000_000)
    return result
