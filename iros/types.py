"""The seams: small protocols with several implementations each."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from iros.spans import Spans


@dataclass(slots=True)
class Completion:
    """A whole (non-streamed) completion: the bytes as the model server sent them, and their parse."""

    body: bytes
    data: dict[str, Any]


@dataclass(slots=True)
class Readiness:
    ready: bool
    detail: str


class Backend(Protocol):
    """Turns one chat-completion payload into a completion. Raises UpstreamError on failure.

    `stream` yields the data of each server-sent event (the JSON after "data: "), and ends without
    error only once the model server said [DONE]: a stream cut short raises UpstreamError("truncated").
    Nothing is sent upstream until the first item is awaited, so a caller can retry until then.
    """

    async def complete(self, payload: dict[str, Any], spans: Spans) -> Completion: ...

    def stream(self, payload: dict[str, Any], spans: Spans) -> AsyncIterator[bytes]: ...

    async def ready(self) -> Readiness: ...

    async def aclose(self) -> None: ...


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


class StoreUnavailable(Exception):
    """The store cannot answer now (Prometheus down, database unreadable); the message says why."""


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


class Embedder(Protocol):
    """Texts to unit-length float32 vectors (cosine similarity is then a dot product)."""

    name: str
    dim: int

    async def start(self) -> None:
        """Load the model or check the endpoint; the semantic cache waits for it, the exact one does not."""
        ...

    async def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        """One row per text, shape (len(texts), dim). Concurrent calls may be batched together."""
        ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class CacheEntry:
    """One cached answer. `key` is the exact key; `context` scopes semantic matches (everything in the
    request except the last user turn, plus namespace and model); `prompt` is that last user turn."""

    key: str
    namespace: str
    context: str
    model: str
    prompt: str
    body: bytes  # the completion as a whole JSON object (replayed as SSE chunks for streams)
    created_at: float
    expires_at: float | None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    upstream_ms: float = 0.0  # what the model server took: the time a hit saves
    hits: int = 0
    last_hit_at: float = 0.0
    embedding: npt.NDArray[np.float32] | None = None

    @property
    def size(self) -> int:
        """Bytes this entry holds, for max_memory_mb."""
        vector = self.embedding.nbytes if self.embedding is not None else 0
        return len(self.body) + len(self.prompt) + len(self.key) + len(self.context) + vector + 200


class CacheStore(Protocol):
    """Where cache entries live: SQLite in one process, Redis shared by several replicas.

    The store enforces TTL, max entries and max memory with its eviction policy (LRU or LFU), and
    reports every entry added or removed (here or, for Redis, by another replica) to `listener`, so the
    caller keeps its vector index in step.
    """

    name: str

    async def start(self, listener: CacheListener) -> None: ...

    async def get(self, key: str) -> CacheEntry | None:
        """The live entry under this exact key (None if absent or expired)."""
        ...

    async def get_many(self, keys: list[str]) -> list[CacheEntry | None]: ...

    async def put(self, entry: CacheEntry) -> None:
        """Add or replace; evicts what the limits require."""
        ...

    async def record_hit(self, key: str, kind: str) -> None:
        """Hit statistics and recency/frequency for eviction; kind is "exact" or "semantic"."""
        ...

    async def delete(self, key: str) -> bool: ...

    async def clear(self, namespace: str | None = None) -> int: ...

    def entries(self) -> AsyncIterator[CacheEntry]:
        """Every live entry with its embedding (to rebuild the index on start)."""
        ...

    async def set_limits(
        self, max_entries: int, max_memory_bytes: int, ttl_seconds: float | None
    ) -> None: ...

    async def stats(self) -> dict[str, Any]:
        """entries, bytes, hits, misses-free counters: evictions (by reason), expirations, ..."""
        ...

    async def close(self) -> None: ...


class CacheListener(Protocol):
    def added(self, entry: CacheEntry) -> None: ...

    def removed(self, key: str) -> None: ...


@dataclass(slots=True)
class Notification:
    """One message to one channel: a group of alerts that changed together (Alertmanager's model).

    Each alert is Alert.to_json() plus "am": the alert as Alertmanager shows it.
    """

    receiver: str  # the channel's name
    status: str  # "firing" if any alert in it fires, else "resolved"
    group_key: str
    group_labels: dict[str, str]
    alerts: list[dict[str, Any]]
    external_url: str = ""
    test: bool = False


class ChannelError(Exception):
    """A channel could not deliver; `retryable` says whether trying again later may work."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class Channel(Protocol):
    """Delivers alert notifications: email, Slack, a webhook, an Alertmanager. Raises ChannelError.

    Secrets (passwords, webhook URLs) are read from the environment when the channel is built and never
    appear in `describe()`, errors or logs.
    """

    name: str
    type: str

    async def send(self, notification: Notification) -> None: ...

    def describe(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...
