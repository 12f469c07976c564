"""`iros bench collector`: the CPU that metrics collection spends per response, measured in-process.

Synthetic request records (two models, a quarter streamed, 2% errors, a tenth sampled for relevance)
go through the real Collector and the real SQLiteStore in batches the size one ingest interval holds
at the given request rate. CPU time is read from the process clock, so the figure does not depend on
what else the machine is doing, unlike a throughput comparison.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iros.config import load_settings
from iros.core.admission import Admission
from iros.core.record import RequestRecord
from iros.core.spans import Spans
from iros.metrics.collector import INGEST_SECONDS
from iros.metrics.monitor import Monitor
from iros.metrics.tsdb.db import SQLiteStore

QUESTION = {
    "model": "large",
    "messages": [{"role": "user", "content": "What limits a gateway's throughput?"}],
}
ANSWER = {"choices": [{"message": {"role": "assistant", "content": "CPU per request and the upstream."}}]}


def _record(i: int, rng: random.Random) -> RequestRecord:
    spans = Spans()
    for stage in ("auth", "parse", "cache", "route", "queue", "upstream_connect", "upstream_ttft"):
        spans.lap(stage)
    stream = rng.random() < 0.25
    record = RequestRecord(
        f"bench{i:012x}",
        time.time(),
        spans,
        model="chat",
        deployment=rng.choice(("large#0", "lightweight#0")),
        stream=stream,
        status=200 if rng.random() > 0.02 else 502,
        usage={"prompt_tokens": rng.randint(5, 200), "completion_tokens": rng.randint(1, 400)},
        body_bytes=rng.randint(200, 4000),
    )
    if stream:
        record.first_chunk_ns = spans.start + rng.randint(50, 400) * 1_000_000
        record.last_chunk_ns = record.first_chunk_ns + rng.randint(100, 3000) * 1_000_000
        record.max_gap_ns, record.chunks = rng.randint(5, 300) * 1_000_000, rng.randint(2, 400)
    if rng.random() < 0.1:
        record.sampled, record.payload, record.answer = True, QUESTION, ANSWER
    spans.lap("respond")
    spans.finish()
    return record


async def _measure(
    directory: Path, responses: int, rate: float, progress: Callable[[int], None] | None
) -> dict[str, Any]:
    settings = load_settings(None, {"server": {"data_dir": str(directory)}})
    flush_every = settings.metrics_collection.storage.flush_interval_seconds
    store = SQLiteStore(directory / "metrics.db", flush_interval=flush_every)
    collector = Monitor(settings, Admission(64, 64, 1.0), store).collector
    await store.start()
    rng = random.Random(7)
    batch = max(1, round(rate * INGEST_SECONDS))
    ingest_s: list[float] = []
    flush_s = 0.0
    done = 0
    since_flush = 0
    try:
        while done < responses:
            n = min(batch, responses - done)
            for record in [_record(done + i, rng) for i in range(n)]:
                collector.observe(record)
            began = time.process_time()
            await collector.ingest()
            ingest_s.append((time.process_time() - began) / n)
            done += n
            since_flush += n
            # The store flushes once a flush interval's traffic has been taken in, as in service.
            if since_flush >= rate * flush_every or done == responses:
                began = time.process_time()
                await store.flush()
                flush_s += time.process_time() - began
                since_flush = 0
            if progress is not None:
                progress(n)
    finally:
        await store.close()
    ingest_us = statistics.median(ingest_s) * 1e6
    store_us = flush_s / responses * 1e6
    return {
        "benchmark": "collector",
        "responses": responses,
        "request_rate": rate,
        "records_per_ingest": batch,
        "flush_interval_seconds": flush_every,
        "cpu_us_per_response": {
            "ingest": round(ingest_us, 2),
            "store": round(store_us, 2),
            "total": round(ingest_us + store_us, 2),
        },
        "samples_written": store.samples_written,
    }


def run_collector_bench(
    directory: Path | None = None,
    *,
    responses: int = 50_000,
    rate: float = 3000.0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    if responses < 1 or rate <= 0:
        raise ValueError("--responses must be 1 or more and --rate above 0")
    if directory is not None:
        return asyncio.run(_measure(directory, responses, rate, progress))
    with tempfile.TemporaryDirectory(prefix="iros-bench-collector-") as tmp:
        return asyncio.run(_measure(Path(tmp), responses, rate, progress))
