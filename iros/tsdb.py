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
      are exact. buckets and counts are the bucket's Sketch (iros.sketch): buckets holds one
      little-endian uint16 code per non-empty sketch bucket, ascending (0 is the zero bucket,
      values at or below MIN_VALUE; c >= 1 is log bucket c + _CODE_BASE); counts holds each one's
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

import asyncio
import contextlib
import json
import logging
import math
import os
import sqlite3
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

# Private on purpose: the rollup encoder must place values in exactly the buckets Sketch.add would.
from iros.sketch import GAMMA, LOG_GAMMA, MIN_VALUE, Sketch
from iros.types import Point, Query, Samples, SeriesKey, StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]

SCHEMA_VERSION = 1
US = 1_000_000  # microseconds per second: timestamps are stored as integer microseconds
# Same cap as Prometheus: beyond this a dashboard cannot draw the points anyway.
MAX_WINDOWS = 11_000
# Dense (window x sketch bucket) matrices are built in blocks of at most this many cells.
_DENSE_CELLS = 4_000_000
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


def _shuffle(array: npt.NDArray[Any]) -> bytes:
    return array.view(np.uint8).reshape(-1, array.itemsize).T.tobytes()


def _unshuffle(data: bytes, n: int, dtype: type[np.generic]) -> npt.NDArray[Any]:
    size = np.dtype(dtype).itemsize
    planes = np.frombuffer(data, dtype=np.uint8, count=n * size).reshape(size, n)
    return np.ascontiguousarray(planes.T).view(dtype).reshape(n)


def encode_chunk(ts_us: Ints, values: Floats) -> bytes:
    """Timestamps (sorted, microseconds) and values -> the chunks.data blob."""
    deltas = np.diff(ts_us, prepend=ts_us[:1])
    head = np.array([ts_us[0]], dtype=np.int64).tobytes()
    return zlib.compress(head + _shuffle(deltas) + _shuffle(values.astype(np.float64)), 1)


def decode_chunk(data: bytes, count: int) -> tuple[Ints, Floats]:
    raw = zlib.decompress(data)
    first = int(np.frombuffer(raw, dtype=np.int64, count=1)[0])
    deltas = _unshuffle(raw[8 : 8 + 8 * count], count, np.int64)
    values = _unshuffle(raw[8 + 8 * count :], count, np.float64)
    ts_us: Ints = np.cumsum(deltas) + first
    return ts_us, values


def _dense_groups(starts: Ints, size: int) -> Ints:
    """Group numbers 0, 1, ... for `size` sorted items whose groups begin at `starts`."""
    return np.repeat(np.arange(starts.size, dtype=np.int64), np.diff(np.append(starts, size)))


def _group_starts(keys: npt.NDArray[Any]) -> Ints:
    """Indices where a run of equal (sorted) keys begins."""
    if keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1]))).astype(np.int64)


# Sketch buckets are stored as uint16 codes: 0 is Sketch's zero bucket (values at or below
# MIN_VALUE), code c >= 1 is log bucket c + _CODE_BASE. Every float64 above MIN_VALUE fits.
_CODE_BASE = math.ceil(math.log(MIN_VALUE) / LOG_GAMMA) - 1
if math.ceil(math.log(sys.float_info.max) / LOG_GAMMA) - _CODE_BASE >= 1 << 16:
    raise ImportError("iros.sketch's accuracy needs more log buckets than uint16 codes can name")


def _bucket_codes(values: Floats) -> Ints:
    """Each value's stored bucket code, the log bucket computed exactly as Sketch.add does."""
    codes = np.zeros(values.size, dtype=np.int64)
    positive = values > MIN_VALUE
    codes[positive] = np.ceil(np.log(values[positive]) / LOG_GAMMA).astype(np.int64) - _CODE_BASE
    return codes


def _bucket_values(codes: Ints) -> Floats:
    """The value Sketch.quantile reports for a log bucket: its midpoint, 2 gamma^i / (gamma + 1)."""
    return 2 * GAMMA ** (codes + _CODE_BASE).astype(np.float64) / (GAMMA + 1)


