"""Single-flight: identical requests in flight at the same moment make one upstream call and share it.

flight = SingleFlight()
result, shared = await flight.do(key, lambda: call_upstream())   # shared: True for the followers

The first caller (the leader) runs the call itself, with no task of its own: the common case, a
request with no twin in flight, costs a dict lookup and a future. Callers with the same key that
arrive before it ends await the same result or the same exception. A follower that leaves changes
nothing for the others; if the leader is cancelled, its followers get a 503 telling them to retry.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import orjson

from iros.core.errors import IrosError

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._flights: dict[str, asyncio.Future[T]] = {}
        self._followers: dict[str, int] = {}
        self.calls = 0  # calls actually made
        self.shared = 0  # callers answered by someone else's call

    def __len__(self) -> int:
        return len(self._flights)

    def followers(self, key: str) -> int:
        """Callers waiting on the call in flight for `key`."""
        return self._followers.get(key, 0)

    async def do(self, key: str, call: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        flight = self._flights.get(key)
        if flight is not None:
            self.shared += 1
            self._followers[key] = self._followers.get(key, 0) + 1
            try:
                # shield: a follower leaving must not cancel the future the others wait on.
                return await asyncio.shield(flight), True
            finally:
                if (left := self._followers.get(key, 0) - 1) > 0:
                    self._followers[key] = left
                else:
                    self._followers.pop(key, None)
        flight = self._flights[key] = asyncio.get_running_loop().create_future()
        self.calls += 1
        try:
            result = await call()
        except asyncio.CancelledError:
            flight.set_exception(
                IrosError(
                    503,
                    "the identical request this one was waiting on was cancelled; retry",
                    type="server_error",
                    code="single_flight_cancelled",
                    headers={"retry-after": "1"},
                )
            )
            raise
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        else:
            flight.set_result(result)
            return result, False
        finally:
            del self._flights[key]
            if flight.done() and not flight.cancelled():
                flight.exception()  # retrieved, so an error no follower awaited is not logged as lost


def request_key(principal: str, data: dict[str, Any]) -> str:
    """The identity of a request for single-flight: who asks (answers never cross tenants) and what."""
    body = orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(principal.encode() + b"\0" + body, digest_size=16).hexdigest()
