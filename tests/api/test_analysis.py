"""The analysis API on a running Iros with traffic: capacity, reports, troubleshooting, auth, bad input."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from iros.testing.iros import IrosProcess

pytestmark = pytest.mark.e2e

ADMIN = {"authorization": "Bearer sk-admin-a"}
CLIENT = {"authorization": "Bearer sk-client-a"}
GOOD, FAILING = 24, 4

GETS = [
    "/api/analysis/bottlenecks",
    "/api/analysis/capacity",
    "/api/analysis/capacity/recommendations",
    "/api/analysis/performance/response-time",
    "/api/analysis/performance/models",
    "/api/analysis/performance/optimizations",
    "/api/analysis/performance/cpu",
    "/api/analysis/performance/memory",
    "/api/analysis/performance/gpu",
    "/api/analysis/compare/models",
    "/api/analysis/reports/daily/latest",
]


def chat(url: str, model: str, stream: bool) -> int:
    body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hello"}]}
    with httpx.Client(base_url=url, timeout=30) as client:
        return client.post("/v1/chat/completions", json=body, headers=CLIENT).status_code


@pytest.fixture(scope="module")
def client(upstream: IrosProcess) -> Iterator[httpx.Client]:
    config = {
        "server": {"host": "127.0.0.1"},
        "auth": {"api_keys": ["sk-client-a"], "admin_keys": ["sk-admin-a"]},
        "retry": {"attempts": 1},
        "metrics_collection": {"collection_interval_seconds": 1},
        "models": [
            {"name": "fast", "base_url": f"{upstream.url}/v1", "upstream_model": "instant"},
            {"name": "broken", "base_url": f"{upstream.url}/v1", "upstream_model": "error-500"},
        ],
    }
    with IrosProcess.serve(config) as iros, httpx.Client(base_url=iros.url, timeout=60) as c:
        calls = [("fast", i % 2 == 0) for i in range(GOOD)] + [("broken", False)] * FAILING
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda a: chat(iros.url, *a), calls))
        assert codes.count(200) == GOOD and codes.count(502) == FAILING
        yield c


def until(fetch: Callable[[], httpx.Response], ready: Callable[[Any], bool], seconds: float = 20) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        r = fetch()
        assert r.status_code == 200, r.text
        body = r.json()
        if ready(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.3)


class TestCapacity:
    def test_current_capacity_is_measured_from_the_traffic(self, client: httpx.Client) -> None:
        """The seed's current_capacity counts the requests sent, with rates and utilisation measured."""
        out = until(
            lambda: client.get("/api/analysis/capacity", headers=ADMIN),
            lambda b: b["capacity_planning"]["current_capacity"]["requests"] >= GOOD + FAILING,
        )
        current = out["capacity_planning"]["current_capacity"]
        assert current["requests"] == GOOD + FAILING
        assert current["max_concurrent_requests"] >= 1
        assert 0 < current["avg_requests_per_second"] <= current["peak_requests_per_second"]
        use = current["resource_utilization"]
        assert 0 <= use["cpu"] <= 1 and 0 < use["memory"] < 1
        assert set(use) >= {"cpu", "memory", "gpu"}

    def test_projections_refuse_a_history_of_minutes(self, client: httpx.Client) -> None:
        """A fresh server has no whole day stored: the projection is a 422 that says so."""
        r = client.get("/api/analysis/capacity/projections", headers=ADMIN)
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "insufficient_history"

    def test_recommendations_size_the_current_peak(self, client: httpx.Client) -> None:
        """Without a projection, replicas are sized for the measured peak and the answer says why."""
        out = client.get("/api/analysis/capacity/recommendations", headers=ADMIN).json()
        plan = out["recommendations"]
        current = plan["scenarios"]["current"]
        assert current["replicas"] >= 1
        assert current["requests_per_second"] == out["current_capacity"]["peak_requests_per_second"]
        assert any("insufficient history" in f for f in plan["findings"])