@dataclass(slots=True)
class _Rows:
    """Rollup rows as arrays. Per row: count, sum, min, max. Per non-empty sketch bucket ("entry"):
    its row, bucket code and count, ordered by row then code."""

    count: Ints
    sum: Floats
    min: Floats
    max: Floats
    entry_row: Ints
    entry_code: Ints
    entry_count: Ints

    @classmethod
    def of_samples(cls, group: Ints, values: Floats, codes: Ints) -> _Rows:
        """Rows from samples whose row numbers (0, 1, ... with none skipped) are given sorted."""
        starts = _group_starts(group)
        span = int(codes.max()) + 1
        keys, counts = np.unique(group * span + codes, return_counts=True)
        return cls(
            np.diff(np.append(starts, group.size)).astype(np.int64),
            np.add.reduceat(values, starts),
            np.minimum.reduceat(values, starts),
            np.maximum.reduceat(values, starts),
            keys // span,
            keys % span,
            counts.astype(np.int64),
        )

    @classmethod
    def decode(cls, stored: Sequence[tuple[Any, ...]]) -> _Rows:
        """From rollup rows as selected: (count, sum, min, max, buckets, counts)."""
        count, total, low, high, buckets, counts = zip(*stored, strict=True)
        n, codes, entry_count = _decode_buckets(buckets, counts)
        return cls(
            np.array(count, dtype=np.int64),
            np.array(total, dtype=np.float64),
            np.array(low, dtype=np.float64),
            np.array(high, dtype=np.float64),
            np.repeat(np.arange(n.size, dtype=np.int64), n),
            codes.astype(np.int64),
            entry_count.astype(np.int64),
        )

    def coarsen(self, group: Ints) -> _Rows:
        """Rows combined by `group` (new row number per row, sorted, none skipped)."""
        starts = _group_starts(group)
        rows = group[self.entry_row]
        keys = rows * (1 << 16) + self.entry_code
        order = np.argsort(keys, kind="stable")
        heads = _group_starts(keys[order])
        return _Rows(
            np.add.reduceat(self.count, starts),
            np.add.reduceat(self.sum, starts),
            np.minimum.reduceat(self.min, starts),
            np.maximum.reduceat(self.max, starts),
            rows[order][heads],
            self.entry_code[order][heads],
            np.add.reduceat(self.entry_count[order], heads),
        )

    def merge(self, other: _Rows, into: Ints) -> None:
        """Add other's rows into ours: other's row i joins our row into[i] (Sketch.merge, per row)."""
        np.add.at(self.count, into, other.count)
        np.add.at(self.sum, into, other.sum)
        np.minimum.at(self.min, into, other.min)
        np.maximum.at(self.max, into, other.max)
        rows = np.concatenate([self.entry_row, into[other.entry_row]])
        codes = np.concatenate([self.entry_code, other.entry_code])
        counts = np.concatenate([self.entry_count, other.entry_count])
        keys = rows * (1 << 16) + codes
        order = np.argsort(keys, kind="stable")
        heads = _group_starts(keys[order])
        self.entry_row = rows[order][heads]
        self.entry_code = codes[order][heads]
        self.entry_count = np.add.reduceat(counts[order], heads)

    def encode(self) -> tuple[list[bytes], list[bytes]]:
        """Per row, the buckets blob and the counts blob (see the schema)."""
        n_rows = self.count.size
        n = np.bincount(self.entry_row, minlength=n_rows)
        ends = np.cumsum(n)
        starts = ends - n
        codes = self.entry_code.astype("<u2").tobytes()  # bytes slice faster than memoryviews
        bucket_blobs = [codes[a:b] for a, b in zip((2 * starts).tolist(), (2 * ends).tolist(), strict=True)]
        # Each row's counts take the narrowest width that holds its largest count.
        largest = np.maximum.reduceat(self.entry_count, starts)  # every row has an entry
        width = np.select([largest < 1 << 8, largest < 1 << 16, largest < 1 << 32], [1, 2, 4], 8)
        widths = np.unique(width).tolist()
        if len(widths) == 1:  # the usual case: one buffer, sliced like the codes
            w = widths[0]
            data = self.entry_count.astype(f"<u{w}").tobytes()
            count_blobs = [data[a:b] for a, b in zip((w * starts).tolist(), (w * ends).tolist(), strict=True)]
            return bucket_blobs, count_blobs
        count_blobs = [b""] * n_rows
        for w in widths:
            rows = np.flatnonzero(width == w)
            data = self.entry_count[width[self.entry_row] == w].astype(f"<u{w}").tobytes()
            row_ends = np.cumsum(n[rows]) * w
            row_starts = row_ends - n[rows] * w
            for r, a, b in zip(rows.tolist(), row_starts.tolist(), row_ends.tolist(), strict=True):
                count_blobs[r] = data[a:b]
        return bucket_blobs, count_blobs


