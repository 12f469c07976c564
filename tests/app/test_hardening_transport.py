"""Issue 20's transport rows against a real `iros serve`: bodies bounded on every route, sockets that send
no complete request closed, the head capped as it arrives, open mode closed to other web pages, and the
low rows (Secure cookie behind a trusted proxy, one Authorization, static files' headers, no key from a
WebSocket's query string in the log). Raw sockets where an HTTP client would not misbehave; every loop is
bounded; loopback only."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from iros.app import create_app
from iros.config import load_settings
from iros.testing.iros import IrosProcess, wait_until
from tests.conftest import ADMIN_KEY, CLIENT_KEY

pytestmark = pytest.mark.e2e

SECRET = "sk-query-string-secret"
MODELS = [{"name": "m", "backend": "simulated", "profile": "instant"}]
# Small limits, so each row is shown in about a second.
SERVER = {
    "max_body_bytes": 16384,
    "max_header_bytes": 4096,
    "header_timeout_seconds": 1.0,
    "body_start_timeout_seconds": 1.0,
    "body_timeout_seconds": 2.0,
    "keep_alive_seconds": 1,
    "max_connections_per_address": 8,
    "trusted_proxies": ["127.0.0.2"],
}
HEAD_CAP = 4096 + 8192  # max_header_bytes and the request line's allowance (server/protocol.py)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def keyed() -> Iterator[IrosProcess]:
    config = {
        "server": SERVER,
        "auth": {"api_keys": [CLIENT_KEY], "admin_keys": [ADMIN_KEY]},
        "models": MODELS,
    }
    with IrosProcess.serve(config) as proc:
        yield proc


@pytest.fixture(scope="module")
def open_server() -> Iterator[IrosProcess]:
    with IrosProcess.serve({"server": SERVER, "auth": {"open": True}, "models": MODELS}) as proc:
        yield proc


# --- raw sockets -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def raw(proc: IrosProcess, source: str = "127.0.0.1") -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", proc.port), timeout=5, source_address=(source, 0))
    try:
        yield sock
    finally:
        sock.close()


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took (at most
    `timeout`: a connection still open then fails the test)."""
    start = time.monotonic()
    data = b""
    sock.settimeout(timeout)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the connection was still open after {timeout} s; got {data[:200]!r}") from None
    return data, time.monotonic() - start


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def error_of(response: bytes) -> dict[str, Any]:
    error: dict[str, Any] = orjson.loads(response.partition(b"\r\n\r\n")[2])["error"]
    return error


def head(method: str, path: str, *headers: str) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]).encode()


def trickle(sock: socket.socket, data: bytes, every: float, for_at_most: float) -> float:
    """Send `data` a byte at a time until the server closes; the seconds it took."""
    start = time.monotonic()
    for byte in data:
        if time.monotonic() - start > for_at_most:
            break
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(every)
    return time.monotonic() - start


# --- item 4: one body limit on every route -----------------------------------------------------------------
class TestBodyLimit:
    @pytest.mark.parametrize(
        ("method", "path"),
        [
            ("POST", "/api/feedback"),
            ("PUT", "/api/optimization/models/tune"),
            ("POST", "/api/alerts/silences"),
            ("POST", "/dashboard/login"),
            ("POST", "/v1/chat/completions"),
            ("POST", "/health"),
        ],
    )
    def test_a_declared_body_over_the_limit_gets_413_before_a_byte_is_read(
        self, keyed: IrosProcess, method: str, path: str
    ) -> None:
        """A Content-Length of 300 MB is refused from the header alone, and the connection closed."""
        with raw(keyed) as sock:
            sock.sendall(
                head(method, path, f"Authorization: Bearer {CLIENT_KEY}", "Content-Length: 300000000")
            )
            response, _ = read_until_closed(sock)  # no byte of the body was ever sent
        assert status_of(response) == 413, response[:300]
        assert error_of(response)["code"] == "body_too_large"

    @pytest.mark.parametrize("path", ["/api/feedback", "/api/optimization/models/tune"])
    def test_a_chunked_body_is_cut_at_the_limit_while_it_streams(self, keyed: IrosProcess, path: str) -> None:
        """A body without a Content-Length is counted as it arrives: past 16 KiB the answer is 413 and the
        connection is closed, however much more the client meant to send."""
        key = ADMIN_KEY if "optimization" in path else CLIENT_KEY
        with raw(keyed) as sock:
            sock.sendall(
                head("POST" if "feedback" in path else "PUT", path, f"Authorization: Bearer {key}")[:-2]
                + b"Transfer-Encoding: chunked\r\n\r\n"
            )
            for _ in range(5):  # 20 KiB of a body meant to be endless
                sock.sendall(b"1000\r\n" + b"x" * 4096 + b"\r\n")
            response, _ = read_until_closed(sock)
        assert status_of(response) == 413, response[:300]
        assert error_of(response)["code"] == "body_too_large"

    def test_a_body_within_the_limit_still_reaches_the_route(self, keyed: IrosProcess) -> None:
        """The limit leaves ordinary bodies alone: feedback for an unknown id is the route's own 404."""
        resp = httpx.post(
            f"{keyed.url}/api/feedback",
            headers={"authorization": f"Bearer {CLIENT_KEY}"},
            json={"request_id": "nope", "score": 1.0},
        )
        assert resp.status_code == 404, resp.text


