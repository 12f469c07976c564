"""The embedded SQLite time-series store: rollup accuracy, label matching, retention, durability."""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import sqlite3
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from iros.bench.tsdb import run_tsdb_bench
from iros.core.errors import StoreUnavailable
from iros.metrics.sketch import RELATIVE_ACCURACY, Sketch
from iros.metrics.store import Query, Samples, SeriesKey
from iros.metrics.tsdb import query as tsdb_query
from iros.metrics.tsdb.db import SQLiteStore
from iros.metrics.tsdb.encoding import sketch_of_row

REPO = Path(__file__).resolve().parents[2]
METRIC = "response_time_ms"
DAY = 86400
# A fixed "now" on a day boundary, so every tier's buckets line up the same way in every run.
NOW = 1_700_006_400.0
QS = (0.0, 0.5, 0.95, 0.99, 1.0)


def key(**labels: str) -> SeriesKey:
    return (METRIC, tuple(sorted(labels.items())))


def samples(ts: np.ndarray, values: np.ndarray) -> Samples:
    return Samples(ts.tolist(), values.tolist())


def close_enough(estimate: float | None, exact: float) -> bool:
    assert estimate is not None
    return abs(estimate - exact) <= RELATIVE_ACCURACY * abs(exact) + 1e-9


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


async def write_shuffled(
    store: SQLiteStore, k: SeriesKey, ts: np.ndarray, values: np.ndarray, flushes: int
) -> None:
    """Several flushes with interleaved timestamps, so later flushes merge into existing rollup rows."""
    order = np.random.default_rng(1).permutation(ts.size)
    for part in np.array_split(order, flushes):
        store.append({k: samples(ts[part], values[part])})
        await store.flush()


@pytest.mark.parametrize("step", [60, 300, 3600, DAY, 30, 90])
async def test_window_percentiles_match_exact_ones_within_sketch_accuracy(
    tmp_path: Path, rng: np.random.Generator, step: int
) -> None:
    # Latency-like values over three days, a few exact zeros (the sketch's zero bucket) among them.
    n = 12_000
    ts = NOW - rng.uniform(0, 3 * DAY, n)
    values = rng.lognormal(4.0, 1.2, n)
    values[rng.random(n) < 0.02] = 0.0
    store = SQLiteStore(tmp_path / "m.db")
    await write_shuffled(store, key(model="a"), ts, values, flushes=3)

    points = await store.query(Query(METRIC, NOW - 3 * DAY, NOW, step, quantiles=QS))
    await store.close()

    window = np.floor(ts / step) * step
    assert [p.ts for p in points] == sorted(set(window.tolist()))
    assert sum(p.count for p in points) == n
    for p in points:
        exact = values[window == p.ts]
        assert p.count == exact.size
        assert p.sum == pytest.approx(exact.sum(), rel=1e-12)
        assert (p.min, p.max) == (exact.min(), exact.max())
        for q in QS:
            truth = float(np.quantile(exact, q, method="lower"))
            if step % 60:  # raw chunks: exact
                assert p.quantiles[q] == truth
            else:
                assert close_enough(p.quantiles[q], truth), (p.ts, q, p.quantiles[q], truth)


