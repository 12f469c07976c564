"""How RedisCacheStore lays its data out in Redis, and the Lua scripts that change it atomically.

Redis, with prefix P (all replicas share it and must agree on the limits):

  P:e:<key>    hash: the CacheEntry's fields (embedding as float32 bytes, expires_at "" for none),
               PEXPIREAT at its deadline so Redis frees it even when no replica runs
  P:lru        zset key -> last hit (or store) time                      LRU order
  P:lfu        zset key -> hits * 2**32 + that time in whole seconds     LFU order
  P:size       zset key -> CacheEntry.size: the set of accounted entries; ZCARD is the entry count
  P:exp        zset key -> expires_at in ms (entries that have one)      the expiry sweep
  P:created    zset key -> created_at                                    the sweep for ttl_seconds
  P:stats      hash: bytes (the sum of P:size) and the counters
  P:events     stream, MAXLEN ~events_maxlen: {op: add|del, key, by: replica id}

Every change is one Lua script, so the accounting, the eviction and the events of one put are atomic
and the events are in the order of the changes. A hash can vanish by PEXPIREAT before its zset entries
do; whoever touches the key next (a get, the eviction loop, the sweep every sweep_seconds) finishes
the removal, counts an expiration and emits the del event.

    scripts = Scripts(client)                     # registered once per client (EVALSHA, EVAL fallback)
    victims = await scripts.put(keys, [*head, key, ...])
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from iros.cache.base import CacheEntry
from iros.cache.stores.common import ENTRY_FIELDS, embedding_bytes, embedding_of

__all__ = ["FIELDS", "LFU_TIME", "Scripts", "entry_from_hash", "hash_fields", "pairs"]

# KEYS: lru, lfu, size, exp, created, stats, events. ARGV: entry key prefix, replica id, stream
# MAXLEN, then each script's own. Entry hashes are named from the prefix, not passed as KEYS: fine
# on one Redis server (not on a cluster).
LUA_COMMON = """
local LRU, LFU, SIZE, EXP, CREATED = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local STATS, EVENTS = KEYS[6], KEYS[7]
local EPREFIX, REPLICA, MAXLEN = ARGV[1], ARGV[2], ARGV[3]

local function event(op, key)
  redis.call('XADD', EVENTS, 'MAXLEN', '~', MAXLEN, '*', 'op', op, 'key', key, 'by', REPLICA)
end

-- Forget a key everywhere; true if it was accounted (so replicas may hold it), which emits a del.
local function drop(key)
  redis.call('DEL', EPREFIX .. key)
  redis.call('ZREM', LRU, key)
  redis.call('ZREM', LFU, key)
  redis.call('ZREM', EXP, key)
  redis.call('ZREM', CREATED, key)
  local size = redis.call('ZSCORE', SIZE, key)
  if not size then return false end
  redis.call('ZREM', SIZE, key)
  redis.call('HINCRBY', STATS, 'bytes', -tonumber(size))
  event('del', key)
  return true
end

-- Drop entries in policy order until the limits hold; never `keep`. An entry whose hash has
-- already expired counts as an expiration. Each pass removes its victim from the order, so it ends.
local function evict(max_entries, max_bytes, policy, keep)
  local order = LRU
  if policy == 'lfu' then order = LFU end
  local victims = {}
  while true do
    local reason
    if redis.call('ZCARD', SIZE) > max_entries then
      reason = 'entries'
    elseif tonumber(redis.call('HGET', STATS, 'bytes') or 0) > max_bytes then
      reason = 'memory'
    else
      break
    end
    local first = redis.call('ZRANGE', order, 0, 1)
    local victim = first[1]
    if victim == keep then victim = first[2] end
    if not victim then break end
    if redis.call('EXISTS', EPREFIX .. victim) == 1 then
      redis.call('HINCRBY', STATS, 'evictions:' .. reason, 1)
      redis.call('HINCRBY', STATS, 'evictions:' .. policy, 1)
    else
      redis.call('HINCRBY', STATS, 'expirations', 1)
    end
    if drop(victim) then victims[#victims + 1] = victim end
  end
  return victims
end
"""

# ARGV[4..]: key, max_entries, max_bytes, policy, size, lru score, lfu score, created_at,
# deadline in ms ("" for none), then the hash's field/value pairs. Returns the evicted keys.
LUA_PUT = """
local key = ARGV[4]
local size = tonumber(ARGV[8])
local h = EPREFIX .. key
local old = redis.call('ZSCORE', SIZE, key)
if old then redis.call('HINCRBY', STATS, 'bytes', -tonumber(old)) end
redis.call('DEL', h)
redis.call('HSET', h, unpack(ARGV, 13))
if ARGV[12] ~= '' then
  redis.call('PEXPIREAT', h, ARGV[12])
  redis.call('ZADD', EXP, ARGV[12], key)
else
  redis.call('ZREM', EXP, key)
end
redis.call('ZADD', SIZE, size, key)
redis.call('ZADD', LRU, ARGV[9], key)
redis.call('ZADD', LFU, ARGV[10], key)
redis.call('ZADD', CREATED, ARGV[11], key)
redis.call('HINCRBY', STATS, 'bytes', size)
redis.call('HINCRBY', STATS, 'puts', 1)
local victims = evict(tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], key)
event('add', key)
return victims
"""

# ARGV[4..]: key, now, ttl seconds ("" for none). The hash as a flat list; {} when absent;
# {"expired"} when it just expired (its removal finished here).
LUA_GET = """
local key = ARGV[4]
local h = EPREFIX .. key
local created = redis.call('HGET', h, 'created_at')
if not created then
  if redis.call('ZSCORE', SIZE, key) then
    drop(key)
    redis.call('HINCRBY', STATS, 'expirations', 1)
    return {'expired'}
  end
  return {}
