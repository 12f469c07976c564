"""Where cache entries live: one CacheStore (iros.cache.base) per kind of storage.

    from iros.cache.stores.sqlite import SQLiteCacheStore    # one process: memory, durable in SQLite
    from iros.cache.stores.redis import RedisCacheStore      # shared by replicas, in step by a stream
    from iros.cache.stores.common import CacheUnavailable    # raised when the store cannot answer now

The modules are imported by name, not from here, so that the SQLite store never imports redis.
common.py holds the rules both enforce (TTL, limits, eviction order, counters).
"""
