"""The cache's seams: where entries live (CacheStore) and what turns text into vectors (Embedder)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

# Characters of a text an embedder reads at most: a local model reads at most its window (256 word
# pieces for MiniLM, seldom more than 1,500 characters), and cutting first keeps tokenizing an 8 MB prompt
# from costing what the whole text would.
MAX_TEXT_CHARS = 4096


class EmbedderError(Exception):
    """The embedder cannot answer: not started, closed, overloaded, timed out, or its server failed."""


class EmbedderBusy(EmbedderError):
    """The embedder is behind: an embedding now would wait longer than its `skip_after_ms` (the cache
    skips the semantic lookup instead of queueing it)."""


@dataclass(frozen=True, slots=True)
class Encoded:
    """Unit vectors, one row per text, and where the model gives them each text's token embeddings
    (tokens, dim), from the same forward pass."""

    vectors: npt.NDArray[np.float32]
    tokens: list[npt.NDArray[np.float32]] | None = None

    def __len__(self) -> int:
        return len(self.vectors)

    def rows(self, start: int, end: int) -> Encoded:
        return Encoded(self.vectors[start:end], self.tokens[start:end] if self.tokens is not None else None)


class Embedder(Protocol):
    """Texts to unit-length float32 vectors (cosine similarity is then a dot product)."""

    name: str
    dim: int
    max_batch: int  # texts per model call at most; the tuning API and the optimizer change it live

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