end
if ARGV[6] ~= '' and tonumber(created) + tonumber(ARGV[6]) <= tonumber(ARGV[5]) then
  drop(key)
  redis.call('HINCRBY', STATS, 'expirations', 1)
  return {'expired'}
end
return redis.call('HGETALL', h)
"""

# ARGV[4..]: key, kind, now.
LUA_HIT = """
local key = ARGV[4]
local h = EPREFIX .. key
redis.call('HINCRBY', STATS, 'hits:' .. ARGV[5], 1)
if redis.call('EXISTS', h) == 0 then return 0 end
local hits = redis.call('HINCRBY', h, 'hits', 1)
local now = tonumber(ARGV[6])
redis.call('HSET', h, 'last_hit_at', ARGV[6])
redis.call('ZADD', LRU, 'XX', ARGV[6], key)
redis.call('ZADD', LFU, 'XX', string.format('%.17g', hits * 4294967296 + math.floor(now)), key)
return 1
"""

# ARGV[4..]: counter, keys... Returns {keys removed while live, keys found already expired}.
LUA_REMOVE = """
local live, expired = {}, {}
for i = 5, #ARGV do
  local key = ARGV[i]
  local present = redis.call('EXISTS', EPREFIX .. key) == 1
  if drop(key) then
    if present then
      redis.call('HINCRBY', STATS, ARGV[4], 1)
      live[#live + 1] = key
    else
      redis.call('HINCRBY', STATS, 'expirations', 1)
      expired[#expired + 1] = key
    end
  end
end
return {live, expired}
"""

# ARGV[4..]: now in ms, oldest created_at still live ("" for no TTL), batch size.
# Returns {removed keys, how many candidates were looked at}.
LUA_SWEEP = """
local keys = redis.call('ZRANGEBYSCORE', EXP, '-inf', ARGV[4], 'LIMIT', 0, ARGV[6])
if ARGV[5] ~= '' then
  for _, key in ipairs(redis.call('ZRANGEBYSCORE', CREATED, '-inf', ARGV[5], 'LIMIT', 0, ARGV[6])) do
    keys[#keys + 1] = key
  end
end
local removed = {}
for _, key in ipairs(keys) do
  if drop(key) then
    redis.call('HINCRBY', STATS, 'expirations', 1)
    removed[#removed + 1] = key
  end
end
return {removed, #keys}
"""

# ARGV[4..]: max_entries, max_bytes, policy. Returns the evicted keys.
LUA_ENFORCE = """
return evict(tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], '')
"""

FIELDS = ENTRY_FIELDS[1:]  # the hash holds every field but the key, which names it
LFU_TIME = 2**32  # LFU score = hits * 2**32 + whole seconds: hits first, recency breaks ties


def hash_fields(e: CacheEntry) -> list[bytes | str]:
    values: tuple[bytes | str, ...] = (
        e.namespace,
        e.context,
        e.model,
        e.prompt,
        e.body,
        repr(e.created_at),
        "" if e.expires_at is None else repr(e.expires_at),
        str(e.completion_tokens),
        str(e.prompt_tokens),
        repr(e.upstream_ms),
        str(e.hits),
        repr(e.last_hit_at),
        embedding_bytes(e) or b"",
    )
    return [x for pair in zip(FIELDS, values, strict=True) for x in pair]


def entry_from_hash(key: str, h: dict[bytes, bytes]) -> CacheEntry:
    expires = h.get(b"expires_at", b"")
    return CacheEntry(
        key=key,
        namespace=h[b"namespace"].decode(),
        context=h[b"context"].decode(),
        model=h[b"model"].decode(),
        prompt=h[b"prompt"].decode(),
        body=h[b"body"],
        created_at=float(h[b"created_at"]),
        expires_at=float(expires) if expires else None,
        completion_tokens=int(h.get(b"completion_tokens", 0)),
        prompt_tokens=int(h.get(b"prompt_tokens", 0)),
        upstream_ms=float(h.get(b"upstream_ms", 0.0)),
        hits=int(h.get(b"hits", 0)),
        last_hit_at=float(h.get(b"last_hit_at", 0.0)),
        embedding=embedding_of(h.get(b"embedding")),
    )


def pairs(flat: list[Any]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class Scripts:
    """The scripts registered on one client; each takes KEYS and ARGV as described above."""

    def __init__(self, client: Redis) -> None:
        script = client.register_script
        self.put = script(LUA_COMMON + LUA_PUT)
        self.get = script(LUA_COMMON + LUA_GET)
        self.hit = script(LUA_COMMON + LUA_HIT)
        self.remove = script(LUA_COMMON + LUA_REMOVE)
        self.sweep = script(LUA_COMMON + LUA_SWEEP)
        self.enforce = script(LUA_COMMON + LUA_ENFORCE)