async def test_wide_tables_and_mixed_count_widths_give_the_same_answers(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One hour holds 3000 equal values (a bucket count needing 2 bytes), the others a few spread
    # over 12 orders of magnitude (a wide window x bucket table).
    ts = np.concatenate([NOW - rng.uniform(0, 3600, 3000), NOW - rng.uniform(3600, DAY, 2000)])
    values = np.concatenate([np.full(3000, 5.0), 10 ** rng.uniform(-2, 10, 2000)])
    store = SQLiteStore(tmp_path / "m.db")
    await write_shuffled(store, key(model="a"), ts, values, flushes=2)
    query = Query(METRIC, NOW - DAY, NOW, 3600, quantiles=QS)
    whole = await store.query(query)
    monkeypatch.setattr(tsdb_query, "_DENSE_CELLS", 5000)  # a few windows per table
    blocked = await store.query(query)
    await store.close()
    assert whole == blocked and len(whole) == 24
    window = np.floor(ts / 3600) * 3600
    for p in whole:
        exact = values[window == p.ts]
        for q in QS:
            assert close_enough(p.quantiles[q], float(np.quantile(exact, q, method="lower")))


async def test_stored_rollup_rows_are_the_sketches_of_their_buckets(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    ts = NOW - rng.uniform(0, 2 * 3600, 4000)
    values = rng.lognormal(3.0, 2.0, 4000)
    values[:40] = 0.0
    store = SQLiteStore(tmp_path / "m.db")
    await write_shuffled(store, key(model="a"), ts, values, flushes=4)
    await store.close()

    with sqlite3.connect(tmp_path / "m.db") as conn:
        rows = conn.execute(
            "SELECT res, bucket_start, count, sum, min, max, buckets, counts FROM rollups"
        ).fetchall()
    assert {r[0] for r in rows} == {60, 300, 3600, DAY}
    for res, start, *stored in rows:
        expected = Sketch.of(values[np.floor(ts / res) * res == start])
        got = sketch_of_row(*stored)
        assert (got.count, got.zeros, got.min, got.max) == (
            expected.count,
            expected.zeros,
            expected.min,
            expected.max,
        )
        assert got.sum == pytest.approx(expected.sum, rel=1e-12)
        for q in QS:
            assert got.quantile(q) == expected.quantile(q)


async def test_label_match_merges_only_matching_series(tmp_path: Path, rng: np.random.Generator) -> None:
    store = SQLiteStore(tmp_path / "m.db")
    fast = rng.uniform(1, 10, 500)
    slow = rng.uniform(1000, 2000, 300)
    other_metric = ("ttft_ms", (("model", "a"),))
    store.append(
        {
            key(model="a", cache="hit", outcome="ok"): samples(NOW - rng.uniform(0, 3600, 250), fast[:250]),
            key(model="a", cache="miss", outcome="ok"): samples(NOW - rng.uniform(0, 3600, 250), fast[250:]),
            key(model="b", cache="miss", outcome="ok"): samples(NOW - rng.uniform(0, 60, 300), slow),
            other_metric: samples(NOW - rng.uniform(0, 3600, 50), rng.uniform(1e5, 1e6, 50)),
        }
    )
    await store.flush()

    async def one_hour(*match: tuple[str, str]) -> tuple[int, float, float]:
        (point,) = await store.query(Query(METRIC, NOW - 3600, NOW, 3600, match=match))
        assert point.min is not None and point.max is not None
        return point.count, point.min, point.max

    assert await one_hour(("model", "a")) == (500, fast.min(), fast.max())
    assert await one_hour(("model", "a"), ("cache", "hit")) == (250, fast[:250].min(), fast[:250].max())
    assert await one_hour(("model", "b")) == (300, slow.min(), slow.max())
    assert await one_hour() == (800, fast.min(), slow.max())
    assert await store.query(Query(METRIC, NOW - 3600, NOW, 3600, match=(("model", "c"),))) == []
    assert await store.query(Query("no_such_metric", NOW - 3600, NOW, 3600)) == []

    assert await store.label_values(METRIC, "model", NOW - 3600, NOW) == ["a", "b"]
    assert await store.label_values(METRIC, "cache", NOW - 3600, NOW) == ["hit", "miss"]
    assert await store.label_values(METRIC, "model", NOW - 10 * DAY, NOW - 5 * DAY) == []
    await store.close()


async def test_retention_deletes_what_is_older_and_keeps_what_is_newer(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "m.db", retention_days=30, raw_retention_hours=48)
    k = key(model="a")
    ages = {"recent": 3600.0, "past_raw": 3 * DAY, "past_all": 40 * DAY}
    for age in ages.values():  # one flush each, so each age has chunks of its own
        store.append({k: Samples([NOW - age + i for i in range(10)], [5.0] * 10)})
        await store.flush()

    async def count(age: float, step: float) -> int:
        points = await store.query(Query(METRIC, NOW - age - step, NOW - age + step, step))
        return sum(p.count for p in points)

    assert [await count(age, 30) for age in ages.values()] == [10, 10, 10]
    deleted = await store.enforce_retention(now=NOW)
    # Raw: the two older chunks. Rollups: the 40-day-old rows of all four tiers.
    assert deleted == {"chunks": 2, "rollups": 4}
    assert [await count(age, 30) for age in ages.values()] == [10, 0, 0]  # raw
    assert [await count(age, 60) for age in ages.values()] == [10, 10, 0]  # 1m rollups
    assert [await count(age, DAY) for age in ages.values()] == [10, 10, 0]  # 1d rollups
    assert await store.enforce_retention(now=NOW) == {"chunks": 0, "rollups": 0}
    await store.close()


async def test_history_survives_a_restart(tmp_path: Path, rng: np.random.Generator) -> None:
    ts = NOW - rng.uniform(0, DAY, 2000)
    values = rng.lognormal(3, 1, 2000)
    query = Query(METRIC, NOW - DAY, NOW, 300)
    store = SQLiteStore(tmp_path / "m.db")
    await store.start()
    store.append({key(model="a"): samples(ts, values)})
    await store.close()  # close flushes what is queued

    reopened = SQLiteStore(tmp_path / "m.db")
    await reopened.start()
    points = await reopened.query(query)
    stats = await reopened.stats()
    await reopened.close()
    assert sum(p.count for p in points) == 2000
    assert stats["series"] == 1 and stats["raw_chunks"] == 1 and stats["db_bytes"] > 0
    with pytest.raises(StoreUnavailable, match="closed"):
        await reopened.query(query)


async def test_background_task_flushes_on_its_own(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "m.db", flush_interval=0.05)
    await store.start()
    store.append({key(model="a"): Samples([NOW], [1.0])})
    for _ in range(100):
        await asyncio.sleep(0.02)
        if store.samples_written:
            break
    assert store.samples_written == 1
    await store.close()


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from iros.metrics.tsdb.db import SQLiteStore
    from iros.metrics.store import Samples

    BATCH = int(sys.argv[2])

    async def main():
        store = SQLiteStore(sys.argv[1])
        k = ("response_time_ms", (("model", "a"),))
        i = 0
        while True:
            # Each batch spreads over a day, so a flush writes hundreds of rollup rows.
            ts = [1_700_000_000 + i * 0.001 + j * 86400 / BATCH for j in range(BATCH)]
            store.append({k: Samples(ts, [float(j % 500 + 1) for j in range(BATCH)])})
            await store.flush()
            print(i, flush=True)
            i += 1

    asyncio.run(main())
    """
)


@pytest.mark.e2e
async def test_writer_killed_mid_stream_leaves_a_sound_database(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    batch = 5000
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, str(path), str(batch), stdout=asyncio.subprocess.PIPE, cwd=REPO
    )
    assert child.stdout is not None
    confirmed = -1
    try:
        while confirmed < 4:
            line = await asyncio.wait_for(child.stdout.readline(), 30)
            assert line, "the writer exited early"
            confirmed = int(line)
        child.send_signal(signal.SIGKILL)  # most likely inside the next flush
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
    assert child.returncode == -signal.SIGKILL

    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    store = SQLiteStore(path)
    points = await store.query(Query(METRIC, 1_699_900_000, 1_700_200_000, DAY))
    await store.close()
    total = sum(p.count for p in points)
    # Everything confirmed is there, and a flush is all or nothing.
    assert total >= (confirmed + 1) * batch
    assert total % batch == 0


async def test_several_writers_share_one_file(tmp_path: Path) -> None:
    # Two stores: two connections and threads, as two uvicorn workers would have.
    stores = [SQLiteStore(tmp_path / "m.db") for _ in range(2)]
    for round_ in range(5):
        for i, store in enumerate(stores):
            ts = [NOW - 1000 + round_ * 10 + j * 0.01 for j in range(500)]
            store.append(
                {key(model=f"m{i}"): Samples(ts, [1.0] * 500), key(model="shared"): Samples(ts, [2.0] * 500)}
            )
        await asyncio.gather(*(store.flush() for store in stores))
    assert all(store.last_error is None for store in stores)
    (point,) = await stores[0].query(Query(METRIC, NOW - 3600, NOW, 3600))
    (shared,) = await stores[1].query(Query(METRIC, NOW - 3600, NOW, 3600, match=(("model", "shared"),)))
    for store in stores:
        await store.close()
    assert point.count == 2 * 5 * 1000
    assert shared.count == 2 * 5 * 500


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (Query(METRIC, NOW - 60, NOW, 0), "step"),
        (Query(METRIC, NOW - 60, NOW, -5), "step"),
        (Query(METRIC, NOW - 60, NOW, math.nan), "step"),
        (Query(METRIC, NOW, NOW, 60), "after start"),
        (Query(METRIC, NOW, NOW - 60, 60), "after start"),
        (Query(METRIC, NOW - 30 * DAY, NOW, 60), "larger step"),
        (Query(METRIC, NOW - 60, NOW, 60, quantiles=(1.5,)), "quantiles"),
    ],
)
async def test_bad_query_arguments_raise_value_error(tmp_path: Path, query: Query, message: str) -> None:
    store = SQLiteStore(tmp_path / "m.db")
    with pytest.raises(ValueError, match=message):
        await store.query(query)
    await store.close()


async def test_unwritable_database_keeps_samples_queued_until_it_can_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("a file where the data directory should be")
    store = SQLiteStore(blocker / "m.db")
    store.append({key(model="a"): Samples([NOW, NOW + 1], [1.0, 2.0])})
    with caplog.at_level(logging.ERROR, logger="iros.metrics.tsdb"):
        await store.flush()
        await store.flush()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(blocker / "m.db") in errors[0].getMessage()
    stats = await store.stats()
    assert stats["pending"] == 2 and stats["last_error"] and store.samples_written == 0

    blocker.unlink()  # the disk is writable again
    await store.flush()
    assert store.samples_written == 2 and store.last_error is None
    await store.close()


async def test_queue_beyond_its_bound_drops_the_oldest_samples(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "m.db", max_pending=100)
    for batch in range(3):
        ts = [NOW + batch * 60 + i for i in range(60)]
        store.append({key(model="a"): Samples(ts, [float(batch)] * 60)})
    assert store.dropped == 80
    await store.flush()
    (point,) = await store.query(Query(METRIC, NOW, NOW + 3600, 3600))
    await store.close()
    assert point.count == 100 and point.min == 1.0  # batch 0 and 20 of batch 1 went


async def test_unusable_samples_are_dropped_and_counted(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "m.db")
    store.append({key(model="a"): Samples([NOW, NOW + 1, math.nan], [1.0, math.inf, 3.0])})
    await store.flush()
    (point,) = await store.query(Query(METRIC, NOW, NOW + 60, 60))
    await store.close()
    assert (point.count, store.dropped) == (1, 2)


def test_bench_runs_with_small_numbers_and_reports_its_figures(tmp_path: Path) -> None:
    began = time.perf_counter()
    result = run_tsdb_bench(tmp_path, samples=6000, series=3, batch=1500)
    assert time.perf_counter() - began < 10
    assert result["samples"] == 6000 and result["flushes"] == 4
    assert result["ingest_samples_per_second"] > 0
    assert result["db_bytes"] > 0 and result["bytes_per_million_samples"] > 0
    assert [(q["range"], q["step"]) for q in result["queries"]] == [
        ("1h", "1m"),
        ("24h", "5m"),
        ("7d", "1h"),
        ("30d", "1h"),
        ("30d", "1d"),
    ]
    assert all(q["median_ms"] >= 0 for q in result["queries"])
    assert result["queries"][-1]["samples"] > 5900  # nearly all samples lie in the last 30 days
    assert result["targets"] == {"ingest_samples_per_second": 200_000, "query_30d_1h_ms": 50.0}
    assert set(result["met"]) == {"ingest", "query_30d_1h"}
