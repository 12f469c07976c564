"""A mergeable quantile sketch: logarithmic buckets with a fixed relative accuracy (the DDSketch idea).

sketch = Sketch.of(np.array([1.2, 3.4, 5.6]))      # build from a batch, vectorised
sketch.merge(other)                                 # windows combine exactly: counts add
sketch.quantile(0.95)                               # within 1% of the true value at that rank
Sketch.from_buckets(index, counts, ...)             # back from the time-series store's rows

Rollups store one sketch per window, so a 1-hour P95 is computed from the merged buckets of its
minutes, never by averaging their P95s. Buckets are vectorised with numpy: the DDSketch library adds
one value per Python call, which would cap ingest far below what the store must take.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

RELATIVE_ACCURACY = 0.01
GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
LOG_GAMMA = math.log(GAMMA)
# Values at or below MIN_VALUE share the zero bucket; metrics here are durations, percents, counts.
MIN_VALUE = 1e-3

Floats = npt.NDArray[np.float64]


class Sketch:
    __slots__ = ("_counts", "_offset", "count", "max", "min", "sum", "zeros")

    def __init__(self) -> None:
        self._counts: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)
        self._offset = 0  # bucket index of _counts[0]
        self.zeros = 0
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    @classmethod
    def of(cls, values: Floats | list[float]) -> Sketch:
        sketch = cls()
        sketch.add(np.asarray(values, dtype=np.float64))
        return sketch

    def add(self, values: Floats) -> None:
        if values.size == 0:
            return
        self.count += int(values.size)
        self.sum += float(values.sum())
        self.min = min(self.min, float(values.min()))
        self.max = max(self.max, float(values.max()))
        positive = values[values > MIN_VALUE]
        self.zeros += int(values.size - positive.size)
        if positive.size:
            index = np.ceil(np.log(positive) / LOG_GAMMA).astype(np.int64)
            low = int(index.min())
            counts = np.bincount(index - low)
            self._add_counts(low, counts)

    def _add_counts(self, low: int, counts: npt.NDArray[np.int64]) -> None:
        if self._counts.size == 0:
            self._counts, self._offset = counts.astype(np.int64), low
            return
        start = min(low, self._offset)
        end = max(low + counts.size, self._offset + self._counts.size)
        if start != self._offset or end != self._offset + self._counts.size:
            grown = np.zeros(end - start, dtype=np.int64)
            grown[self._offset - start : self._offset - start + self._counts.size] = self._counts
            self._counts, self._offset = grown, start
        self._counts[low - start : low - start + counts.size] += counts

    def merge(self, other: Sketch) -> None:
        if other.count == 0:
            return
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.zeros += other.zeros
        if other._counts.size:
            self._add_counts(other._offset, other._counts)

    def quantile(self, q: float) -> float | None:
        """The value at 0-based rank floor(q * (count - 1)), within RELATIVE_ACCURACY of the truth."""
        if self.count == 0:
            return None
        rank = math.floor(q * (self.count - 1))
        if rank < self.zeros:
            return min(max(self.min, 0.0), MIN_VALUE)
        cumulative = np.cumsum(self._counts)
        i = int(np.searchsorted(cumulative, rank - self.zeros, side="right"))
        value = 2 * GAMMA ** (self._offset + i) / (GAMMA + 1)
        return min(max(value, self.min), self.max)

    def quantiles(self, qs: tuple[float, ...]) -> dict[float, float | None]:
        return {q: self.quantile(q) for q in qs}

    @property
    def avg(self) -> float | None:
        return self.sum / self.count if self.count else None

    def to_data(self) -> list[Any]:
        """Plain data (JSON) that from_data() turns back into an equal sketch: another worker's frame."""
        return [self._offset, self._counts.tolist(), self.zeros, self.count, self.sum, self.min, self.max]

    @classmethod
    def from_data(cls, data: list[Any]) -> Sketch:
        sketch = cls()
        offset, counts, sketch.zeros, sketch.count, sketch.sum, low, high = data
        sketch.min, sketch.max = float(low), float(high)
        sketch._counts, sketch._offset = np.asarray(counts, dtype=np.int64), int(offset)
        return sketch

    @classmethod
    def from_buckets(
        cls,
        index: npt.NDArray[np.int64],
        counts: npt.NDArray[np.int64],
        *,
        zeros: int,
        count: int,
        total: float,
        low: float,
        high: float,
    ) -> Sketch:
        """A sketch from stored buckets: bucket indices (ceil(log(v) / LOG_GAMMA)) and their counts."""
        sketch = cls()
        sketch.zeros, sketch.count, sketch.sum, sketch.min, sketch.max = zeros, count, total, low, high
        if index.size:
            low_index = int(index.min())
            dense = np.zeros(int(index.max()) - low_index + 1, dtype=np.int64)
            np.add.at(dense, index - low_index, counts)
            sketch._counts, sketch._offset = dense, low_index
        return sketch
