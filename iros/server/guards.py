"""What every request and WebSocket must pass before routing.

guard = RequestGuard(settings.server, open_mode=settings.auth.open)
if (refusal := guard.check(scope)) is not None: ...        # an IrosError to answer instead
receive = bounded_body(receive, settings.server.max_body_bytes)   # 413 while the body streams in

- headers over `max_header_bytes` or `max_headers` fields: 431 (the connection caps the raw head first)
- two Authorization headers: 400 (the chat path read the last, /api/* the first)
- a Content-Length over `max_body_bytes`: 413 before a byte is read, on every route
- in open mode (no keys, so a browser is the one thing that can misuse it): a Host that is not a loopback
  name is refused (DNS rebinding), and so is a state-changing request or a WebSocket whose Origin is not
  the server's own (a page elsewhere posting to, or reading from, http://127.0.0.1).
"""

from __future__ import annotations

import functools
import ipaddress
from urllib.parse import urlsplit

from starlette.types import Message, Receive, Scope

from iros.config import ServerSettings
from iros.core.errors import IrosError

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Closing the connection stops a too-large body from being read (and thrown away) after the 413.
CLOSE = {"connection": "close"}


class RequestGuard:
    def __init__(self, server: ServerSettings, *, open_mode: bool) -> None:
        self.max_headers = server.max_headers
        self.max_header_bytes = server.max_header_bytes
        self.max_body = server.max_body_bytes
        self.open_mode = open_mode

    def check(self, scope: Scope) -> IrosError | None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if len(headers) > self.max_headers:
            return IrosError(
                431,
                f"too many request headers: {len(headers)}, at most {self.max_headers}",
                code="headers_too_large",
            )
        size = authorizations = 0
        length = host = origin = None
        for name, value in headers:
            size += len(name) + len(value)
            if name == b"authorization":
                authorizations += 1
            elif name == b"content-length":
                length = value
            elif name == b"host":
                host = value
            elif name == b"origin":
                origin = value
        if size > self.max_header_bytes:
            return IrosError(
                431,
                f"request headers too large: {size} bytes, at most {self.max_header_bytes}",
                code="headers_too_large",
            )
        if authorizations > 1:
            return IrosError(
                400, "send one Authorization header, not several", code="duplicate_authorization"
            )
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return too_large(self.max_body)
        if self.open_mode:
            return self._open_mode_refusal(scope, host, origin)
        return None

    @staticmethod
    def _open_mode_refusal(scope: Scope, host: bytes | None, origin: bytes | None) -> IrosError | None:
        if host is not None and not loopback_host(host):
            return IrosError(
                400,
                "open mode answers only loopback host names (localhost, 127.0.0.1, [::1])",
                code="invalid_host",
            )
        changes = scope["type"] == "websocket" or scope["method"] not in SAFE_METHODS
        if changes and origin is not None and not same_origin(origin, host):
            return IrosError(
                403,
                "open mode refuses requests from other web pages (Origin is not this server)",
                type="permission_error",
                code="foreign_origin",
            )
        return None


@functools.lru_cache(maxsize=256)
def loopback_host(host: bytes) -> bool:
    """Whether a Host header names this machine: localhost, *.localhost or a loopback address."""
    text = host.decode("latin-1").lower()
    if text.startswith("["):
        name = text[1 : text.find("]")] if "]" in text else text
    else:
        name = text.rpartition(":")[0] if ":" in text else text
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def same_origin(origin: bytes, host: bytes | None) -> bool:
    """Whether an Origin header is this server's own (same host and port as the Host header)."""
    if host is None or origin == b"null":
        return False
    return urlsplit(origin.decode("latin-1")).netloc.lower() == host.decode("latin-1").lower()


def too_large(limit: int) -> IrosError:
    return IrosError(
        413,
        f"the request body is over the {limit}-byte limit (server.max_body_bytes)",
        code="body_too_large",
        headers=CLOSE,
    )


def bounded_body(receive: Receive, limit: int) -> Receive:
    """`receive` that raises a 413 IrosError once the body passes `limit` bytes (chunked bodies carry no
    Content-Length to check up front)."""
    seen = 0

    async def bounded() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise too_large(limit)
        return message

    return bounded
