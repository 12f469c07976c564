"""Step windows from stored rows: merged sketch percentiles from rollups, exact ones from raw chunks.

points = query_rollups(conn, series_ids, Query("response_time_ms", start, end, step=3600), 3600, first, last)
points = query_raw(conn, series_ids, query, first, last)   # steps that are no multiple of a tier

Windows are numbered: window k is [k*step, (k+1)*step); first and last bound the query's windows.
Both run on the store's database thread (tsdb.SQLiteStore._query).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from iros.metrics.sketch import MIN_VALUE
from iros.metrics.store import Point, Query
from iros.metrics.tsdb.encoding import (
    US,
    Floats,
    Ints,
    bucket_values,
    decode_buckets,
    decode_chunk,
    group_starts,
)

# Same cap as Prometheus: beyond this a dashboard cannot draw the points anyway.
MAX_WINDOWS = 11_000
# Dense (window x sketch bucket) matrices are built in blocks of at most this many cells.
_DENSE_CELLS = 4_000_000


def window_stats(
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
    window's [min, max], or the zero value for the zero bucket). Rows as decode_buckets gives them."""
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
            value = np.minimum(np.maximum(bucket_values(code), lo), hi)
            result[q][w0:w1] = np.where(code == 0, np.minimum(np.maximum(lo, 0.0), MIN_VALUE), value)
    return count, result


def points(
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


def query_rollups(
    conn: sqlite3.Connection, ids: list[int], query: Query, res: int, first: int, last: int
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
    n, codes, entry_count = decode_buckets(buckets, counts)
    count, quantiles = window_stats(
        row_window, n, codes, entry_count, n_windows, w_low, w_high, query.quantiles
    )
    return points(
        (windows * step).astype(np.float64), count, w_sum.astype(np.float64), w_low, w_high, quantiles
    )


def query_raw(conn: sqlite3.Connection, ids: list[int], query: Query, first: int, last: int) -> list[Point]:
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
    heads = group_starts(window)
    count = np.diff(np.append(heads, window.size)).astype(np.int64)
    total = np.add.reduceat(values, heads)
    low = values[heads]
    high = values[heads + count - 1]
    # Exact: the value at rank floor(q(n-1)) of the window's sorted values (numpy "lower").
    quantiles = {q: values[heads + np.floor(q * (count - 1)).astype(np.int64)] for q in query.quantiles}
    return points(window[heads] * query.step, count, total, low, high, quantiles)


def matching_series(conn: sqlite3.Connection, metric: str, match: Sequence[tuple[str, str]]) -> list[int]:
    """The ids of the metric's series whose labels include every (name, value) of match."""
    ids = []
    for sid, text in conn.execute("SELECT id, labels FROM series WHERE metric = ?", (metric,)):
        labels = json.loads(text)
        if all(labels.get(name) == value for name, value in match):
            ids.append(int(sid))
    return ids


def label_values(
    conn: sqlite3.Connection, metric: str, label: str, start: float, end: float, res: int | None
) -> list[str]:
    """Distinct values of one label among the metric's series with data in [start, end): rows of the
    coarsest tier `res` show it, or raw chunks where there are no tiers."""
    values: set[str] = set()
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
