"""The embedded time-series store: SQLite in WAL mode, raw samples in compressed chunks, sketch rollups.

store = SQLiteStore("iros-data/metrics.db", flush_interval=1.0)
await store.start()                       # opens the file, starts the flush and retention task
store.append({key: Samples(ts, values)})  # O(series): queued in memory, written by the next flush
await store.query(Query("response_time_ms", start, end, step=3600))
await store.close()                       # flushes what is queued, then closes

Schema (PRAGMA user_version 1; auto_vacuum=INCREMENTAL so retention gives pages back):

  series(id INTEGER PRIMARY KEY, metric TEXT, labels TEXT, UNIQUE(metric, labels))
      labels is a JSON object with sorted keys, so one label set has one spelling.

  chunks(id INTEGER PRIMARY KEY, series_id, start_ts REAL, end_ts REAL, count INTEGER, data BLOB)
      INDEX chunks_series_end(series_id, end_ts)
      Raw samples, one row per series per flush; start_ts/end_ts are its first and last sample
      (unix seconds). data = zlib level 1 of: the first timestamp in microseconds (int64), the
      microsecond deltas between consecutive samples (int64), the values (float64); both arrays
      byte-shuffled (all first bytes, then all second bytes, ...) so their slowly varying high bytes
      compress. Samples are sorted by time within a chunk. Kept raw_retention_hours, by end_ts.

  rollups(series_id, res, bucket_start, count, sum, min, max, buckets, counts,
          PRIMARY KEY(series_id, res, bucket_start)) WITHOUT ROWID
      One row per series, tier and bucket: res is the tier in seconds (60, 300, 3600, 86400),
      bucket_start a multiple of res, by sample time (samples may be late). count, sum, min, max
      are exact. buckets and counts are the bucket's Sketch (iros.metrics.sketch): buckets holds one
      little-endian uint16 code per non-empty sketch bucket, ascending (0 is the zero bucket,
      values at or below MIN_VALUE; c >= 1 is log bucket c + CODE_BASE); counts holds each one's
      count, little-endian, in the narrowest of 1, 2, 4 or 8 bytes that fits the row's largest, so
      width = 2 * len(counts) / len(buckets). sketch_of_row() turns a row back into a Sketch. A
      window's percentiles come from the merged buckets of its rows, never averaged percentiles.
      Kept retention_days, by bucket_start.

Why plain arrays rather than one compressed blob per row: one zlib call per row (10-40 us
each, measured) alone exceeded both the ingest budget (600k rollup rows per 2M samples spread
over 30 days) and the 30-day query budget (8,640 sketches at 1 h for 12 series). As plain arrays,
all rows of a flush or of a query are encoded or decoded with a few numpy calls, and are smaller.

Each flush is one BEGIN IMMEDIATE transaction: insert the chunks and merge into the rollup rows of
every tier (read the existing rows, merge the sketches, write back). A crash loses at most what
was queued since the last flush, and WAL keeps the file consistent. Several processes (uvicorn
workers) may write the same file: the IMMEDIATE lock and busy_timeout serialise their flushes.
All database work runs on one dedicated thread per store, so the event loop never blocks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from iros.core.errors import StoreUnavailable
from iros.core.sqlitefile import SQLiteFile
from iros.metrics.store import Point, Query, Samples, SeriesKey
from iros.metrics.tsdb.encoding import (
    US,
    Ints,
    RollupRows,
    bucket_codes,
    dense_groups,
    encode_chunk,
    group_starts,
)
from iros.metrics.tsdb.query import MAX_WINDOWS, label_values, matching_series, query_raw, query_rollups

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 1
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    metric TEXT NOT NULL,
    labels TEXT NOT NULL,
    UNIQUE (metric, labels)
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    series_id INTEGER NOT NULL,
    start_ts REAL NOT NULL,
    end_ts REAL NOT NULL,
    count INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_series_end ON chunks (series_id, end_ts);
CREATE TABLE IF NOT EXISTS rollups (
    series_id INTEGER NOT NULL,
    res INTEGER NOT NULL,
    bucket_start INTEGER NOT NULL,
    count INTEGER NOT NULL,
    sum REAL NOT NULL,
    min REAL NOT NULL,
    max REAL NOT NULL,
    buckets BLOB NOT NULL,
    counts BLOB NOT NULL,
    PRIMARY KEY (series_id, res, bucket_start)
) WITHOUT ROWID;
"""


