"""What every metrics store is: the history of the catalog's series (SQLite or Prometheus)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

# One series: its metric name and its labels as sorted (name, value) pairs.
SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(slots=True)
class Samples:
    """Samples of one series gathered since the last flush: unix-second timestamps and values
    (lists, or float64 arrays: the collector hands over the arrays it computed)."""

    ts: list[float] | npt.NDArray[np.float64]
    values: list[float] | npt.NDArray[np.float64]


@dataclass(slots=True)
class Point:
    """One step window of a series (all matching series merged): start time and its statistics."""

    ts: float
    count: int
    sum: float
    min: float | None
    max: float | None
    quantiles: dict[float, float | None]

    @property
    def avg(self) -> float | None:
        return self.sum / self.count if self.count else None


@dataclass(frozen=True, slots=True)
class Query:
    metric: str  # a name from catalog.METRICS
    start: float  # unix seconds, inclusive
    end: float  # unix seconds, exclusive
    step: float  # seconds per window; windows are aligned to multiples of step
    match: tuple[tuple[str, str], ...] = ()  # label equality filters
    quantiles: tuple[float, ...] = (0.5, 0.95, 0.99)


class MetricsStore(Protocol):
    """History of the catalog's series. Writes are queued and flushed in the background."""

    name: str

    async def start(self) -> None: ...

    def append(self, batch: dict[SeriesKey, Samples]) -> None:
        """Queue samples for the next flush. Never blocks the caller."""
        ...

    async def flush(self) -> None:
        """Write everything queued so far (tests, shutdown)."""
        ...

    async def query(self, query: Query) -> list[Point]:
        """One Point per step window that holds data, oldest first. Raises StoreUnavailable."""
        ...

    async def label_values(self, metric: str, label: str, start: float, end: float) -> list[str]: ...

    async def close(self) -> None: ...
