"""Where cache entries live: one CacheStore (iros.types) per kind of storage.

    from iros.stores.sqlite import SQLiteCacheStore    # one process: memory, made durable in SQLite
    from iros.stores.redis import RedisCacheStore      # shared by replicas, kept in step by a stream
    from iros.stores.common import CacheUnavailable    # raised when the store cannot answer now

The modules are imported by name, not from here, so that the SQLite store never imports redis.
common.py holds the rules both enforce (TTL, limits, eviction order, counters).
"""