class TestReports:
    def test_a_generated_daily_report_is_stored_as_the_latest(self, client: httpx.Client) -> None:
        """POST makes a report from the traffic; GET latest returns that same stored report."""
        until(
            lambda: client.get("/api/analysis/capacity", headers=ADMIN),
            lambda b: b["capacity_planning"]["current_capacity"]["requests"] >= GOOD + FAILING,
        )
        made = client.post("/api/analysis/reports/daily", headers=ADMIN)
        assert made.status_code == 200
        report = made.json()
        summary = report["daily_report"]["summary"]
        assert summary["total_requests"] == GOOD + FAILING
        assert summary["error_rate"] == pytest.approx(FAILING / (GOOD + FAILING), abs=1e-4)
        assert set(report["daily_report"]["trends"]) >= {"response_time", "cpu_usage", "cache_performance"}
        latest = client.get("/api/analysis/reports/daily/latest", headers=ADMIN).json()
        assert latest["id"] == report["id"]

    def test_the_scheduler_stores_the_last_whole_week(self, client: httpx.Client) -> None:
        """Started with the server, the scheduler writes the previous week's report without being asked."""
        deadline = time.monotonic() + 20
        while (r := client.get("/api/analysis/reports/weekly/latest", headers=ADMIN)).status_code == 404:
            assert time.monotonic() < deadline
            time.sleep(0.3)
        body = r.json()["weekly_report"]
        assert body["period"]["end"].startswith(time.strftime("%Y"))  # a real period, recent
        history = client.get("/api/analysis/reports/weekly/history", headers=ADMIN).json()["reports"]
        assert history and history[0]["id"] == r.json()["id"]


class TestTroubleshooting:
    def test_models_view_finds_the_failing_model(self, client: httpx.Client) -> None:
        """Per-model figures show the failing model's error rate, and a finding names it."""
        out = until(
            lambda: client.get("/api/analysis/performance/models", headers=ADMIN),
            lambda b: b["models"].get("broken", {}).get("requests", 0) >= FAILING,
        )
        assert out["models"]["broken"]["error_rate"] == 1.0
        assert out["models"]["fast"]["error_rate"] == 0.0
        assert any(f.startswith("broken fails most") for f in out["findings"])

    def test_every_view_answers_with_findings(self, client: httpx.Client) -> None:
        """Each troubleshooting view returns its figures with at least one finding."""
        for view in ("response-time", "models", "optimizations", "cpu", "memory", "gpu"):
            r = client.get(f"/api/analysis/performance/{view}", headers=ADMIN)
            assert r.status_code == 200, view
            assert r.json()["findings"], view

    def test_response_time_breaks_down_by_model_and_stage(self, client: httpx.Client) -> None:
        """Response time is split by model and the stage groups' shares add up to one."""
        out = client.get("/api/analysis/performance/response-time", headers=ADMIN).json()
        assert out["by_model"]["fast"]["count"] > 0
        shares = [g["share"] for g in out["stage_groups"].values() if g["share"] is not None]
        assert sum(shares) == pytest.approx(1.0, abs=1e-3)

    def test_compare_models_ranks_answered_models(self, client: httpx.Client) -> None:
        """Only models with answered requests are ranked by median latency."""
        out = client.get("/api/analysis/compare/models", headers=ADMIN).json()
        assert out["ranking_by_p50"] == ["fast"]

    def test_optimizations_include_the_optimizer_audit(self, client: httpx.Client) -> None:
        """The optimization view carries the optimizer's audit beside the measured effects."""
        out = client.get("/api/analysis/performance/optimizations", headers=ADMIN).json()
        assert isinstance(out["optimizer_audit"], list)
        assert out["streaming"]["ttft_ms"]["count"] > 0


class TestAccess:
    @pytest.mark.parametrize("path", GETS)
    def test_every_view_needs_the_admin_key(self, client: httpx.Client, path: str) -> None:
        """A client key is forbidden and no key is unauthorised."""
        assert client.get(path, headers=CLIENT).status_code == 403
        assert client.get(path).status_code == 401

    @pytest.mark.parametrize(
        ("query", "param"),
        [
            ("start=2024-01-02&end=2024-01-01", "start"),
            ("start=yesterday", "start"),
            ("window=soon", "window"),
            ("start=2000-01-01", "start"),
        ],
    )
    def test_bad_ranges_are_clear_400s(self, client: httpx.Client, query: str, param: str) -> None:
        """Unreadable or reversed ranges are refused with the parameter named."""
        r = client.get(f"/api/analysis/bottlenecks?{query}", headers=ADMIN)
        assert r.status_code == 400
        assert r.json()["error"]["param"] == param

    def test_unknown_report_kinds_are_404(self, client: httpx.Client) -> None:
        """Only daily and weekly reports exist."""
        assert client.post("/api/analysis/reports/monthly", headers=ADMIN).status_code == 404
        assert client.get("/api/analysis/reports/hourly/latest", headers=ADMIN).status_code == 404

    def test_a_dated_bottleneck_window_is_accepted(self, client: httpx.Client) -> None:
        """The seed's ISO start and end select the window analysed."""
        day = time.strftime("%Y-%m-%d", time.gmtime())
        r = client.get(f"/api/analysis/bottlenecks?start={day}T00:00:00&end={day}T23:59:59", headers=ADMIN)
        assert r.status_code == 200
        assert r.json()["requests"] >= GOOD
