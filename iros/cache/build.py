"""The configured cache: its store, and for the semantic part the embedder, index and verifier.

cache = build_cache(settings.cache, data_dir, note_stage)   # app.py; tests and benches alike
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from iros.cache.base import CacheStore, Embedder
from iros.cache.engine import ResponseCache
from iros.config import CacheSettings

__all__ = ["build_cache"]


def build_cache(
    settings: CacheSettings, data_dir: Path, note_stage: Callable[[str, float], None] | None = None
) -> ResponseCache:
    """The configured cache: its store, and for the semantic part the embedder, index and verifier.
    With `note_stage` (the collector's), each embedding call's time is told as the `embedding` stage."""
    store: CacheStore
    memory = int(settings.max_memory_mb * 2**20)
    if settings.store.backend == "redis":
        from iros.cache.stores.redis import RedisCacheStore

        assert settings.store.url is not None  # validated in config
        store = RedisCacheStore(
            settings.store.url,
            settings.store.prefix,
            max_entries=settings.max_entries,
            max_memory_bytes=memory,
            ttl_seconds=settings.ttl_seconds,
            eviction=settings.eviction,
        )
    else:
        from iros.cache.stores.sqlite import SQLiteCacheStore

        store = SQLiteCacheStore(
            Path(settings.store.path) if settings.store.path else data_dir / "cache.db",
            max_entries=settings.max_entries,
            max_memory_bytes=memory,
            ttl_seconds=settings.ttl_seconds,
            eviction=settings.eviction,
        )
    if not settings.semantic:
        return ResponseCache(settings, store)
    from iros.cache.embedder import TimedEmbedder, build_embedder
    from iros.cache.index import VectorIndex
    from iros.cache.verifier.model import Verifier

    index_path = data_dir / "cache-index.usearch"

    def index(dim: int) -> VectorIndex:
        return VectorIndex(dim, index_path)

    embedder: Embedder = build_embedder(settings.embedder)
    if note_stage is not None:
        embedder = TimedEmbedder(embedder, note_stage)
    return ResponseCache(settings, store, embedder, Verifier.load(), index)