# --- item 5: sockets that send no complete request ---------------------------------------------------------
class TestSlowSockets:
    def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
        self, keyed: IrosProcess
    ) -> None:
        """A socket opened and left silent is closed after header_timeout_seconds (1 s here)."""
        with raw(keyed) as sock:
            response, seconds = read_until_closed(sock)
        assert response == b""
        assert 0.5 < seconds < 4

    def test_an_idle_kept_alive_connection_is_closed(self, keyed: IrosProcess) -> None:
        """After an answer, a connection that sends no next request is closed after keep_alive_seconds."""
        with raw(keyed) as sock:
            sock.sendall(head("GET", "/health"))
            # The answer may come in more than one read: everything up to the close is that one answer.
            answer, seconds = read_until_closed(sock)
        assert status_of(answer) == 200 and answer.count(b"HTTP/1.1 ") == 1
        assert seconds < 4

    def test_a_header_trickled_a_byte_at_a_time_gets_408_and_is_closed(self, keyed: IrosProcess) -> None:
        """Header bytes that keep coming, but never end, do not hold the connection past the deadline."""
        with raw(keyed) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\n")
            seconds = trickle(sock, b"X-Slow: " + b"a" * 100, every=0.1, for_at_most=5)
            response, _ = read_until_closed(sock)
        assert seconds < 4
        if response:  # the 408 may be lost to the reset of a socket closed while the client writes
            assert status_of(response) == 408
            assert error_of(response)["code"] == "header_timeout"

    def test_a_trickled_login_form_gets_408_and_is_closed(self, keyed: IrosProcess) -> None:
        """A form whose bytes arrive slowly is cut off at body_timeout_seconds (2 s here)."""
        with raw(keyed) as sock:
            sock.sendall(
                head(
                    "POST",
                    "/dashboard/login",
                    "Content-Type: application/x-www-form-urlencoded",
                    "Content-Length: 200",
                )
            )
            seconds = trickle(sock, b"key=" + b"a" * 196, every=0.1, for_at_most=8)
            response, _ = read_until_closed(sock)
        assert seconds < 5
        if response:
            assert status_of(response) == 408
            assert error_of(response)["code"] == "body_timeout"

    def test_a_chat_request_whose_body_never_starts_gets_408(self, keyed: IrosProcess) -> None:
        """Headers that promise a body which never comes are answered 408 after body_start_timeout_seconds."""
        with raw(keyed) as sock:
            sock.sendall(
                head(
                    "POST",
                    "/v1/chat/completions",
                    f"Authorization: Bearer {CLIENT_KEY}",
                    "Content-Type: application/json",
                    "Content-Length: 100",
                )
            )
            response, seconds = read_until_closed(sock)
        assert status_of(response) == 408, response[:300]
        assert "did not start" in error_of(response)["message"]
        assert 0.5 < seconds < 4

    def test_one_address_gets_a_bounded_number_of_connections(self, keyed: IrosProcess) -> None:
        """The ninth open connection from one address is refused with 429 (cap 8), another address is
        still served, and a closed connection frees its place."""
        wait_until(lambda: _accepted(keyed, "127.0.0.1"), "earlier tests' connections to be gone")
        with contextlib.ExitStack() as stack:
            held = [stack.enter_context(raw(keyed)) for _ in range(8)]
            with raw(keyed) as ninth:
                ninth.sendall(head("GET", "/health"))
                response, _ = read_until_closed(ninth)
            if response:
                assert status_of(response) == 429
                assert error_of(response)["code"] == "too_many_connections"
            assert _accepted(keyed, "127.0.0.3")  # another address has its own count
            held[0].close()
            assert wait_until(lambda: _accepted(keyed, "127.0.0.1"), "a place to come free", timeout=5)