def _decode_buckets(
    buckets: Sequence[bytes], counts: Sequence[bytes]
) -> tuple[Ints, npt.NDArray[np.uint16], npt.NDArray[Any]]:
    """Many rows' buckets and counts blobs at once: per row its number of entries; per entry (in row
    order) its bucket code and its count (unsigned, of any width)."""
    n_rows = len(buckets)
    n = np.fromiter(map(len, buckets), dtype=np.int64, count=n_rows) // 2
    codes = np.frombuffer(b"".join(buckets), dtype="<u2")
    width = np.fromiter(map(len, counts), dtype=np.int64, count=n_rows) // np.maximum(n, 1)
    widths = np.unique(width).tolist()
    if len(widths) == 1:  # the usual case: one frombuffer, no copy
        return n, codes, np.frombuffer(b"".join(counts), dtype=f"<u{widths[0]}")
    entry_count = np.zeros(codes.size, dtype=np.int64)
    entry_width = np.repeat(width, n)
    for w in widths:
        data = b"".join(blob for blob, bw in zip(counts, width.tolist(), strict=True) if bw == w)
        entry_count[entry_width == w] = np.frombuffer(data, dtype=f"<u{w}")
    return n, codes, entry_count


def sketch_of_row(count: int, total: float, low: float, high: float, buckets: bytes, counts: bytes) -> Sketch:
    """One stored rollup row as a Sketch."""
    _, codes, entry_count = _decode_buckets([buckets], [counts])
    positive = codes > 0
    return Sketch.from_buckets(
        codes[positive].astype(np.int64) + _CODE_BASE,
        entry_count[positive].astype(np.int64),
        zeros=int(entry_count[~positive].sum()),
        count=count,
        total=total,
        low=low,
        high=high,
    )


