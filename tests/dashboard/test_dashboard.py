"""The monitoring dashboard in a real headless Chromium (Debian's, driven by Playwright) against a real
`iros serve` with traffic: login, every widget with data, live updates, alert acknowledgement."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from iros.config import AuthSettings
from iros.dashboard.pages import PLOTLY_JS, STATIC
from iros.gateway.auth import KeyRing
from iros.gateway.sessions import Sessions
from iros.testing.iros import IrosProcess
from tests.conftest import ADMIN_KEY, CLIENT_KEY, SEED_PANELS

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
PAGE = "/dashboard/optimization"

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium: scripts/install --system"
)


def dashboard_config(upstream: IrosProcess) -> dict[str, Any]:
    return {
        "auth": {"api_keys": [CLIENT_KEY], "admin_keys": [{"name": "ops", "key_env": "TEST_ADMIN_KEY"}]},
        "models": [
            {
                "name": "fast",
                "base_url": f"{upstream.url}/v1",
                "upstream_model": "instant",
                # Priced, so the Cost widget has spend to show.
                "pricing": {"input_per_million": 2.5, "output_per_million": 10.0},
            },
            {"name": "local", "backend": "simulated", "profile": "instant"},
        ],
        "metrics_collection": {"collection_interval_seconds": 1, "storage": {"flush_interval_seconds": 1}},
        "cache": {"enabled": True, "semantic": False},
        # A rule that fires as soon as there is traffic, so the alerts widget has one to acknowledge.
        "alerting": {
            "evaluation_interval_seconds": 1,
            "target_rules": False,
            "alert_rules": [
                {
                    "name": "dashboard_traffic",
                    "condition": "count > 0",
                    "duration": "0s",
                    "severity": "warning",
                }
            ],
        },
        # An optimization rule that triggers at once, so there is an action with a before and after.
        "optimization": {
            "auto_optimization": {
                "evaluation_interval_seconds": 1,
                "optimization_rules": [
                    {"name": "dashboard_warming", "trigger": "count > 0", "actions": ["enable_cache_warming"]}
                ],
            }
        },
    }


def send_traffic(base: str, n: int, tag: str = "") -> None:
    with httpx.Client(base_url=base, headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=30) as c:
        for i in range(n):
            body = {
                "model": "fast" if i % 2 else "local",
                # Repeats: exact cache hits after the first of each.
                "messages": [{"role": "user", "content": f"dashboard question {i % 5} {tag}"}],
                "stream": i % 3 == 0,
            }
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def dash(upstream: IrosProcess) -> Iterator[IrosProcess]:
    with IrosProcess.serve(dashboard_config(upstream), env={"TEST_ADMIN_KEY": ADMIN_KEY}) as proc:
        send_traffic(proc.url, 40)
        yield proc


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Page:
    """One signed-in tab that records console errors and uncaught exceptions."""

    def __init__(self, browser: Any, base: str, width: int = 1366, height: int = 768) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.failed: list[str] = []
        self.page.on(
            "response", lambda r: self.failed.append(f"{r.status} {r.url}") if r.status >= 400 else None
        )
        self.base = base

    def login(self, key: str) -> None:
        self.page.goto(self.base + PAGE)
        self.page.fill("#key", key)
        self.page.click("#login-form button[type=submit]")

    def wait_all_widgets(self, timeout_ms: float = 45_000) -> None:
        try:
            self.page.wait_for_function(
                "() => { const ws = [...document.querySelectorAll('.widget')];"
                " return ws.length >= 15 && ws.every(w => w.dataset.state === 'ok'); }",
                timeout=timeout_ms,
            )
        except playwright_api.TimeoutError:
            raise AssertionError(f"widgets without data: {self.states()}") from None

    def states(self) -> dict[str, str]:
        pairs = self.page.eval_on_selector_all(
            ".widget", "ns => ns.map(n => [n.dataset.title || n.dataset.widget, n.dataset.state])"
        )
        return dict(pairs)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser: Any, dash: IrosProcess) -> Iterator[Page]:
    tab = Page(browser, dash.url)
    tab.login(ADMIN_KEY)
    tab.page.wait_for_url("**" + PAGE)
    yield tab
    tab.close()


def admin(base: str) -> httpx.Client:
    return httpx.Client(base_url=base, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)


def act_on_alert(page: Page, dash: IrosProcess, action: str) -> dict[str, Any]:
    """Click `action` on the first row of the Active alerts widget, wait until the page has done it, and
    return that alert as /api/alerts/active shows it."""
    button = page.page.locator(f'[data-title="Active alerts"] button[data-action="{action}"]').first
    button.wait_for(timeout=30_000)
    row_id = button.locator("xpath=ancestor::tr").get_attribute("data-id")
    assert row_id
    button.click()
    page.page.wait_for_function(
        "() => (document.querySelector('[data-title=\"Active alerts\"]').dataset.lastAction || '')"
        f".startsWith('{action}:2')",
        timeout=10_000,
    )
    with admin(dash.url) as c:
        body = c.get("/api/alerts/active").json()
    alerts = body if isinstance(body, list) else body.get("alerts", [])
    alert: dict[str, Any] = next(a for a in alerts if str(a.get("id", a.get("alert_id"))) == row_id)
    return alert


@pytest.mark.e2e
class TestLogin:
    def test_wrong_key_is_refused(self, browser: Any, dash: IrosProcess) -> None:
        """A wrong key gets the form back with an error and no session cookie."""
        tab = Page(browser, dash.url)
        try:
            tab.login(CLIENT_KEY)  # a client key is not an admin key
            tab.page.wait_for_selector(".login-error")
            assert "not an admin key" in tab.page.inner_text(".login-error")
            assert tab.page.url.endswith("/dashboard/login")
            assert not [c for c in tab.context.cookies() if c["name"] == "iros_session"]
        finally:
            tab.close()

    def test_admin_key_sets_an_httponly_strict_cookie(self, page: Page) -> None:
        """The right key leads to the dashboard with an HttpOnly, SameSite=Strict session cookie."""
        cookies = [c for c in page.context.cookies() if c["name"] == "iros_session"]
        assert len(cookies) == 1
        assert cookies[0]["httpOnly"] is True
        assert cookies[0]["sameSite"] == "Strict"
        assert page.page.evaluate("document.cookie") == ""  # scripts cannot read it

    def test_pages_and_apis_without_a_session_are_refused(self, dash: IrosProcess) -> None:
        """Without a key or cookie the page redirects to the login form and its APIs answer 401."""
        with httpx.Client(base_url=dash.url) as c:
            r = c.get(PAGE)
            assert r.status_code == 303 and r.headers["location"] == "/dashboard/login"
            assert c.get("/api/monitoring/dashboard/layout").status_code == 401
        with httpx.Client(base_url=dash.url, cookies={"iros_session": "b3Bz.9999999999.x"}) as c:
            assert c.get("/api/monitoring/dashboard/layout").status_code == 401

    def test_cookie_is_not_honoured_for_cross_site_posts(self, dash: IrosProcess) -> None:
        """A POST carrying the cookie from another origin does not act as the admin."""
        with httpx.Client(base_url=dash.url) as c:
            login = c.post("/dashboard/login", data={"key": ADMIN_KEY})
            assert login.status_code == 303
            assert c.get("/api/monitoring/dashboard/layout").status_code == 200
            # An invalid body: honoured, the request gets as far as validation (400); refused, 401.
            tune = "/api/optimization/models/tune"
            evil = c.put(tune, headers={"origin": "https://evil.example"}, json={"prefer_speed": "x"})
            assert evil.status_code == 401
            same = c.put(tune, headers={"origin": dash.url}, json={"prefer_speed": "x"})
            assert same.status_code == 400


@pytest.mark.e2e
class TestPage:
    def test_every_widget_shows_data_without_console_errors(self, page: Page, dash: IrosProcess) -> None:
        """Every widget of the page reaches the "ok" state with data, and the console has no errors."""
        try:
            page.wait_all_widgets()
        finally:
            ARTIFACTS.mkdir(exist_ok=True)
            page.page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        states = page.states()
        assert all(state == "ok" for state in states.values()), states
        for title in (*SEED_PANELS, "Recent optimization actions", "Recommendations", "Cost"):
            assert title in states, f"no {title!r} widget: {sorted(states)}"
        cost = page.page.inner_text('[data-title="Cost"] .body')
        assert "spent $" in cost and "client-0" in cost  # the client key's name, with its spend
        gpu = page.page.inner_text('[data-title="GPU Utilization"] .body')
        assert "no GPU" in gpu or "%" in gpu
        assert page.page.locator('[data-title="Response Time Trend"] .js-plotly-plot').count() == 1
        assert page.errors == [], page.failed

    def test_the_cache_widget_shows_its_verified_error_and_the_bound(self, page: Page) -> None:
        """Cache efficiency shows verification: the bound δ, the verified count, the estimated rate."""
        page.wait_all_widgets()
        section = page.page.locator('[data-title="Cache efficiency"] [data-key="verification"]')
        assert section.locator('dd[data-key="max_false_hit_rate"]').inner_text() == "5 %"
        assert section.locator('dd[data-key="verified"]').inner_text() == "0"
        assert section.locator('dd[data-key="false_hit_rate"]').inner_text() == "–"

    def test_phone_width_has_no_horizontal_scroll(self, browser: Any, dash: IrosProcess) -> None:
        """At phone width the page fits the screen: widgets stack and nothing overflows sideways."""
        tab = Page(browser, dash.url, width=390, height=844)
        try:
            tab.login(ADMIN_KEY)
            tab.page.wait_for_url("**" + PAGE)
            tab.wait_all_widgets()
            ARTIFACTS.mkdir(exist_ok=True)
            tab.page.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)
            overflow = tab.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0
            assert tab.errors == [], tab.failed
        finally:
            tab.close()

    def test_live_value_changes_within_3s_of_new_traffic(self, page: Page, dash: IrosProcess) -> None:
        """The live response count moves within 3 s of new requests, with no reload."""
        page.page.wait_for_selector('#live-state[data-state="open"]', timeout=15_000)
        cell = page.page.locator('[data-live-metric="count"]')
        page.page.wait_for_function(
            "() => document.querySelector('[data-live-metric=count]').textContent !== '–'", timeout=10_000
        )
        before = cell.inner_text()
        page.page.evaluate("window.__marker = 1")  # a reload would drop it
        send_traffic(dash.url, 6, tag="live")
        page.page.wait_for_function(
            "b => document.querySelector('[data-live-metric=count]').textContent !== b",
            arg=before,
            timeout=3_000,
        )
        assert cell.inner_text() != before
        assert page.page.evaluate("window.__marker") == 1

    def test_time_range_selector_reloads_the_charts(self, page: Page) -> None:
        """Choosing 1w redraws the trend over a week."""
        page.wait_all_widgets()
        page.page.click('#ranges button[data-range="1w"]')
        page.page.wait_for_function(
            "() => document.querySelector('[data-title=\"Response Time Trend\"] .note')"
            "?.textContent.includes('1w')",
            timeout=15_000,
        )
        assert page.page.get_attribute('#ranges button[data-range="1w"]', "aria-pressed") == "true"
        page.page.wait_for_timeout(1000)  # let the old charts go: no errors from their removal
        assert page.errors == [], page.failed

    def test_acknowledge_button_changes_the_alert_state(self, page: Page, dash: IrosProcess) -> None:
        """Clicking Acknowledge on a firing alert acknowledges it in /api/alerts/active."""
        alert = act_on_alert(page, dash, "acknowledge")
        assert alert.get("acknowledged") is True or alert.get("state") == "acknowledged", alert

    def test_silence_button_silences_the_alert(self, page: Page, dash: IrosProcess) -> None:
        """Clicking Silence on a firing alert silences it in /api/alerts/active."""
        alert = act_on_alert(page, dash, "silence")
        assert alert.get("silenced") is True, alert


@pytest.mark.e2e
class TestAssets:
    def test_plotly_comes_from_the_installed_package(self, dash: IrosProcess) -> None:
        """plotly.min.js is the plotly package's own file, served without any CDN."""
        with httpx.Client(base_url=dash.url) as c:
            r = c.get("/dashboard/static/plotly.min.js")
        assert r.status_code == 200
        assert r.content == PLOTLY_JS.read_bytes()
        page = (STATIC / "dashboard.html").read_text()
        assert "http://" not in page and "https://" not in page

    def test_layout_lists_the_seed_panels(self, dash: IrosProcess) -> None:
        """The layout names the seed's three panels and each extra widget's API."""
        with admin(dash.url) as c:
            layout = c.get("/api/monitoring/dashboard/layout").json()
            panels = {p["id"]: p for p in layout["panels"]}
            assert {"system_overview", "response_performance", "resource_utilization"} <= set(panels)
            assert layout["time_ranges"] == ["1h", "1d", "1w", "1m"]
            for panel in panels.values():
                if "source" in panel:
                    r = c.get(panel["source"])
                    assert r.status_code == 200 and panel["id"] in r.json()
            histogram = c.get("/api/monitoring/dashboard/performance").json()["response_performance"][
                "charts"
            ][1]
            assert histogram["buckets"] == [0, 500, 1000, 2000, 5000, 10000]

    def test_open_mode_needs_no_login(self, upstream: IrosProcess) -> None:
        """With auth.open the dashboard page loads without a key."""
        config = {"auth": {"open": True}, "models": [{"name": "local", "backend": "simulated"}]}
        with IrosProcess.serve(config) as proc, httpx.Client(base_url=proc.url) as c:
            r = c.get(PAGE)
            assert r.status_code == 200 and "dashboard.js" in r.text
            assert "default-src 'self'" in r.headers["content-security-policy"]


