"""The monitoring dashboard at /dashboard/optimization: the page, its login form and its assets.

The page is static HTML and JavaScript (static/) that draws what /api/monitoring/dashboard/layout
lists, with plotly.js served from the installed `plotly` package (no CDN: it works offline).

Browsers cannot put an admin key on a WebSocket or keep it from scripts, so the login form trades the
key for a signed session cookie (HttpOnly, SameSite=Strict; iros.gateway.sessions), and
SessionCookieMiddleware turns that cookie into "Authorization: Session <token>" for every route, which
KeyRing.authenticate checks:

    keyring = KeyRing(settings.auth, Sessions.for_data_dir(Path("iros-data")))
    app = Starlette(routes=DashboardPages(keyring).routes(), middleware=[Middleware(SessionCookieMiddleware)])
"""

from __future__ import annotations

import html
import importlib.util
import logging
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from iros.core.errors import IrosError
from iros.gateway.auth import KeyRing, Role

log = logging.getLogger("iros.dashboard")

COOKIE = "iros_session"
STATIC = Path(__file__).parent / "static"


def _plotly_js() -> Path:
    """The plotly package's own plotly.min.js, found without importing the Python library."""
    spec = importlib.util.find_spec("plotly")
    folders = list(spec.submodule_search_locations or []) if spec else []
    return Path(folders[0] if folders else "plotly-is-not-installed") / "package_data" / "plotly.min.js"


PLOTLY_JS = _plotly_js()
PAGE = "/dashboard/optimization"
LOGIN = "/dashboard/login"
MAX_FORM_BYTES = 4096
# plotly.js adds <style> elements at run time; nothing else inline is needed.
CSP = (
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)


def _cookie(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name != b"cookie":
            continue
        for part in value.decode("latin-1").split(";"):
            key, _, val = part.strip().partition("=")
            if key == COOKIE and val:
                return val
    return None


def _same_origin(headers: list[tuple[bytes, bytes]]) -> bool:
    """No Origin header, or one whose host is this Host: a page elsewhere cannot ride the cookie."""
    values = dict(headers)
    origin = values.get(b"origin")
    if origin is None:
        return True
    return urlsplit(origin.decode("latin-1")).netloc == values.get(b"host", b"").decode("latin-1")


class SessionCookieMiddleware:
    """Turns the session cookie into "Authorization: Session <token>" when no key was sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers: list[tuple[bytes, bytes]] = scope["headers"]
            token = _cookie(headers)
            safe = scope["type"] == "http" and scope["method"] in ("GET", "HEAD")
            if (
                token
                and not any(name == b"authorization" for name, _ in headers)
                and (safe or _same_origin(headers))
            ):
                scope = {**scope, "headers": [*headers, (b"authorization", f"Session {token}".encode())]}
        await self.app(scope, receive, send)


class DashboardPages:
    def __init__(self, keyring: KeyRing, secure_cookie: bool = False) -> None:
        self.keyring = keyring
        self.secure_cookie = secure_cookie

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/dashboard", self.home, methods=["GET"]),
            Route(PAGE, self.page, methods=["GET"]),
            Route(LOGIN, self.login_form, methods=["GET"]),
            Route(LOGIN, self.login, methods=["POST"]),
            Route("/dashboard/logout", self.logout, methods=["POST"]),
            Route("/dashboard/static/plotly.min.js", self.plotly_js, methods=["GET"]),
            Mount("/dashboard/static", app=_Secured(StaticFiles(directory=STATIC)), name="dashboard-static"),
        ]

    def _signed_in(self, request: Request) -> bool:
        try:
            self.keyring.authenticate(request.headers.get("authorization"), Role.ADMIN)
        except IrosError:
            return False
        return True

    async def home(self, request: Request) -> Response:
        return RedirectResponse(PAGE, status_code=303)

    async def page(self, request: Request) -> Response:
        if not self._signed_in(request):
            return RedirectResponse(LOGIN, status_code=303)
        body = (STATIC / "dashboard.html").read_text()
        return HTMLResponse(body, headers=_page_headers())

    async def plotly_js(self, request: Request) -> Response:
        if not PLOTLY_JS.is_file():
            raise IrosError(503, "plotly.min.js is missing: reinstall with scripts/install", code="no_plotly")
        headers = {**_security_headers(), "cache-control": "public, max-age=86400"}
        return FileResponse(PLOTLY_JS, media_type="text/javascript", headers=headers)

    async def login_form(self, request: Request) -> Response:
        if self._signed_in(request):
            return RedirectResponse(PAGE, status_code=303)
        return HTMLResponse(_login_html(), headers=_page_headers())

    async def login(self, request: Request) -> Response:
        # Wrong keys slow their address down (iros.gateway.keyguard, around every route): never a lockout.
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise IrosError(413, f"the login form is at most {MAX_FORM_BYTES} bytes", code="too_large")
        key = (parse_qs(body.decode("utf-8", "replace")).get("key") or [""])[0]
        if self.keyring.sessions is None:
            return HTMLResponse(
                _login_html("Sessions are unavailable on this server."), 503, headers=_page_headers()
            )
        token = self.keyring.issue_session(key) if key else None
        if token is None:
            return HTMLResponse(
                _login_html("That is not an admin key."), status_code=401, headers=_page_headers()
            )
        response = RedirectResponse(PAGE, status_code=303)
        response.set_cookie(
            COOKIE,
            token,
            max_age=int(self.keyring.sessions.ttl),
            path="/",
            httponly=True,
            samesite="strict",
            secure=self.secure_cookie or request.url.scheme == "https",
        )
        return response

    async def logout(self, request: Request) -> Response:
        # The session ends on the server too: the old cookie fails in every worker from now on.
        # The cookie arrives as "Session <token>" only from this site (SessionCookieMiddleware).
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        if scheme == "Session" and token:
            self.keyring.end_session(token.strip())
        response = RedirectResponse(LOGIN, status_code=303)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response


def _page_headers() -> dict[str, str]:
    return {**_security_headers(), "cache-control": "no-store"}


def _security_headers() -> dict[str, str]:
    return {
        "content-security-policy": CSP,
        "x-content-type-options": "nosniff",
        "referrer-policy": "same-origin",
    }


class _Secured:
    """The static files with the page's security headers: dashboard.html is reachable here too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.headers = [(k.encode(), v.encode()) for k, v in _security_headers().items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, secured)


def _login_html(error: str | None = None) -> str:
    message = f'<p class="login-error" role="alert">{html.escape(error)}</p>' if error else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Iros · sign in</title><link rel="icon" href="data:,">
<link rel="stylesheet" href="/dashboard/static/dashboard.css"></head>
<body class="login-page"><main class="login-box">
<h1>Iros dashboard</h1>
<form method="post" action="{LOGIN}" id="login-form">
<label for="key">Admin key</label>
<input id="key" name="key" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button>
</form>{message}
</main></body></html>"""