def parse_interval(text: str) -> int:
    """'1m' -> 60. Whole seconds, minutes, hours or days."""
    text = text.strip()
    try:
        value = int(text[:-1]) * _UNITS[text[-1]]
    except (KeyError, ValueError, IndexError):
        raise ValueError(f"interval {text!r}: give a whole number and s, m, h or d, e.g. 5m") from None
    if value <= 0:
        raise ValueError(f"interval {text!r} must be above zero")
    return value


def _labels_json(labels: Iterable[tuple[str, str]]) -> str:
    return json.dumps(dict(labels), sort_keys=True, separators=(",", ":"))


# One series' share of a flush: key, sorted microsecond timestamps, chunk blob, (res, bucket starts, rows).
_Prepared = tuple[SeriesKey, Ints, bytes, list[tuple[int, Ints, RollupRows]]]


class SQLiteStore:
    """MetricsStore on one SQLite file. See the module docstring for the schema."""

    name = "sqlite"

    def __init__(
        self,
        path: str | Path,
        *,
        flush_interval: float = 1.0,
        retention_days: float = 30,
        raw_retention_hours: float = 48,
        intervals: Sequence[str] = ("1m", "5m", "1h", "1d"),
        retention_check_seconds: float = 3600,
        max_pending: int = 2_000_000,
    ) -> None:
        if flush_interval <= 0 or retention_days <= 0 or raw_retention_hours <= 0:
            raise ValueError("flush_interval, retention_days and raw_retention_hours must be above zero")
        self.path = Path(path)
        self.flush_interval = flush_interval
        self.retention_days = retention_days
        self.raw_retention_hours = raw_retention_hours
        self.retention_check_seconds = retention_check_seconds
        self.tiers = sorted({parse_interval(i) for i in intervals})
        self.max_pending = max_pending
        self.dropped = 0  # samples lost: queue full, or unusable (not finite)
        self.samples_written = 0
        self.last_flush_seconds: float | None = None
        self._db = SQLiteFile(
            self.path,
            schema=_SCHEMA,
            version=SCHEMA_VERSION,
            label="metrics store",
            thread_name="iros-tsdb",
            # page_size and auto_vacuum take effect only on a new file. 8 KiB pages: ~20% faster rollup
            # inserts than 4 KiB (measured). Incremental auto_vacuum lets retention give pages back.
            pragmas=("page_size = 8192", "auto_vacuum = INCREMENTAL", "cache_size = -32000"),  # 32 MB cache
            meanwhile=f"samples stay queued (up to {max_pending}) and writes are retried every "
            f"{flush_interval:g}s",
            logger=log,
        )
        self._last_retention = -math.inf  # a (re)started process enforces retention at once

        self._lock = threading.Lock()
        self._pending: deque[tuple[SeriesKey, Samples]] = deque()
        self._pending_samples = 0
        self._writing = 0  # samples of the flush in progress
        self._series_ids: dict[SeriesKey, int] = {}

    # ---------------------------------------------------------------- the event-loop side

    @property
    def last_error(self) -> str | None:
        """Why the file cannot be written now; None while writes succeed."""
        return self._db.last_error

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._db.run(fn, *args)

    async def start(self) -> None:
        try:
            await self._run(self._db.connect)
        except (sqlite3.Error, OSError) as exc:
            # Keep serving: samples queue (bounded) and the next flush tries again.
            self._db.report(exc)
        self._db.start_background(self._background, every=self.flush_interval)

    def append(self, batch: dict[SeriesKey, Samples]) -> None:
        """Queue samples (the lists are kept, not copied). O(series), never blocks on the database."""
        with self._lock:
            for key, samples in batch.items():
                if len(samples.ts):
                    self._pending.append((key, samples))
                    self._pending_samples += len(samples.ts)
            self._trim()

    def _trim(self) -> None:
        # Lock held. Drop the oldest samples beyond the bound: the newest matter most on a dashboard.
        while self._pending_samples > self.max_pending and self._pending:
            key, samples = self._pending[0]
            excess = self._pending_samples - self.max_pending
            if len(samples.ts) <= excess:
                self._pending.popleft()
                self._pending_samples -= len(samples.ts)
                self.dropped += len(samples.ts)
            else:
                self._pending[0] = (key, Samples(samples.ts[excess:], samples.values[excess:]))
                self._pending_samples -= excess
                self.dropped += excess

    async def flush(self) -> None:
        """Write everything queued now. A failed write is logged and its samples stay queued."""
        with self._lock:
            items = list(self._pending)
            self._pending.clear()
            self._pending_samples = 0
        if not items:
            return
        # Still pending while being written: stats() must not show an empty queue during a failing write.
        self._writing = sum(len(s.ts) for _, s in items)
        try:
            await self._run(self._write, items)
        except (sqlite3.Error, OSError) as exc:
            self._db.report(exc)
            with self._lock:
                self._pending.extendleft(reversed(items))
                self._pending_samples += sum(len(s.ts) for _, s in items)
                self._trim()
        except Exception:
            log.exception("metrics store %s: could not write %d series; dropped them", self.path, len(items))
            with self._lock:
                self.dropped += sum(len(s.ts) for _, s in items)
        else:
            self._db.recovered()
        finally:
            self._writing = 0

    async def _background(self) -> None:
        await self.flush()
        if not self._db.stopping and time.monotonic() - self._last_retention >= self.retention_check_seconds:
            self._last_retention = time.monotonic()
            await self.enforce_retention()

    async def enforce_retention(self, now: float | None = None) -> dict[str, int]:
        """Delete raw chunks past raw_retention_hours and rollups past retention_days."""
        now = time.time() if now is None else now
        try:
            return await self._run(self._retention, now)
        except (sqlite3.Error, OSError) as exc:
            self._db.report(exc)
            return {"chunks": 0, "rollups": 0}

    async def query(self, query: Query) -> list[Point]:
        """Merged statistics of every matching series per step window, oldest first.

        Windows are [k*step, (k+1)*step); every window that overlaps [start, end) is returned whole,
        so a window's figures do not depend on where the range was cut. Steps that are whole
        multiples of a rollup tier read the coarsest such tier; others read raw chunks (exact).
        """
        if not (math.isfinite(query.step) and query.step > 0):
            raise ValueError(f"step must be above 0 seconds, not {query.step!r}")
        if not (math.isfinite(query.start) and math.isfinite(query.end)) or query.end <= query.start:
            raise ValueError(f"end ({query.end!r}) must be after start ({query.start!r})")
        if any(not 0 <= q <= 1 for q in query.quantiles):
            raise ValueError(f"quantiles must lie between 0 and 1, not {list(query.quantiles)}")
        first = math.floor(query.start / query.step)
        last = math.ceil(query.end / query.step)
        if last - first > MAX_WINDOWS:
            raise ValueError(
                f"{last - first} windows of {query.step:g}s: at most {MAX_WINDOWS}; use a larger step"
            )
        try:
            return await self._run(self._query, query)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"metrics database {self.path}: {exc}") from exc

    async def label_values(self, metric: str, label: str, start: float, end: float) -> list[str]:
        """Distinct values of one label among the metric's series with data in [start, end)."""
        try:
            return await self._run(self._label_values, metric, label, start, end)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"metrics database {self.path}: {exc}") from exc

    async def stats(self) -> dict[str, Any]:
        with self._lock:
            pending = self._pending_samples + self._writing
        counts: dict[str, Any] = {"db_bytes": None, "series": None, "raw_chunks": None, "rollup_rows": None}
        with contextlib.suppress(sqlite3.Error, OSError):
            counts = await self._run(self._counts)
        return {
            "backend": self.name,
            "path": str(self.path),
            **counts,
            "samples_written": self.samples_written,
            "pending": pending,
            "dropped": self.dropped,
            "last_flush_seconds": self.last_flush_seconds,
            "last_error": self.last_error,
        }

    async def close(self) -> None:
        await self._db.close(final=self.flush)

    # ---------------------------------------------------------------- the database thread

    def _prepare(self, items: list[tuple[SeriesKey, Samples]]) -> tuple[list[_Prepared], int]:
        """Group the queued samples by series, sort them, and build chunks and rollup rows (no I/O).
        Also returns how many samples were unusable (not finite, or without a partner)."""
        grouped: dict[SeriesKey, list[Samples]] = {}
        for key, samples in items:
            grouped.setdefault(key, []).append(samples)
        prepared: list[_Prepared] = []
        unusable = 0
        for key, parts in grouped.items():
            ts = np.concatenate([np.asarray(p.ts[: len(p.values)], dtype=np.float64) for p in parts])
            values = np.concatenate([np.asarray(p.values[: len(p.ts)], dtype=np.float64) for p in parts])
            ok = np.isfinite(ts) & np.isfinite(values)
            if not ok.all():
                ts, values = ts[ok], values[ok]
            unusable += int(ok.size - ok.sum()) + sum(abs(len(p.ts) - len(p.values)) for p in parts)
            if ts.size == 0:
                continue
            ts_us = np.rint(ts * US).astype(np.int64)
            order = np.argsort(ts_us, kind="stable")
            ts_us, values = ts_us[order], values[order]
            tiers = []
            if self.tiers:
                # The finest tier from the samples; each coarser one from the finest one's rows (every
                # resolution is a multiple of the finer ones), which are few where samples are many.
                finest = self.tiers[0]
                bucket = ts_us // (finest * US)
                starts = group_starts(bucket)
                rows = RollupRows.of_samples(dense_groups(starts, bucket.size), values, bucket_codes(values))
                row_start = bucket[starts] * finest
                tiers.append((finest, row_start, rows))
                for res in self.tiers[1:]:
                    coarse = row_start // res
                    heads = group_starts(coarse)
                    tiers.append((res, coarse[heads] * res, rows.coarsen(dense_groups(heads, coarse.size))))
            prepared.append((key, ts_us, encode_chunk(ts_us, values), tiers))
        return prepared, unusable

    def _write(self, items: list[tuple[SeriesKey, Samples]]) -> None:
        began = time.perf_counter()
        prepared, unusable = self._prepare(items)
        if prepared:
            self._commit(prepared)
        # Only once written: a failed write is retried with the same samples.
        with self._lock:
            self.dropped += unusable
        self.samples_written += sum(p[1].size for p in prepared)
        self.last_flush_seconds = time.perf_counter() - began

    def _commit(self, prepared: list[_Prepared]) -> None:
        conn = self._db.connect()
        new_ids: dict[SeriesKey, int] = {}
        conn.execute("BEGIN IMMEDIATE")
        try:
            chunk_rows = []
            rollup_rows: list[tuple[Any, ...]] = []
            for key, ts_us, chunk, tiers in prepared:
                sid = self._series_ids.get(key) or new_ids.get(key) or self._series_id(conn, key)
                new_ids[key] = sid
                chunk_rows.append((sid, int(ts_us[0]) / US, int(ts_us[-1]) / US, int(ts_us.size), chunk))
                for res, starts, rows in tiers:
                    rollup_rows.extend(self._rollup_rows(conn, sid, res, starts, rows))
            conn.executemany(
                "INSERT INTO chunks (series_id, start_ts, end_ts, count, data) VALUES (?, ?, ?, ?, ?)",
                chunk_rows,
            )
            conn.executemany("INSERT OR REPLACE INTO rollups VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rollup_rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        # Only after COMMIT: a rolled-back series row must not be remembered.
        self._series_ids.update(new_ids)

    @staticmethod
    def _series_id(conn: sqlite3.Connection, key: SeriesKey) -> int:
        metric, labels = key
        text = _labels_json(labels)
        conn.execute("INSERT OR IGNORE INTO series (metric, labels) VALUES (?, ?)", (metric, text))
        row = conn.execute("SELECT id FROM series WHERE metric = ? AND labels = ?", (metric, text)).fetchone()
        return int(row[0])

    @staticmethod
    def _rollup_rows(
        conn: sqlite3.Connection, sid: int, res: int, starts: Ints, rows: RollupRows
    ) -> list[tuple[Any, ...]]:
        """The rows to write for one series and tier: new buckets as they are, existing ones merged."""
        bucket_starts = starts.tolist()
        existing = conn.execute(
            "SELECT bucket_start, count, sum, min, max, buckets, counts FROM rollups "
            "WHERE series_id = ? AND res = ? AND bucket_start IN (SELECT value FROM json_each(?))",
            (sid, res, json.dumps(bucket_starts)),
        ).fetchall()
        if existing:
            into = np.searchsorted(starts, [row[0] for row in existing]).astype(np.int64)
            rows.merge(RollupRows.decode([row[1:] for row in existing]), into)
        buckets, counts = rows.encode()
        n = len(bucket_starts)
        return list(
            zip(
                [sid] * n,
                [res] * n,
                bucket_starts,
                rows.count.tolist(),
                rows.sum.tolist(),
                rows.min.tolist(),
                rows.max.tolist(),
                buckets,
                counts,
                strict=True,
            )
        )

    def _retention(self, now: float) -> dict[str, int]:
        conn = self._db.connect()
        raw_cutoff = now - self.raw_retention_hours * 3600
        rollup_cutoff = now - self.retention_days * 86400
        deleted = {"chunks": 0, "rollups": 0}
        conn.execute("BEGIN IMMEDIATE")
        try:
            ids = [row[0] for row in conn.execute("SELECT id FROM series")]
            for sid in ids:  # per series and tier, so each delete is a range of an index
                cur = conn.execute("DELETE FROM chunks WHERE series_id = ? AND end_ts < ?", (sid, raw_cutoff))
                deleted["chunks"] += cur.rowcount
                for res in self._stored_tiers(conn, sid):
                    cur = conn.execute(
                        "DELETE FROM rollups WHERE series_id = ? AND res = ? AND bucket_start < ?",
                        (sid, res, rollup_cutoff),
                    )
                    deleted["rollups"] += cur.rowcount
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if deleted["chunks"] or deleted["rollups"]:
            # executescript steps the pragma to the end; execute() would free a single page.
            conn.executescript("PRAGMA incremental_vacuum;")
        return deleted

    @staticmethod
    def _stored_tiers(conn: sqlite3.Connection, sid: int) -> list[int]:
        """The tiers a series has rows in, earlier configurations' included: one index seek each."""
        tiers: list[int] = []
        while True:
            row = conn.execute(
                "SELECT min(res) FROM rollups WHERE series_id = ? AND res > ?",
                (sid, tiers[-1] if tiers else -1),
            ).fetchone()
            if row[0] is None:
                return tiers
            tiers.append(int(row[0]))

    def _tier_for(self, step: float) -> int | None:
        if step < 60 or step % 60:
            return None
        fits = [res for res in self.tiers if res <= step and step % res == 0]
        return max(fits) if fits else None

    def _query(self, query: Query) -> list[Point]:
        conn = self._db.connect()
        ids = matching_series(conn, query.metric, query.match)
        if not ids:
            return []
        first = math.floor(query.start / query.step)
        last = math.ceil(query.end / query.step)
        res = self._tier_for(query.step)
        if res is None:
            return query_raw(conn, ids, query, first, last)
        return query_rollups(conn, ids, query, res, first, last)

    def _label_values(self, metric: str, label: str, start: float, end: float) -> list[str]:
        res = max(self.tiers) if self.tiers else None
        return label_values(self._db.connect(), metric, label, start, end, res)

    def _counts(self) -> dict[str, Any]:
        conn = self._db.connect()
        size = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                size += os.path.getsize(f"{self.path}{suffix}")
        return {
            "db_bytes": size,
            "series": conn.execute("SELECT count(*) FROM series").fetchone()[0],
            "raw_chunks": conn.execute("SELECT count(*) FROM chunks").fetchone()[0],
            "rollup_rows": conn.execute("SELECT count(*) FROM rollups").fetchone()[0],
        }