class TestSessions:
    def ring(self, sessions: Sessions, *admins: str) -> KeyRing:
        auth = AuthSettings.model_validate({"api_keys": [CLIENT_KEY], "admin_keys": list(admins)})
        return KeyRing(auth, sessions)

    def test_only_admin_keys_get_a_session(self, tmp_path: Path) -> None:
        """A client key or an unknown key gets no token; an admin key gets one that checks out."""
        ring = self.ring(Sessions.for_data_dir(tmp_path), ADMIN_KEY)
        assert ring.issue_session(CLIENT_KEY) is None and ring.issue_session("nope") is None
        token = ring.issue_session(ADMIN_KEY)
        assert token and ADMIN_KEY not in token
        assert ring.check_session(token) is not None
        assert (tmp_path / "dashboard-session.key").stat().st_mode & 0o777 == 0o600

    def test_tampered_expired_or_revoked_tokens_fail(self, tmp_path: Path) -> None:
        """A changed signature, a past expiry or a key removed from the config ends the session."""
        sessions = Sessions.for_data_dir(tmp_path)
        ring = self.ring(sessions, ADMIN_KEY)
        token = ring.issue_session(ADMIN_KEY)
        assert token
        name, expiry, sid, mac = token.split(".")
        assert ring.check_session(f"{name}.{expiry}.{sid}.{mac[:-2]}xx") is None
        assert ring.check_session(f"{name}.{int(expiry) + 1}.{sid}.{mac}") is None
        assert self.ring(Sessions(sessions.secret, ttl=-1), ADMIN_KEY).issue_session(ADMIN_KEY) is not None
        expired = self.ring(Sessions(sessions.secret, ttl=-1), ADMIN_KEY)
        assert expired.check_session(expired.issue_session(ADMIN_KEY) or "") is None
        # Another process with the same data directory accepts it; one whose config lost the key does not.
        assert self.ring(Sessions.for_data_dir(tmp_path), ADMIN_KEY).check_session(token) is not None
        assert self.ring(Sessions.for_data_dir(tmp_path), "sk-other-admin").check_session(token) is None
