"""The rules every cache store enforces, and what both stores share to enforce them the same way.

An entry is live until its own expires_at and until created_at + ttl_seconds, whichever comes first (so a
lowered TTL applies to the entries already stored). After a put, while there are more than max_entries
entries or their sizes (CacheEntry.size) add up to more than max_memory_bytes, the entry that the policy
ranks first goes: LRU, least recently hit (or stored); LFU, fewest hits, the least recently hit of those
first. An entry larger than max_memory_bytes alone is not stored. Counters: evictions by the limit that
forced them ("entries", "memory") and by the policy that chose them ("lru", "lfu"), expirations, puts,
deletes, cleared, hits by kind.

    class MyStore(StoreLimits):
        def __init__(self, ...):
            self.init_limits(max_entries, max_memory_bytes, ttl_seconds, eviction)  # ValueError if bad
        async def set_limits(self, max_entries, max_memory_bytes, ttl_seconds):
            self.apply_limits(max_entries, max_memory_bytes, ttl_seconds)
            ...  # then evict what the new limits require
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from iros.cache.base import CacheEntry, CacheListener
from iros.core.errors import StoreUnavailable

log = logging.getLogger(__name__)

__all__ = ["CacheUnavailable", "Eviction", "StoreLimits"]

Eviction = Literal["lru", "lfu"]
HIT_KINDS = ("exact", "semantic")
COUNTERS = (
    "puts",
    "deletes",
    "cleared",
    "expirations",
    "too_large",
    "evictions:entries",
    "evictions:memory",
    "evictions:lru",
    "evictions:lfu",
    "hits:exact",
    "hits:semantic",
)

# CacheEntry's stored fields, in the order of the SQLite columns (the embedding last).
ENTRY_FIELDS = (
    "key",
    "namespace",
    "context",
    "model",
    "prompt",
    "body",
    "created_at",
    "expires_at",
    "completion_tokens",
    "prompt_tokens",
    "upstream_ms",
    "hits",
    "last_hit_at",
    "embedding",
)


class CacheUnavailable(StoreUnavailable):
    """The cache store cannot answer now (Redis down, database unwritable); bypass the cache."""


# ---------------------------------------------------------------------------------- shared rules


class StoreLimits:
    """The limits a store enforces, checked the same way at construction and by set_limits."""

    max_entries: int
    max_memory_bytes: int
    ttl_seconds: float | None
    eviction: Eviction

    def init_limits(
        self, max_entries: int, max_memory_bytes: int, ttl_seconds: float | None, eviction: Eviction
    ) -> None:
        if eviction not in ("lru", "lfu"):
            raise ValueError(f"eviction must be 'lru' or 'lfu', not {eviction!r}")
        self.eviction = eviction
        self.apply_limits(max_entries, max_memory_bytes, ttl_seconds)

    def apply_limits(self, max_entries: int, max_memory_bytes: int, ttl_seconds: float | None) -> None:
        if max_entries < 1 or max_memory_bytes < 1:
            raise ValueError("max_entries and max_memory_bytes must be at least 1")
        if ttl_seconds is not None and not ttl_seconds > 0:
            raise ValueError(f"ttl_seconds must be above 0 (or None), not {ttl_seconds!r}")
        self.max_entries, self.max_memory_bytes, self.ttl_seconds = max_entries, max_memory_bytes, ttl_seconds

    def limits_stats(self) -> dict[str, Any]:
        return {
            "max_entries": self.max_entries,
            "max_memory_bytes": self.max_memory_bytes,
            "ttl_seconds": self.ttl_seconds,
            "eviction": self.eviction,
        }


def check_hit_kind(kind: str) -> None:
    if kind not in HIT_KINDS:
        raise ValueError(f"hit kind must be one of {HIT_KINDS}, not {kind!r}")


def deadline_of(entry: CacheEntry, ttl_seconds: float | None) -> float | None:
    """When the entry stops being live: its own expires_at or its TTL, whichever comes first."""
    by_ttl = entry.created_at + ttl_seconds if ttl_seconds is not None else None
    if entry.expires_at is None:
        return by_ttl
    return entry.expires_at if by_ttl is None else min(entry.expires_at, by_ttl)


def is_expired(entry: CacheEntry, ttl_seconds: float | None, now: float) -> bool:
    when = deadline_of(entry, ttl_seconds)
    return when is not None and now >= when


def recency_of(entry: CacheEntry) -> float:
    return max(entry.last_hit_at, entry.created_at)


def embedding_bytes(entry: CacheEntry) -> bytes | None:
    if entry.embedding is None:
        return None
    return np.ascontiguousarray(entry.embedding, dtype="<f4").tobytes()


def embedding_of(data: bytes | None) -> npt.NDArray[np.float32] | None:
    if not data:
        return None
    vector: npt.NDArray[np.float32] = np.frombuffer(data, dtype="<f4").astype(np.float32)
    return vector


def stats_doc(counters: dict[str, int], **extra: Any) -> dict[str, Any]:
    c = {name: int(counters.get(name, 0)) for name in COUNTERS}
    return {
        **extra,
        "puts": c["puts"],
        "deletes": c["deletes"],
        "cleared": c["cleared"],
        "expirations": c["expirations"],
        "too_large": c["too_large"],
        "evictions": {"entries": c["evictions:entries"], "memory": c["evictions:memory"]},
        "evictions_by_policy": {"lru": c["evictions:lru"], "lfu": c["evictions:lfu"]},
        "hits": {kind: c[f"hits:{kind}"] for kind in HIT_KINDS},
    }


def tell_added(listener: CacheListener | None, entry: CacheEntry) -> None:
    if listener is not None:
        try:
            listener.added(entry)
        except Exception:  # a listener's bug must not undo the store's change
            log.exception("cache listener failed on added(%s)", entry.key)


def tell_removed(listener: CacheListener | None, key: str) -> None:
    if listener is not None:
        try:
            listener.removed(key)
        except Exception:
            log.exception("cache listener failed on removed(%s)", key)


class LRUOrder:
    """Keys from least to most recently used."""

    def __init__(self) -> None:
        self._keys: OrderedDict[str, None] = OrderedDict()

    @staticmethod
    def rank(entry: CacheEntry) -> tuple[float, ...]:
        return (recency_of(entry),)

    def add(self, entry: CacheEntry) -> None:
        self._keys[entry.key] = None
        self._keys.move_to_end(entry.key)

    touch = add

    def discard(self, key: str) -> None:
        self._keys.pop(key, None)

    def victims(self) -> Iterator[str]:
        return iter(self._keys)


class LFUOrder:
    """Keys by hits, fewest first; among equal hits, least recently used first."""

    def __init__(self) -> None:
        self._buckets: dict[int, dict[str, None]] = {}  # hits -> keys in order of their last use
        self._hits: dict[str, int] = {}

    @staticmethod
    def rank(entry: CacheEntry) -> tuple[float, ...]:
        return (entry.hits, recency_of(entry))

    def add(self, entry: CacheEntry) -> None:
        self.discard(entry.key)
        self._buckets.setdefault(entry.hits, {})[entry.key] = None
        self._hits[entry.key] = entry.hits

    touch = add

    def discard(self, key: str) -> None:
        hits = self._hits.pop(key, None)
        if hits is not None:
            bucket = self._buckets[hits]
            del bucket[key]
            if not bucket:
                del self._buckets[hits]

    def victims(self) -> Iterator[str]:
        if not self._buckets:
            return
        low = min(self._buckets)
        yield from self._buckets[low]
        # Reached only when the caller skipped every key of the lowest bucket (the one just stored).
        for hits in sorted(self._buckets):
            if hits != low:
                yield from self._buckets[hits]