def _window_stats(
    row_window: Ints,
    n: Ints,
    codes: npt.NDArray[np.uint16],
    entry_count: npt.NDArray[Any],
    n_windows: int,
    low: Floats,
    high: Floats,
    qs: Sequence[float],
) -> tuple[Ints, dict[float, Floats]]:
    """Count and quantiles per window, from the merged sketches of the window's rows: all rows'
    bucket counts summed into a dense (window x bucket) table, then Sketch.quantile's rule for every
    window at once (the value at rank floor(q(count-1)) is its bucket's midpoint, clamped to the
    window's [min, max], or the zero value for the zero bucket). Rows as _decode_buckets gives them."""
    ends = np.cumsum(n)
    low_code = int(codes[ends - n].min())  # every row has an entry, its lowest code first
    width = int(codes[ends - 1].max()) - low_code + 1
    # Each entry's cell in the flattened table: one np.repeat rather than a gather per entry.
    keys = np.repeat(row_window * width - low_code, n) + codes
    weights = entry_count.astype(np.float64)
    count = np.zeros(n_windows, dtype=np.int64)
    result = {q: np.zeros(n_windows) for q in qs}
    block = max(1, _DENSE_CELLS // width)  # windows per table, so a wide value range stays bounded
    for w0 in range(0, n_windows, block):
        w1 = min(n_windows, w0 + block)
        if w1 - w0 == n_windows:
            cells = np.bincount(keys, weights=weights, minlength=n_windows * width)
        else:
            inside = (keys >= w0 * width) & (keys < w1 * width)
            cells = np.bincount(
                keys[inside] - w0 * width, weights=weights[inside], minlength=(w1 - w0) * width
            )
        # Running count over the flattened table: a window's bucket for a rank is one searchsorted,
        # offset by the count of the windows before it.
        cumulative = np.cumsum(cells)
        at_end = cumulative[width - 1 :: width]
        before = np.concatenate(([0.0], at_end[:-1]))
        count[w0:w1] = np.rint(at_end - before).astype(np.int64)
        first_cell = np.arange(w1 - w0, dtype=np.int64) * width
        lo, hi = low[w0:w1], high[w0:w1]
        for q in qs:
            rank = np.floor(q * (count[w0:w1] - 1))
            i = np.searchsorted(cumulative, before + rank, side="right") - first_cell
            code = low_code + np.clip(i, 0, width - 1)
            value = np.minimum(np.maximum(_bucket_values(code), lo), hi)
            result[q][w0:w1] = np.where(code == 0, np.minimum(np.maximum(lo, 0.0), MIN_VALUE), value)
    return count, result


def _points(
    starts: Floats,
    count: Ints,
    total: Floats,
    low: Floats,
    high: Floats,
    quantiles: dict[float, Floats],
) -> list[Point]:
    qs = list(quantiles)
    columns = [quantiles[q].tolist() for q in qs]
    return [
        Point(ts, c, s, lo, hi, dict(zip(qs, vals, strict=True)))
        for ts, c, s, lo, hi, *vals in zip(
            starts.tolist(),
            count.tolist(),
            total.tolist(),
            low.tolist(),
            high.tolist(),
            *columns,
            strict=True,
        )
    ]


# One series' share of a flush: key, sorted microsecond timestamps, chunk blob, (res, bucket starts, rows).
_Prepared = tuple[SeriesKey, Ints, bytes, list[tuple[int, Ints, _Rows]]]


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
        self.last_error: str | None = None

        self._lock = threading.Lock()
        self._pending: deque[tuple[SeriesKey, Samples]] = deque()
        self._pending_samples = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iros-tsdb")
        self._conn: sqlite3.Connection | None = None  # only touched on the executor's thread
        self._series_ids: dict[SeriesKey, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._closed = False
        self._executor_done = False

    # ---------------------------------------------------------------- the event-loop side

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor_done:
            raise StoreUnavailable(f"metrics store {self.path} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def start(self) -> None:
        try:
            await self._run(self._connect)
        except (sqlite3.Error, OSError) as exc:
            # Keep serving: samples queue (bounded) and the next flush tries again.
            self._report(exc)
        if self._task is None:
            self._task = asyncio.create_task(self._background(), name="iros-tsdb-flush")

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
        try:
            await self._run(self._write, items)
        except (sqlite3.Error, OSError) as exc:
            self._report(exc)
            with self._lock:
                self._pending.extendleft(reversed(items))
                self._pending_samples += sum(len(s.ts) for _, s in items)
                self._trim()
        except Exception:
            log.exception("metrics store %s: could not write %d series; dropped them", self.path, len(items))
            with self._lock:
                self.dropped += sum(len(s.ts) for _, s in items)
        else:
            if self.last_error is not None:
                log.warning("metrics store %s: writing again", self.path)
                self.last_error = None

    def _report(self, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        if self.last_error is None:  # once per outage, not once per second
            log.error(
                "metrics store %s cannot be written (%s); samples stay queued (up to %d) and writes "
                "are retried every %gs",
                self.path,
                message,
                self.max_pending,
                self.flush_interval,
            )
        self.last_error = message

    async def _background(self) -> None:
        last_retention = -math.inf  # a (re)started process enforces retention at once
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.flush_interval)
            try:
                await self.flush()
                if (
                    not self._stop.is_set()
                    and time.monotonic() - last_retention >= self.retention_check_seconds
                ):
                    last_retention = time.monotonic()
                    await self.enforce_retention()
            except Exception:  # the loop must outlive any one failure
                log.exception("metrics store %s: background work failed", self.path)

    async def enforce_retention(self, now: float | None = None) -> dict[str, int]:
        """Delete raw chunks past raw_retention_hours and rollups past retention_days."""
        now = time.time() if now is None else now
        try:
            return await self._run(self._retention, now)
        except (sqlite3.Error, OSError) as exc:
            self._report(exc)
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
            pending = self._pending_samples
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
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            # Not cancelled: a flush cut off mid-way could neither finish nor put its samples back.
            self._stop.set()
            await asyncio.wait([self._task])  # does not raise if the task was cancelled elsewhere
            self._task = None
        await self.flush()
        await self._run(self._disconnect)
        self._executor_done = True
        self._executor.shutdown(wait=True)

    # ---------------------------------------------------------------- the database thread

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            # Both take effect only on a new file, page_size first. 8 KiB pages: ~20% faster rollup
            # inserts than 4 KiB (measured). Incremental auto_vacuum lets retention give pages back.
            conn.execute("PRAGMA page_size = 8192")
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA cache_size = -32000")  # 32 MB
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {version} is newer than this Iros understands ({SCHEMA_VERSION})"
                )
            if version < SCHEMA_VERSION:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA optimize")
            self._conn.close()
            self._conn = None

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
                starts = _group_starts(bucket)
                rows = _Rows.of_samples(_dense_groups(starts, bucket.size), values, _bucket_codes(values))
                row_start = bucket[starts] * finest
                tiers.append((finest, row_start, rows))
                for res in self.tiers[1:]:
                    coarse = row_start // res
                    heads = _group_starts(coarse)
                    tiers.append((res, coarse[heads] * res, rows.coarsen(_dense_groups(heads, coarse.size))))
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
        conn = self._connect()
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
        conn: sqlite3.Connection, sid: int, res: int, starts: Ints, rows: _Rows
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
            rows.merge(_Rows.decode([row[1:] for row in existing]), into)
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
        conn = self._connect()
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

    def _matching_series(
        self, conn: sqlite3.Connection, metric: str, match: Sequence[tuple[str, str]]
    ) -> list[int]:
        ids = []
        for sid, text in conn.execute("SELECT id, labels FROM series WHERE metric = ?", (metric,)):
            labels = json.loads(text)
            if all(labels.get(name) == value for name, value in match):
                ids.append(int(sid))
        return ids

    def _tier_for(self, step: float) -> int | None:
        if step < 60 or step % 60:
            return None
        fits = [res for res in self.tiers if res <= step and step % res == 0]
        return max(fits) if fits else None

    def _query(self, query: Query) -> list[Point]:
        conn = self._connect()
        ids = self._matching_series(conn, query.metric, query.match)
        if not ids:
            return []
        first = math.floor(query.start / query.step)
        last = math.ceil(query.end / query.step)
        res = self._tier_for(query.step)
        if res is None:
            return self._query_raw(conn, ids, query, first, last)
        return self._query_rollups(conn, ids, query, res, first, last)

    def _query_rollups(
        self, conn: sqlite3.Connection, ids: list[int], query: Query, res: int, first: int, last: int
    ) -> list[Point]:
        step = int(query.step)
        marks = ",".join("?" * len(ids))
        # count is not read: the sketch buckets sum to it, and every column read costs (8,640 rows
        # for 30 days of 12 series at 1 h).
        stored = conn.execute(
            f"SELECT bucket_start, sum, min, max, buckets, counts FROM rollups "
            f"WHERE series_id IN ({marks}) AND res = ? AND bucket_start >= ? AND bucket_start < ?",
            (*ids, res, first * step, last * step),
        ).fetchall()
        if not stored:
            return []
        bucket_start, total, low, high, buckets, counts = zip(*stored, strict=True)
        # Windows are numbered from the query's first; only those with rows become points.
        dense = np.array(bucket_start, dtype=np.int64) // step - first
        present = np.bincount(dense, minlength=last - first) > 0
        windows = np.flatnonzero(present) + first
        row_window = (np.cumsum(present) - 1)[dense]
        n_windows = windows.size
        w_sum = np.bincount(row_window, weights=np.array(total, dtype=np.float64), minlength=n_windows)
        w_low = np.full(n_windows, np.inf)
        np.minimum.at(w_low, row_window, np.array(low, dtype=np.float64))
        w_high = np.full(n_windows, -np.inf)
        np.maximum.at(w_high, row_window, np.array(high, dtype=np.float64))
        n, codes, entry_count = _decode_buckets(buckets, counts)
        count, quantiles = _window_stats(
            row_window, n, codes, entry_count, n_windows, w_low, w_high, query.quantiles
        )
        return _points(
            (windows * step).astype(np.float64), count, w_sum.astype(np.float64), w_low, w_high, quantiles
        )

    def _query_raw(
        self, conn: sqlite3.Connection, ids: list[int], query: Query, first: int, last: int
    ) -> list[Point]:
        lo, hi = first * query.step, last * query.step
        marks = ",".join("?" * len(ids))
        rows = conn.execute(
            f"SELECT count, data FROM chunks WHERE series_id IN ({marks}) AND end_ts >= ? AND start_ts < ?",
            (*ids, lo, hi),
        ).fetchall()
        if not rows:
            return []
        decoded = [decode_chunk(data, count) for count, data in rows]
        ts_us = np.concatenate([d[0] for d in decoded])
        values = np.concatenate([d[1] for d in decoded])
        step_us = query.step * US
        if step_us == round(step_us):  # whole microseconds: integer windows, as the rollups bucket
            window = ts_us // round(step_us)
        else:
            window = np.floor(ts_us / step_us).astype(np.int64)
        keep = (window >= first) & (window < last)
        window, values = window[keep], values[keep]
        if window.size == 0:
            return []
        order = np.lexsort((values, window))
        window, values = window[order], values[order]
        heads = _group_starts(window)
        count = np.diff(np.append(heads, window.size)).astype(np.int64)
        total = np.add.reduceat(values, heads)
        low = values[heads]
        high = values[heads + count - 1]
        # Exact: the value at rank floor(q(n-1)) of the window's sorted values (numpy "lower").
        quantiles = {q: values[heads + np.floor(q * (count - 1)).astype(np.int64)] for q in query.quantiles}
        return _points(window[heads] * query.step, count, total, low, high, quantiles)

    def _label_values(self, metric: str, label: str, start: float, end: float) -> list[str]:
        conn = self._connect()
        values: set[str] = set()
        res = max(self.tiers) if self.tiers else None
        for sid, text in conn.execute("SELECT id, labels FROM series WHERE metric = ?", (metric,)):
            value = json.loads(text).get(label)
            if value is None or value in values:
                continue
            if res is not None:
                seen = conn.execute(
                    "SELECT 1 FROM rollups WHERE series_id = ? AND res = ? AND bucket_start > ? "
                    "AND bucket_start < ? LIMIT 1",
                    (sid, res, start - res, end),
                ).fetchone()
            else:
                seen = conn.execute(
                    "SELECT 1 FROM chunks WHERE series_id = ? AND end_ts >= ? AND start_ts < ? LIMIT 1",
                    (sid, start, end),
                ).fetchone()
            if seen:
                values.add(str(value))
        return sorted(values)

    def _counts(self) -> dict[str, Any]:
        conn = self._connect()
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
