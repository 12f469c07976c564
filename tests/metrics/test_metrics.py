"""Metrics end to end: a real Iros serving real requests, read back through /metrics, the metrics API,
the live WebSocket and SSE streams, and the time-series store across a restart."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from iros.testing.iros import IrosProcess, wait_until
from tests.conftest import ADMIN_KEY, CLIENT_KEY

pytestmark = pytest.mark.e2e

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
CLIENT = {"authorization": f"Bearer {CLIENT_KEY}"}
FAST = {
    "live_interval_seconds": 0.2,
    "collection_interval_seconds": 0.5,
    "relevance_sample_rate": 1.0,
    "stall_threshold_ms": 4,
    "storage": {"flush_interval_seconds": 0.2},
}


def monitored_config(data_dir: Path, **metrics: Any) -> dict[str, Any]:
    return {
        "server": {"data_dir": str(data_dir)},
        "auth": {"api_keys": [CLIENT_KEY], "admin_keys": [{"name": "ops", "key_env": "TEST_ADMIN_KEY"}]},
        "retry": {"attempts": 1},
        "models": [
            {"name": "alpha", "backend": "simulated", "profile": "instant", "accuracy": 0.9},
            {"name": "beta", "backend": "simulated", "profile": "lightweight", "accuracy": 0.8},
            {"name": "boom", "backend": "simulated", "profile": "error-500"},
        ],
        "metrics_collection": {**FAST, **metrics},
    }


def serve(data_dir: Path, **metrics: Any) -> IrosProcess:
    return IrosProcess.serve(monitored_config(data_dir, **metrics), env={"TEST_ADMIN_KEY": ADMIN_KEY})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("metrics-data")


@pytest.fixture(scope="module")
def monitored(data_dir: Path) -> Iterator[IrosProcess]:
    with serve(data_dir) as proc:
        yield proc


def chat(
    proc: IrosProcess, model: str, stream: bool = False, text: str = "what is the capital of France"
) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 12,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    resp = httpx.post(f"{proc.url}/v1/chat/completions", json=body, headers=CLIENT, timeout=30)
    return resp


def get(proc: IrosProcess, path: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{proc.url}{path}", params=params, headers=ADMIN, timeout=30)


# Metrics arrive a tick after the request.
eventually = partial(wait_until, timeout=10.0)


def scrape(proc: IrosProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = get(proc, "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


@pytest.fixture(scope="module")
def traffic(monitored: IrosProcess) -> dict[str, int]:
    """A known mix: 12 alpha, 4 beta streams, 3 failures on boom, 2 unknown models."""
    for _ in range(12):
        assert chat(monitored, "alpha").status_code == 200
    for _ in range(4):
        assert chat(monitored, "beta", stream=True).status_code == 200
    for _ in range(3):
        assert chat(monitored, "boom").status_code == 502
    for i in range(2):
        assert chat(monitored, f"no-such-model-{i}").status_code == 404
    return {"alpha": 12, "beta": 4, "boom": 3, "other": 2}


class TestPrometheusExposition:
    def test_counts_requests_by_model_status_and_cache(
        self, monitored: IrosProcess, traffic: dict[str, int]
    ) -> None:
        samples = eventually(lambda: (s := scrape(monitored)) and total(s, "iros_requests_total") >= 21 and s)
        assert total(samples, "iros_requests_total", model="alpha", code="200", cache="bypass") == 12
        assert total(samples, "iros_requests_total", model="beta", code="200") == 4
        assert total(samples, "iros_requests_total", model="boom", code="502") == 3
        # Unknown model names fold into one label value: the label set stays bounded.
        assert total(samples, "iros_requests_total", model="other", code="404") == 2
        assert not any("no-such-model" in str(labels) for _, labels in samples)

    def test_histograms_cover_latency_ttft_tpot_overhead_and_tokens(
        self, monitored: IrosProcess, traffic: dict[str, int]
    ) -> None:
        samples = eventually(lambda: (s := scrape(monitored)) and total(s, "iros_requests_total") >= 21 and s)
        assert total(samples, "iros_request_duration_seconds_count", model="alpha", outcome="ok") == 12
        assert (
            total(samples, "iros_request_duration_seconds_count", model="boom", outcome="server_error") == 3
        )
        assert total(samples, "iros_time_to_first_token_seconds_count", model="beta") == 4
        assert total(samples, "iros_time_per_output_token_seconds_count", model="beta") == 4
        assert total(samples, "iros_overhead_seconds_count") == 16
        # Buckets are cumulative and end at +Inf with the count.
        inf = total(samples, "iros_request_duration_seconds_bucket", model="alpha", outcome="ok", le="+Inf")
        assert inf == 12
        assert total(samples, "iros_tokens_total", model="alpha", type="output") > 0
        assert total(samples, "iros_system_cpu_percent") >= 0
        assert any(n == "iros_process_resident_memory_bytes" for n, _ in samples)

    def test_metrics_endpoint_needs_the_admin_key(self, monitored: IrosProcess) -> None:
        assert httpx.get(f"{monitored.url}/metrics").status_code == 401
        assert httpx.get(f"{monitored.url}/metrics", headers=CLIENT).status_code == 403


class TestCurrentAndKpis:
    def test_current_reports_response_kpis_per_model_and_user_experience(
        self, monitored: IrosProcess, traffic: dict[str, int]
    ) -> None:
        report = eventually(
            lambda: (
                (r := get(monitored, "/api/metrics/current", window="5m").json())
                and r["response"]["count"] >= 21
                and r
            )
        )
        response = report["response"]
        assert response["count"] == 21
        # 16 answered; 3 upstream failures and 2 unknown models are errors.
        assert response["error_rate"] == pytest.approx(5 / 21, abs=1e-4)
        assert response["availability"] == pytest.approx(1 - 3 / 21, abs=1e-4)
        assert (
            0
            < response["response_time_p50"]
            <= response["response_time_p95"]
            <= response["response_time_p99"]
        )
        assert response["throughput_rps"] > 0
        assert response["cache_hit_rate"] is None  # nothing was looked up in a cache
        models = report["models"]
        assert models["alpha"]["usage_count"] == 12 and models["alpha"]["error_rate"] == 0
        assert models["boom"]["error_rate"] == 1.0
        assert models["alpha"]["accuracy_score"] == 0.9
        ux = report["user_experience"]
        assert ux["streams"] == 4
        assert ux["ttft_avg_ms"] > 0
        # beta's tokens come ~7 ms apart, over the 4 ms stall threshold: every stream stalled.
        assert ux["streams_with_stall"] == 4 and ux["streaming_continuity"] == 0
        assert 0 <= ux["relevance"] <= 1
        assert report["business"]["completion_tokens"] > 0
        assert report["status"] in ("healthy", "degraded", "critical")
        assert report["kpis"]["error_rate"]["level"] == "critical"  # 24% errors is over the 10% line
        recent = report["recent_responses"][-1]
        for key in (
            "response_time",
            "cpu_usage",
            "memory_usage",
            "gpu_usage",
            "cache_hit",
            "model_used",
            "content_length",
            "optimization_applied",
            "user_satisfaction",
        ):
            assert key in recent

    def test_system_status_is_critical_from_the_error_rate(
        self, monitored: IrosProcess, traffic: dict[str, int]
    ) -> None:
        status = eventually(
            lambda: (
                (r := httpx.get(f"{monitored.url}/api/system/status", headers=CLIENT).json())
                and r["status"] == "critical"
                and r
            )
        )
        assert status["kpis"]["error_rate"]["value"] > 0.1

    def test_model_metrics_have_the_seed_shape(self, monitored: IrosProcess, traffic: dict[str, int]) -> None:
        data = eventually(
            lambda: (r := get(monitored, "/api/metrics/models/beta").json()) and r["usage_count"] >= 4 and r
        )
        for key in (
            "model_id",
            "response_time",
            "accuracy_score",
            "resource_usage",
            "usage_count",
            "error_rate",
            "user_preference_score",
        ):
            assert key in data
        assert data["ttft_avg_ms"] > 0 and data["tpot_avg_ms"] > 0
        assert get(monitored, "/api/metrics/models/nope").status_code == 404

    def test_performance_compares_kpis_with_targets(
        self, monitored: IrosProcess, traffic: dict[str, int]
    ) -> None:
        data = get(monitored, "/api/metrics/performance").json()
        kpi = data["kpis"]["response_time_ms"]
        assert kpi["target"] == 2000 and kpi["critical_threshold"] == 5000
        assert kpi["level"] == "ok" and kpi["meets_target"] is True

    def test_resources_report_host_process_and_absent_gpu(self, monitored: IrosProcess) -> None:
        data = get(monitored, "/api/system/resources").json()
        assert 0 <= data["cpu_utilization"] <= 100 and 0 < data["memory_utilization"] <= 100
        assert data["process_memory_bytes"] > 10_000_000
        assert set(data["network_io"]) == {"rx_bytes_per_second", "tx_bytes_per_second"}
        assert data["gpu"]["available"] is False and data["gpu_utilization"] is None
        assert "no GPU" in data["gpu"]["message"]


class TestFeedback:
    def test_feedback_scores_the_model_that_answered(self, monitored: IrosProcess) -> None:
        resp = chat(monitored, "alpha")
        request_id = resp.headers["x-iros-request-id"]
        sent = eventually(
            lambda: (
                (
                    r := httpx.post(
                        f"{monitored.url}/api/feedback",
                        headers=CLIENT,
                        json={"request_id": request_id, "score": 0.8},
                    )
                ).status_code
                != 404
                and r
            )
        )
        assert sent.status_code == 200 and sent.json()["model"] == "alpha"
        again = httpx.post(
            f"{monitored.url}/api/feedback", headers=CLIENT, json={"request_id": request_id, "score": 1}
        )
        assert again.status_code == 409
        report = eventually(
            lambda: (
                (r := get(monitored, "/api/metrics/current").json())
                and r["user_experience"]["feedback_count"] >= 1
                and r
            )
        )
        assert report["user_experience"]["user_satisfaction"] == pytest.approx(0.8, rel=0.02)
        assert report["models"]["alpha"]["user_preference_score"] == pytest.approx(0.8, rel=0.02)
        assert report["user_experience"]["content_quality_score"] is not None

    @pytest.mark.parametrize(
        ("body", "status"),
        [
            ({"request_id": "unknown-id", "score": 0.5}, 404),
            ({"request_id": "x", "score": 7}, 400),
            ({"request_id": "x", "score": "good"}, 400),
            ({"score": 0.5}, 400),
            ([1, 2], 400),
        ],
    )
    def test_bad_feedback_is_a_clear_4xx(self, monitored: IrosProcess, body: Any, status: int) -> None:
        resp = httpx.post(f"{monitored.url}/api/feedback", headers=CLIENT, json=body)
        assert resp.status_code == status
        assert resp.json()["error"]["message"]


class TestHistory:
    def test_historical_points_add_up_to_the_requests_sent(
        self, monitored: IrosProcess, traffic: dict[str, int]
    ) -> None:
        def alpha_count() -> Any:
            data = get(
                monitored, "/api/metrics/historical", metric="response_time", step="60", model="alpha"
            ).json()
            points = data["series"]["response_time_ms"]["points"]
            return sum(p["count"] for p in points) >= 12 and data

        data = eventually(alpha_count)
        points = data["series"]["response_time_ms"]["points"]
        assert data["source"] == "sqlite"
        assert sum(p["count"] for p in points) >= 12  # the feedback test may add one more
        assert all(p["p50"] <= p["p95"] <= p["p99"] <= p["max"] for p in points)

    def test_default_history_covers_response_time_cpu_and_memory(self, monitored: IrosProcess) -> None:
        data = eventually(
            lambda: (
                (d := get(monitored, "/api/metrics/historical", start="2020-01-01").json())
                and d["series"]["cpu_percent"]["points"]
                and d
            )
        )
        assert set(data["series"]) == {"response_time_ms", "cpu_percent", "memory_percent"}
        assert data["step_seconds"] == 86400  # six years of range at ~300 points -> daily

    def test_aggregated_reads_the_rollup_interval(
        self, monitored: IrosProcess, traffic: dict[str, int]
    ) -> None:
        data = eventually(
            lambda: (
                (d := get(monitored, "/api/metrics/aggregated", interval="1m", metric="response_time").json())
                and d["points"]
                and d
            )
        )
        assert data["interval"] == "1m" and data["metric"] == "response_time_ms"
        assert all(p["timestamp"].endswith(":00+00:00") for p in data["points"])

    @pytest.mark.parametrize(
        ("path", "params", "param"),
        [
            ("/api/metrics/historical", {"start": "2024-13-45"}, "start"),
            ("/api/metrics/historical", {"start": "2024-01-02", "end": "2024-01-01"}, "start"),
            ("/api/metrics/historical", {"metric": "nonsense"}, "metric"),
            ("/api/metrics/historical", {"step": "-5"}, "step"),
            ("/api/metrics/historical", {"start": "2000-01-01", "step": "10"}, "step"),
            ("/api/metrics/historical", {"metric": "cpu_percent", "model": "alpha"}, "model"),
            ("/api/metrics/aggregated", {"interval": "7m"}, "interval"),
            ("/api/metrics/current", {"window": "2h"}, "window"),
            ("/api/monitoring/dashboard/performance", {"range": "9y"}, "range"),
        ],
    )
    def test_bad_ranges_and_names_are_a_clear_400(
        self, monitored: IrosProcess, path: str, params: dict[str, str], param: str
    ) -> None:
        resp = get(monitored, path, **params)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == param and error["message"]

    def test_iso_datetimes_are_accepted(self, monitored: IrosProcess) -> None:
        resp = get(
            monitored,
            "/api/metrics/historical",
            start="2026-01-01T00:00:00Z",
            end="2026-01-01T06:00:00+02:00",
        )
        assert resp.status_code == 200
        assert resp.json()["end"] == "2026-01-01T04:00:00+00:00"


class TestLive:
    def test_websocket_sends_every_tick_and_reflects_new_traffic(self, monitored: IrosProcess) -> None:
        url = monitored.url.replace("http://", "ws://") + "/ws/metrics"
        with connect(url, additional_headers=ADMIN, open_timeout=5) as ws:
            first = json.loads(ws.recv(timeout=3))
            assert first["type"] == "metrics" and "response_time_p95" in first["metrics"]
            before = first["metrics"]["count"]
            chat(monitored, "alpha")
            deadline = time.monotonic() + 3
            seen = before
            while seen <= before and time.monotonic() < deadline:
                seen = json.loads(ws.recv(timeout=3))["metrics"]["count"]
            assert seen > before
            ws.send(json.dumps({"subscribe": ["throughput_rps", "models"]}))
            ack = json.loads(ws.recv(timeout=3))
            while ack["type"] != "subscribed":
                ack = json.loads(ws.recv(timeout=3))
            narrowed = json.loads(ws.recv(timeout=3))
            assert set(narrowed["metrics"]) == {"throughput_rps"} and "alpha" in narrowed["models"]
            ws.send("not json")
            reply = json.loads(ws.recv(timeout=3))
            while reply["type"] == "metrics":
                reply = json.loads(ws.recv(timeout=3))
            assert reply["type"] == "error"

    def test_websocket_refuses_a_missing_or_client_key(self, monitored: IrosProcess) -> None:
        url = monitored.url.replace("http://", "ws://") + "/ws/metrics"
        for headers in ({}, CLIENT):
            with pytest.raises(InvalidStatus), connect(url, additional_headers=headers, open_timeout=5):
                pass

    def test_sse_stream_delivers_metrics_events_after_traffic(self, monitored: IrosProcess) -> None:
        counts = []
        with httpx.stream(
            "GET",
            f"{monitored.url}/api/metrics/stream",
            headers=ADMIN,
            params={"metrics": "count,response_time_avg"},
            timeout=10,
        ) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    message = json.loads(line[6:])
                    assert set(message["metrics"]) == {"count", "response_time_avg"}
                    counts.append(message["metrics"]["count"])
                    if len(counts) == 1:
                        chat(monitored, "alpha")
                    if len(counts) > 1 and counts[-1] > counts[0]:
                        break
                    assert len(counts) < 30
        assert counts[-1] > counts[0]


class TestDashboardData:
    def test_overview_widgets_follow_the_seed(self, monitored: IrosProcess, traffic: dict[str, int]) -> None:
        widgets = get(monitored, "/api/monitoring/dashboard/overview").json()["system_overview"]["widgets"]
        assert [w["type"] for w in widgets] == ["metric_card"] * 3 + ["status_indicator"]
        assert widgets[0]["metric"] == "response_time_avg" and widgets[0]["target"] == 2000
        assert widgets[0]["value"] > 0
        assert widgets[2]["target"] == 70.0
        assert widgets[3]["value"] in ("healthy", "degraded", "critical")

    def test_performance_has_trend_and_seed_histogram(
        self, monitored: IrosProcess, traffic: dict[str, int]
    ) -> None:
        charts = eventually(
            lambda: (
                (
                    c := get(monitored, "/api/monitoring/dashboard/performance").json()[
                        "response_performance"
                    ]["charts"]
                )
                and sum(c[1]["counts"]) >= 16
                and c
            )
        )
        trend, histogram = charts
        assert set(trend["series"]) == {"response_time_p50", "response_time_p95", "response_time_p99"}
        assert histogram["buckets"] == [0, 500, 1000, 2000, 5000, 10000]
        # Every answered request was well under 500 ms.
        assert histogram["counts"][0] == sum(histogram["counts"])

    def test_resources_have_cpu_memory_lines_and_a_gpu_gauge(self, monitored: IrosProcess) -> None:
        charts = eventually(
            lambda: (
                (
                    c := get(monitored, "/api/monitoring/dashboard/resources").json()["resource_utilization"][
                        "charts"
                    ]
                )
                and c[0]["series"]["cpu_usage"]
                and c
            )
        )
        assert charts[1]["type"] == "gauge" and charts[1]["label"] == "no GPU"


def test_history_survives_a_restart(tmp_path: Path) -> None:
    with serve(tmp_path) as proc:
        for _ in range(5):
            assert chat(proc, "alpha").status_code == 200
        eventually(lambda: get(proc, "/api/metrics/current").json()["response"]["count"] == 5)
    with serve(tmp_path) as proc:
        data = get(proc, "/api/metrics/historical", metric="response_time_ms", step="60").json()
        assert sum(p["count"] for p in data["series"]["response_time_ms"]["points"]) == 5


def test_custom_metric_flags_switch_groups_off(tmp_path: Path) -> None:
    flags = {"business_metrics": False, "user_journey_metrics": False, "model_performance_metrics": False}
    with serve(tmp_path, custom_metrics=flags) as proc:
        assert chat(proc, "beta", stream=True).status_code == 200
        report = eventually(
            lambda: (r := get(proc, "/api/metrics/current").json()) and r["response"]["count"] and r
        )
        assert "business" not in report and "user_experience" not in report and "models" not in report
        text = get(proc, "/metrics").text
        assert "iros_output_tokens" not in text and "iros_time_to_first_token" not in text
        assert 'model="all"' in text
        assert get(proc, "/api/metrics/models/beta").status_code == 404
        resp = chat(proc, "alpha")
        feedback = {"request_id": resp.headers["x-iros-request-id"], "score": 1}
        assert httpx.post(f"{proc.url}/api/feedback", headers=CLIENT, json=feedback).status_code == 404


def test_worker_processes_share_one_prometheus_view(tmp_path: Path) -> None:
    config = monitored_config(tmp_path)
    with IrosProcess.serve(config, extra=["--workers", "2"], env={"TEST_ADMIN_KEY": ADMIN_KEY}) as proc:
        # New connections each time, so both workers answer requests and scrapes.
        for _ in range(30):
            assert chat(proc, "alpha").status_code == 200
        eventually(lambda: total(scrape(proc), "iros_requests_total", model="alpha") == 30)
        # Whichever worker answers the scrape, it reports both workers' counts.
        for _ in range(6):
            samples = scrape(proc)
            assert total(samples, "iros_requests_total", model="alpha") == 30
            assert total(samples, "iros_request_duration_seconds_count", model="alpha") == 30
