"""The connection: uvicorn's httptools protocol with the limits it lacks, so a socket that sends no
complete request cannot hold the server.

limits = ConnectionLimits.of(settings.server)
uvicorn.run(app, http="httptools", ws="websockets-sansio", **limits.uvicorn_options())

- The request line and headers must arrive within `header_timeout_seconds`, counted from the connection's
  start or the end of the previous answer (uvicorn arms no timer until a first answer is sent): 408.
- The head is capped in bytes as it arrives: httptools joins each header's pieces as they come (quadratic
  in a line's length) and only calls back once a line ends, so the 431 of the ASGI guard comes too late.
- The body must start within `body_start_timeout_seconds` and be complete within `body_timeout_seconds`
  of the headers, on every route: 408.
- At most `max_connections_per_address` connections per client address (trusted proxies exempt): 429.
Each refusal is an OpenAI-shaped error with `connection: close`, and the connection is closed.
"""

from __future__ import annotations

import asyncio
import functools
import http
import ipaddress
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from iros.config import ServerSettings
from iros.core.errors import IrosError

# The request line, line ends and separators come on top of server.max_header_bytes (names and values).
REQUEST_LINE_BYTES = 8192
WS_MAX_MESSAGE = 64 * 1024
STALL_SECONDS = 0.1
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class ConnectionLimits:
    """The limits of one server process, and its table of open connections per client address."""

    head_bytes: int
    header_timeout: float
    body_start_timeout: float
    body_timeout: float
    per_address: int
    keep_alive: int
    trusted: tuple[Network, ...] = ()
    held: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, server: ServerSettings) -> ConnectionLimits:
        return cls(
            head_bytes=server.max_header_bytes + REQUEST_LINE_BYTES,
            header_timeout=server.header_timeout_seconds,
            body_start_timeout=server.body_start_timeout_seconds,
            body_timeout=server.body_timeout_seconds,
            per_address=server.max_connections_per_address,
            keep_alive=server.keep_alive_seconds,
            trusted=tuple(ipaddress.ip_network(p, strict=False) for p in server.trusted_proxies),
        )

    def uvicorn_options(self) -> dict[str, Any]:
        """The protocol classes and timeouts to pass to uvicorn.run (a partial pickles for --workers)."""
        return {
            "http": functools.partial(IrosHttpProtocol, limits=self),
            "ws": IrosWebSocketProtocol,
            "timeout_keep_alive": self.keep_alive,
            # A WebSocket client sends only small filter messages (/ws/metrics); uvicorn allows 16 MiB.
            "ws_max_size": WS_MAX_MESSAGE,
        }

    def take(self, address: str) -> bool:
        """Count a new connection from `address`; False (nothing counted) when it already has its share."""
        if not self.per_address or self._trusted(address):
            return True
        held = self.held.get(address, 0)
        if held >= self.per_address:
            return False
        self.held[address] = held + 1
        return True

    def give(self, address: str) -> None:
        held = self.held.get(address, 0)
        if held > 1:
            self.held[address] = held - 1
        else:
            self.held.pop(address, None)

    def _trusted(self, address: str) -> bool:
        if not self.trusted:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted)


class IrosHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, limits: ConnectionLimits, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.limits = limits
        self._address: str | None = None  # the client address whose connection count this one holds
        self._in_head = True  # the next bytes belong to a request line or headers
        self._head_seen = 0
        self._timer: asyncio.TimerHandle | None = None  # the one deadline running: the head's or the body's
        self._body_deadline = 0.0
        self._body_started = False
        hide_query_strings(self.logger)

    # --- the connection ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        address = self.client[0] if self.client else None
        if address is not None:
            if not self.limits.take(address):
                self._refuse(
                    IrosError(
                        429,
                        f"too many open connections from {address}: at most {self.limits.per_address} "
                        "(server.max_connections_per_address)",
                        type="rate_limit_error",
                        code="too_many_connections",
                    )
                )
                return
            self._address = address
        self._arm(self.limits.header_timeout, self._head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._give_back()
        super().connection_lost(exc)

    def _give_back(self) -> None:
        if self._address is not None:
            self.limits.give(self._address)
            self._address = None

    def data_received(self, data: bytes) -> None:
        limit = self.limits.head_bytes
        while self._in_head and self._head_seen + len(data) > limit:
            room = limit - self._head_seen
            self._head_seen = limit
            super().data_received(data[:room])
            data = data[room:]
            if self.transport.is_closing() or self.transport.get_protocol() is not self:
                return
            if self._in_head and self._head_seen >= limit:
                self._refuse(
                    IrosError(
                        431,
                        f"request line and headers over {limit} bytes (server.max_header_bytes)",
                        code="headers_too_large",
                    )
                )
                return
        if self._in_head:
            self._head_seen += len(data)
        if data:
            super().data_received(data)

    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        # The WebSocket protocol takes the transport, and with it this connection's count.
        protocol = self.transport.get_protocol()
        if isinstance(protocol, IrosWebSocketProtocol) and self._address is not None:
            protocol.on_lost = functools.partial(self.limits.give, self._address)
            self._address = None

    # --- parser callbacks ----------------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self._in_head, self._body_started = False, False
        self._disarm()
        super().on_headers_complete()
        if self.parser.should_upgrade() and self._should_upgrade():
            return
        if not (self.pipeline and self.pipeline[0][0] is self.cycle):  # runs now, not queued behind another
            self._start_body_clock()

    def on_body(self, body: bytes) -> None:
        if not self._body_started:
            self._body_started = True
            if self._timer is not None:
                self._arm(self._body_deadline - self.loop.time(), self._body_late)
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self.parser.should_upgrade() and self._should_upgrade():
            return
        self._disarm()
        self._in_head, self._head_seen = True, 0
        if self.cycle is not None and self.cycle.response_complete and not self.pipeline:
            self._arm(self.limits.header_timeout, self._head_late)  # answered before its body ended

    def on_response_complete(self) -> None:
        queued = bool(self.pipeline)
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if queued:
            if self.cycle.more_body and not self.pipeline:  # the request just started is still arriving
                self._start_body_clock()
        elif self._in_head:
            self._arm(self.limits.header_timeout, self._head_late)

    # --- deadlines -----------------------------------------------------------------------------------
    def _start_body_clock(self) -> None:
        limits = self.limits
        self._body_deadline = self.loop.time() + limits.body_timeout
        first = min(limits.body_timeout, limits.body_start_timeout if not self._body_started else math.inf)
        self._arm(first, self._body_late)

    def _arm(self, seconds: float, late: Callable[[], None]) -> None:
        self._disarm()
        due = self.loop.time() + max(seconds, 0.0)
        self._timer = self.loop.call_later(max(seconds, 0.0), self._expire, due, late)

    def _expire(self, due: float, late: Callable[[], None]) -> None:
        # A loop stalled past the deadline may hold this client's bytes unread: read them first.
        if self.loop.time() - due > STALL_SECONDS:
            self._timer = self.loop.call_later(STALL_SECONDS / 2, self._expire, self.loop.time(), late)
            return
        late()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_late(self) -> None:
        self._timer = None
        if self._head_seen:
            seconds = self.limits.header_timeout
            what = f"did not arrive within {seconds:g} s (server.header_timeout_seconds)"
            self._refuse(IrosError(408, f"the request headers {what}", code="header_timeout"))
        else:  # an idle connection: nothing to answer
            self.transport.close()

    def _body_late(self) -> None:
        self._timer = None
        limits = self.limits
        if self._body_started:
            what = f"did not arrive within {limits.body_timeout:g} s (server.body_timeout_seconds)"
        else:
            what = f"did not start within {limits.body_start_timeout:g} s (server.body_start_timeout_seconds)"
        self._refuse(IrosError(408, f"the request body {what}", code="body_timeout"))

    def _refuse(self, error: IrosError) -> None:
        """Answer `error` (unless an answer has begun) and close the connection."""
        cycle = self.cycle
        if self.transport.is_closing():
            return
        if cycle is None or cycle.response_complete or not cycle.response_started:
            if cycle is not None:
                cycle.disconnected = True  # the app's own answer, if it comes, goes nowhere
            self.transport.write(_response(error))
        self.transport.close()


class IrosWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, giving back the connection count of the HTTP connection it took over."""

    on_lost: Callable[[], None] | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.on_lost is not None:
            self.on_lost()
            self.on_lost = None
        super().connection_lost(exc)


def _response(error: IrosError) -> bytes:
    body = error.body()
    reason = http.HTTPStatus(error.status).phrase.encode()
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n"
    return head % (error.status, reason, len(body)) + b"\r\n" + body


def _without_query(record: logging.LogRecord) -> bool:
    """uvicorn logs each WebSocket's path with its query string, where a client may have put a key."""
    if isinstance(record.args, tuple) and any(isinstance(a, str) and "?" in a for a in record.args):
        record.args = tuple(
            a.partition("?")[0] + "?…" if isinstance(a, str) and a.startswith("/") and "?" in a else a
            for a in record.args
        )
    return True


def hide_query_strings(logger: logging.Logger) -> None:
    logger.addFilter(_without_query)  # once: a filter already there is not added again
