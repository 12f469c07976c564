"""The request guard's pieces on their own: which Host names are loopback, which Origin is the server's
own, and the body count that stops a streamed body at the limit. (End to end: tests/app/
test_hardening_transport.py.)"""

from __future__ import annotations

import pytest
from starlette.types import Message

from iros.config import ServerSettings
from iros.core.errors import IrosError
from iros.server.guards import RequestGuard, bounded_body, loopback_host, same_origin


@pytest.mark.parametrize(
    "host", [b"localhost", b"LOCALHOST:8080", b"127.0.0.1", b"127.8.9.10:80", b"[::1]:8080", b"a.localhost"]
)
def test_loopback_names_are_loopback(host: bytes) -> None:
    """localhost, *.localhost and loopback addresses, with or without a port, name this machine."""
    assert loopback_host(host)


@pytest.mark.parametrize(
    "host", [b"evil.example", b"localhost.evil.example", b"10.0.0.1:8080", b"[2001:db8::1]:80", b"", b"[::1"]
)
def test_other_names_are_not(host: bytes) -> None:
    """Any other name or address, or a malformed one, is not loopback."""
    assert not loopback_host(host)


def test_an_origin_is_own_only_with_the_same_host_and_port() -> None:
    """The Origin must name the Host (port included); null and a missing Host never match."""
    assert same_origin(b"http://127.0.0.1:8080", b"127.0.0.1:8080")
    assert not same_origin(b"http://127.0.0.1:9090", b"127.0.0.1:8080")
    assert not same_origin(b"http://localhost:8080", b"127.0.0.1:8080")
    assert not same_origin(b"null", b"127.0.0.1:8080")
    assert not same_origin(b"http://127.0.0.1:8080", None)


def _scope(method: str, *headers: tuple[bytes, bytes]) -> dict[str, object]:
    return {"type": "http", "method": method, "headers": list(headers)}


def test_the_guard_refuses_in_order_of_what_it_reads() -> None:
    """Two Authorization headers are a 400, a large Content-Length a 413; open mode adds Host and Origin."""
    keyed = RequestGuard(ServerSettings(max_body_bytes=2048), open_mode=False)
    opened = RequestGuard(ServerSettings(), open_mode=True)
    auth = (b"authorization", b"Bearer a")
    twice = keyed.check(_scope("GET", auth, auth))
    assert twice is not None and twice.code == "duplicate_authorization"
    large = keyed.check(_scope("POST", (b"content-length", b"4096")))
    assert large is not None and large.status == 413
    assert keyed.check(_scope("POST", (b"host", b"evil.example"), (b"origin", b"http://x"))) is None
    host = opened.check(_scope("GET", (b"host", b"evil.example")))
    assert host is not None and host.code == "invalid_host"
    local = (b"host", b"127.0.0.1:8080")
    posted = opened.check(_scope("POST", local, (b"origin", b"http://evil.example")))
    assert posted is not None and posted.code == "foreign_origin"
    assert opened.check(_scope("GET", local, (b"origin", b"http://evil.example"))) is None
    assert opened.check(_scope("POST", local)) is None


async def test_a_streamed_body_raises_413_once_past_the_limit() -> None:
    """bounded_body passes parts through until their sum passes the limit, then raises a 413."""
    parts = iter([b"a" * 600, b"b" * 600, b"c" * 600])

    async def receive() -> Message:
        return {"type": "http.request", "body": next(parts), "more_body": True}

    bounded = bounded_body(receive, 1000)
    assert (await bounded())["body"] == b"a" * 600
    with pytest.raises(IrosError) as refused:
        await bounded()
    assert refused.value.status == 413
    assert refused.value.headers == {"connection": "close"}
