"""Shared state for a cluster, on the Redis the replicas already share (state.url).

state = RedisState("redis://127.0.0.1:6379/0", prefix="iros:state")

Keys (under the prefix):
  version            the document counter: INCR on every put
  docs, dv           hashes: name -> JSON body, name -> the version it was put at
  log:<channel>      a stream per log, trimmed to about LOG_MAXLEN entries (or the append's maxlen)
  lease:<name>       "<holder>|<token>" with an expiry (PX); fence:<name> counts the tokens given out
  bucket:<key>       a hash {t: tokens, u: updated}, the server's clock (TIME), so hosts need not agree

Every change that must be atomic is one Lua script. While Redis cannot be reached every call fails at
once for `recheck` seconds (StateUnavailable) instead of each waiting out the timeout.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import orjson
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from iros.state.base import StateUnavailable, worker_id

LOG_MAXLEN = 20_000

_PUT = """
if ARGV[3] == '1' and redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local v = redis.call('INCR', KEYS[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], v)
return v
"""

_LEASE = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local sep = string.find(cur, '|', 1, true)
  if string.sub(cur, 1, sep - 1) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(string.sub(cur, sep + 1))
  end
  return -1
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
return token
"""

_FENCED_APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'b', ARGV[2])
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# The server's clock, so that replicas on hosts whose clocks differ share one bucket correctly.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 't', 'u')
local tokens, updated = tonumber(b[1]), tonumber(b[2])
if tokens == nil or updated == nil then tokens, updated = cap, now end
tokens = math.min(cap, tokens + math.max(0, now - updated) * rate)
local n = tonumber(ARGV[3])
local taken = math.min(n, math.floor(tokens))
tokens = tokens - taken
local wait = 0
if taken < n then wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 't', string.format('%.6f', tokens), 'u', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(cap / rate * 1000) + 1000)
return {taken, string.format('%.6f', wait)}
"""


class RedisState:
    name = "redis"
    shared_files = False

    def __init__(
        self,
        url: str,
        prefix: str = "iros:state",
        *,
        timeout: float = 0.5,
        recheck: float = 1.0,
        client: Redis | None = None,
    ) -> None:
        self.url = url
        self.where = _redacted(url)
        self.prefix = prefix
        self.recheck = recheck
        self.worker = worker_id()
        self._owns_client = client is None
        self._client = client or Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # One quick retry covers a connection that died while idle (a Redis restart).
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
        )
        c = self._client
        self._put, self._lease = c.register_script(_PUT), c.register_script(_LEASE)
        self._fenced, self._release = c.register_script(_FENCED_APPEND), c.register_script(_RELEASE)
        self._take = c.register_script(_TAKE)
        self._version, self._docs, self._dv = (f"{prefix}:{k}" for k in ("version", "docs", "dv"))
        self._down_until = 0.0
        self.last_error: str | None = None

    @contextlib.contextmanager
    def _redis(self, doing: str) -> Iterator[None]:
        if time.monotonic() < self._down_until:
            raise StateUnavailable(f"state Redis at {self.where} unavailable ({doing}): {self.last_error}")
        try:
            yield
        except (RedisError, OSError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._down_until = time.monotonic() + self.recheck
            raise StateUnavailable(f"state Redis at {self.where} unavailable ({doing}): {exc}") from exc
        self.last_error = None

    async def start(self) -> None:
        # Not reaching Redis at start is no reason to refuse to serve: the followers keep trying.
        with contextlib.suppress(StateUnavailable), self._redis("start"):
            await self._client.ping()

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    # --- documents ----------------------------------------------------------------------------
    async def put(self, name: str, body: dict[str, Any], *, only_if_absent: bool = False) -> int:
        with self._redis("put"):
            keys = [self._version, self._docs, self._dv]
            args: list[str | bytes] = [name, orjson.dumps(body), "1" if only_if_absent else "0"]
            return int(await self._put(keys=keys, args=args))

    async def changed(self, since: int) -> tuple[int, dict[str, dict[str, Any]]]:
        with self._redis("changed"):
            version = int(await self._client.get(self._version) or 0)
            if version == since:
                return version, {}
            versions = await self._client.hgetall(self._dv)
            names = [n for n, v in versions.items() if int(v) > since]
            if not names:
                return version, {}
            bodies = await self._client.hmget(self._docs, names)
            return version, {
                _text(n): orjson.loads(b) for n, b in zip(names, bodies, strict=True) if b is not None
            }

    # --- logs ---------------------------------------------------------------------------------
    def _log(self, channel: str) -> str:
        return f"{self.prefix}:log:{channel}"

    async def append(self, channel: str, body: bytes, *, maxlen: int | None = None) -> str:
        with self._redis("append"):
            entry = await self._client.xadd(
                self._log(channel), {"b": body}, maxlen=maxlen or LOG_MAXLEN, approximate=True
            )
            return _text(entry)

    async def append_fenced(self, channel: str, body: bytes, lease: str, token: int) -> bool:
        with self._redis("append"):
            keys = [self._lease_key(lease), self._log(channel)]
            args: list[str | bytes | int] = [f"{self.worker}|{token}", body, LOG_MAXLEN]
            return bool(await self._fenced(keys=keys, args=args))

    async def read(self, channel: str, after: str | None) -> tuple[str, list[bytes]]:
        with self._redis("read"):
            rows = await self._client.xrange(
                self._log(channel), min=f"({after}" if after else "-", max="+", count=10_000
            )
        if not rows:
            return after or "0-0", []
        return _text(rows[-1][0]), [_body(fields) for _, fields in rows]

    # --- leases -------------------------------------------------------------------------------
    def _lease_key(self, name: str) -> str:
        return f"{self.prefix}:lease:{name}"

    async def lease(self, name: str, ttl: float) -> int | None:
        with self._redis("lease"):
            keys = [self._lease_key(name), f"{self.prefix}:fence:{name}"]
            token = int(await self._lease(keys=keys, args=[self.worker, max(1, int(ttl * 1000))]))
        return token if token > 0 else None

    async def holds(self, name: str, token: int) -> bool:
        with self._redis("lease"):
            held = await self._client.get(self._lease_key(name))
        return held is not None and _text(held) == f"{self.worker}|{token}"

    async def release(self, name: str, token: int) -> None:
        with contextlib.suppress(StateUnavailable), self._redis("release"):
            await self._release(keys=[self._lease_key(name)], args=[f"{self.worker}|{token}"])

    # --- token buckets ------------------------------------------------------------------------
    async def take(self, key: str, per_second: float, capacity: float, n: int = 1) -> tuple[int, float]:
        with self._redis("rate limit"):
            keys = [f"{self.prefix}:bucket:{key}"]
            taken, wait = await self._take(keys=keys, args=[per_second, capacity, n])
        return int(taken), float(wait)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "url": self.where,
            "prefix": self.prefix,
            "worker": self.worker,
            "available": self.last_error is None,
            "last_error": self.last_error,
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _body(fields: Any) -> bytes:
    value = fields[b"b"]
    return value if isinstance(value, bytes) else str(value).encode()


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"