def _accepted(proc: IrosProcess, source: str) -> bool:
    with raw(proc, source) as sock:
        sock.sendall(head("GET", "/health", "Connection: close"))
        response, _ = read_until_closed(sock)
    return response.startswith(b"HTTP/1.1 200")


# --- item 6: the head is capped as it arrives --------------------------------------------------------------
class TestHeadSize:
    def test_an_endless_header_line_gets_431_at_the_cap(self, keyed: IrosProcess) -> None:
        """A header line with no end is refused once the head passes the cap, not when the line ends."""
        with raw(keyed) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * (HEAD_CAP + 4096))
            response, seconds = read_until_closed(sock)
        assert status_of(response) == 431, response[:300]
        assert error_of(response)["code"] == "headers_too_large"
        assert seconds < 1

    def test_150_mib_of_one_header_line_leaves_the_event_loop_free(self, keyed: IrosProcess) -> None:
        """The server stops reading a 150 MiB header line long before its end, and /health stays fast."""
        piece = b"a" * 65536
        sent = 0
        with raw(keyed) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nX-Long: ")
            with contextlib.suppress(OSError):
                while sent < 150 * 2**20:
                    sock.sendall(piece)
                    sent += len(piece)
            start = time.monotonic()
            assert httpx.get(f"{keyed.url}/health").status_code == 200
            health_seconds = time.monotonic() - start
        assert sent < 150 * 2**20  # the connection was closed under the sender
        assert health_seconds < 1


# --- item 7: open mode and other web pages -----------------------------------------------------------------
class TestOpenMode:
    def test_a_cross_site_plain_text_post_is_refused(self, open_server: IrosProcess) -> None:
        """A page elsewhere cannot create a silence or run chat: a foreign Origin on a POST is a 403."""
        silence = b'{"matchers": {"alertname": "x"}, "duration_minutes": 5}'
        for path, body in (("/api/alerts/silences", silence), ("/v1/chat/completions", orjson.dumps(CHAT))):
            resp = httpx.post(
                f"{open_server.url}{path}",
                content=body,
                headers={"content-type": "text/plain", "origin": "https://evil.example"},
            )
            assert resp.status_code == 403, resp.text
            assert resp.json()["error"]["code"] == "foreign_origin"

    def test_the_servers_own_pages_and_plain_clients_still_post(self, open_server: IrosProcess) -> None:
        """The same POST from the server's own origin, or from a client that sends no Origin, is served."""
        own = {"origin": open_server.url}
        assert httpx.post(f"{open_server.url}/v1/chat/completions", json=CHAT, headers=own).status_code == 200
        assert httpx.post(f"{open_server.url}/v1/chat/completions", json=CHAT).status_code == 200

    def test_a_websocket_from_a_foreign_origin_is_refused(self, open_server: IrosProcess) -> None:
        """A page elsewhere cannot read live metrics and alerts: the upgrade is answered 403."""
        url = open_server.url.replace("http", "ws") + "/ws/metrics"
        with pytest.raises(InvalidStatus) as refused:
            connect(url, origin="https://evil.example", open_timeout=5)  # type: ignore[arg-type]
        assert refused.value.response.status_code == 403
        with connect(url, origin=open_server.url, open_timeout=5) as ws:  # type: ignore[arg-type]
            assert orjson.loads(ws.recv(timeout=10))

    @pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "app.localhost"])
    def test_loopback_host_names_are_answered(self, open_server: IrosProcess, host: str) -> None:
        """localhost, loopback addresses and *.localhost, with the port, reach the server."""
        resp = httpx.get(f"{open_server.url}/health", headers={"host": f"{host}:{open_server.port}"})
        assert resp.status_code == 200

    @pytest.mark.parametrize(
        "host", ["evil.example", "evil.example:80", "10.0.0.1", "localhost.evil.example"]
    )
    def test_other_host_names_are_refused(self, open_server: IrosProcess, host: str) -> None:
        """A Host that is not a loopback name (what DNS rebinding sends) is a 400."""
        resp = httpx.get(f"{open_server.url}/health", headers={"host": host})
        assert resp.status_code == 400
        assert resp.json()["error"]["code"] == "invalid_host"


