"""How db.py lays samples and rollup rows out as bytes: raw chunks and sketch buckets as arrays.

blob = encode_chunk(ts_us, values)        # sorted microsecond timestamps and values -> chunks.data
ts_us, values = decode_chunk(blob, n)
rows = RollupRows.of_samples(group, values, bucket_codes(values))   # one row per group
buckets, counts = rows.encode()          # per row, the rollups.buckets and rollups.counts blobs
sketch_of_row(count, total, low, high, buckets, counts)             # one stored row -> Sketch

The formats are described in db.py's docstring (the schema); every row holds at least one entry.
"""

from __future__ import annotations

import math
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

# Private on purpose: the rollup encoder must place values in exactly the buckets Sketch.add would.
from iros.metrics.sketch import GAMMA, LOG_GAMMA, MIN_VALUE, Sketch

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]

US = 1_000_000  # microseconds per second: timestamps are stored as integer microseconds


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


def dense_groups(starts: Ints, size: int) -> Ints:
    """Group numbers 0, 1, ... for `size` sorted items whose groups begin at `starts`."""
    return np.repeat(np.arange(starts.size, dtype=np.int64), np.diff(np.append(starts, size)))


def group_starts(keys: npt.NDArray[Any]) -> Ints:
    """Indices where a run of equal (sorted) keys begins."""
    if keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1]))).astype(np.int64)


# Sketch buckets are stored as uint16 codes: 0 is Sketch's zero bucket (values at or below
# MIN_VALUE), code c >= 1 is log bucket c + CODE_BASE. Every float64 above MIN_VALUE fits.
CODE_BASE = math.ceil(math.log(MIN_VALUE) / LOG_GAMMA) - 1
if math.ceil(math.log(sys.float_info.max) / LOG_GAMMA) - CODE_BASE >= 1 << 16:
    raise ImportError("iros.metrics.sketch's accuracy needs more log buckets than uint16 codes can name")


def bucket_codes(values: Floats) -> Ints:
    """Each value's stored bucket code, the log bucket computed exactly as Sketch.add does."""
    codes = np.zeros(values.size, dtype=np.int64)
    positive = values > MIN_VALUE
    codes[positive] = np.ceil(np.log(values[positive]) / LOG_GAMMA).astype(np.int64) - CODE_BASE
    return codes


def bucket_values(codes: Ints) -> Floats:
    """The value Sketch.quantile reports for a log bucket: its midpoint, 2 gamma^i / (gamma + 1)."""
    return 2 * GAMMA ** (codes + CODE_BASE).astype(np.float64) / (GAMMA + 1)


@dataclass(slots=True)
class RollupRows:
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
    def of_samples(cls, group: Ints, values: Floats, codes: Ints) -> RollupRows:
        """Rows from samples whose row numbers (0, 1, ... with none skipped) are given sorted."""
        starts = group_starts(group)
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
    def decode(cls, stored: Sequence[tuple[Any, ...]]) -> RollupRows:
        """From rollup rows as selected: (count, sum, min, max, buckets, counts)."""
        count, total, low, high, buckets, counts = zip(*stored, strict=True)
        n, codes, entry_count = decode_buckets(buckets, counts)
        return cls(
            np.array(count, dtype=np.int64),
            np.array(total, dtype=np.float64),
            np.array(low, dtype=np.float64),
            np.array(high, dtype=np.float64),
            np.repeat(np.arange(n.size, dtype=np.int64), n),
            codes.astype(np.int64),
            entry_count.astype(np.int64),
        )

    def coarsen(self, group: Ints) -> RollupRows:
        """Rows combined by `group` (new row number per row, sorted, none skipped)."""
        starts = group_starts(group)
        rows = group[self.entry_row]
        keys = rows * (1 << 16) + self.entry_code
        order = np.argsort(keys, kind="stable")
        heads = group_starts(keys[order])
        return RollupRows(
            np.add.reduceat(self.count, starts),
            np.add.reduceat(self.sum, starts),
            np.minimum.reduceat(self.min, starts),
            np.maximum.reduceat(self.max, starts),
            rows[order][heads],
            self.entry_code[order][heads],
            np.add.reduceat(self.entry_count[order], heads),
        )

    def merge(self, other: RollupRows, into: Ints) -> None:
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
        heads = group_starts(keys[order])
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


def decode_buckets(
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
    _, codes, entry_count = decode_buckets([buckets], [counts])
    positive = codes > 0
    return Sketch.from_buckets(
        codes[positive].astype(np.int64) + CODE_BASE,
        entry_count[positive].astype(np.int64),
        zeros=int(entry_count[~positive].sum()),
        count=count,
        total=total,
        low=low,
        high=high,
    )