# --- the low rows ------------------------------------------------------------------------------------------
class TestLowRows:
    def _login(self, proc: IrosProcess, source: str) -> httpx.Response:
        transport = httpx.HTTPTransport(local_address=source)
        with httpx.Client(transport=transport) as client:
            return client.post(
                f"{proc.url}/dashboard/login",
                data={"key": ADMIN_KEY},
                headers={"x-forwarded-proto": "https"},
            )

    def test_the_session_cookie_is_secure_behind_a_trusted_tls_proxy(self, keyed: IrosProcess) -> None:
        """X-Forwarded-Proto: https from a configured proxy (127.0.0.2) marks the cookie Secure; the same
        header from any other address is ignored."""
        proxied = self._login(keyed, "127.0.0.2")
        direct = self._login(keyed, "127.0.0.1")
        assert proxied.status_code == direct.status_code == 303
        assert "secure" in proxied.headers["set-cookie"].lower()
        assert "secure" not in direct.headers["set-cookie"].lower()

    @pytest.mark.parametrize(
        "path", ["/v1/chat/completions", "/api/feedback", "/api/metrics/current", "/health"]
    )
    def test_two_authorization_headers_are_refused(self, keyed: IrosProcess, path: str) -> None:
        """Two Authorization headers are a 400 on every path, whichever of them is valid."""
        headers = httpx.Headers(
            [("authorization", f"Bearer {ADMIN_KEY}"), ("authorization", "Bearer sk-wrong")]
        )
        resp = httpx.post(f"{keyed.url}{path}", json=CHAT, headers=headers)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["code"] == "duplicate_authorization"

    def test_the_dashboards_static_html_has_the_page_headers(self, keyed: IrosProcess) -> None:
        """dashboard.html and its script, fetched as static files, carry the page route's security headers."""
        page = httpx.get(
            f"{keyed.url}/dashboard/optimization", headers={"authorization": f"Bearer {ADMIN_KEY}"}
        )
        assert page.status_code == 200
        for name in ("dashboard.html", "dashboard.js", "plotly.min.js"):
            static = httpx.get(f"{keyed.url}/dashboard/static/{name}")
            assert static.status_code == 200, name
            for header in ("content-security-policy", "x-content-type-options", "referrer-policy"):
                assert static.headers.get(header) == page.headers[header], (name, header)

    def test_a_key_in_a_websocket_query_string_is_not_logged(self, keyed: IrosProcess) -> None:
        """uvicorn logs each WebSocket's path; the query string, where a client may put a key, is left out."""
        url = keyed.url.replace("http", "ws") + f"/ws/metrics?key={SECRET}"
        with connect(url, additional_headers={"authorization": f"Bearer {ADMIN_KEY}"}, open_timeout=5) as ws:
            ws.recv(timeout=10)
        with pytest.raises(InvalidStatus):
            connect(url, open_timeout=5)
        wait_until(lambda: keyed.output().count('"WebSocket /ws/metrics?') >= 2, "both handshakes in the log")
        assert SECRET not in keyed.output()


async def test_the_secure_cookie_setting_marks_the_session_cookie_secure(tmp_path: Path) -> None:
    """With server.secure_cookie (TLS terminated by a proxy Iros does not trust for headers), the session
    cookie is Secure even on a plain-HTTP hop."""
    settings = load_settings(
        None,
        {
            "server": {"secure_cookie": True, "data_dir": str(tmp_path)},
            "auth": {"admin_keys": [ADMIN_KEY]},
            "models": MODELS,
            "cache": {"enabled": False},
            "metrics_collection": {"enabled": False},
        },
    )
    transport = httpx.ASGITransport(app=create_app(settings))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
        resp = await http.post("/dashboard/login", data={"key": ADMIN_KEY})
    assert resp.status_code == 303
    assert "secure" in resp.headers["set-cookie"].lower()
