"""The CPU KPI on the demo: a real `iros serve` on its embedded default config, a few requests, a pause."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from iros.testing.iros import IrosProcess, free_port, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IrosProcess]:
    port = free_port()
    # No --config: the demo exactly as ./scripts/serve runs it, its state in a directory of its own.
    data_dir = tmp_path_factory.mktemp("demo-data")
    args = [sys.executable, "-m", "iros", "serve", "--port", str(port)]
    with IrosProcess(
        args, port, name="iros serve (demo)", env={"IROS_SERVER__DATA_DIR": str(data_dir)}
    ) as proc:
        yield proc


def chat(proc: IrosProcess, model: str, text: str, stream: bool = False) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "stream": stream}
    return httpx.post(f"{proc.url}/v1/chat/completions", json=body, timeout=30)


def current(proc: IrosProcess) -> dict[str, Any]:
    resp = httpx.get(f"{proc.url}/api/metrics/current", timeout=10)
    resp.raise_for_status()
    data: dict[str, Any] = resp.json()
    return data


def test_the_demo_after_a_few_requests_and_a_pause_reports_healthy(demo: IrosProcess) -> None:
    """A lightly used demo says healthy: the CPU KPI is the gateway's share of the machine, not of each
    response's time (a cache hit is nearly all CPU)."""
    # The README's requests, repeated as a person trying the demo would: cache hits among them.
    for _ in range(6):
        assert chat(demo, "lightweight", "Hello").status_code == 200
    for _ in range(2):
        assert chat(demo, "large", "Hi", stream=True).status_code == 200
    # The pause: until a CPU sample taken after the traffic is in the KPI window.
    report = wait_until(
        lambda: (r := current(demo))["response"]["cpu_usage_avg"] is not None and r,
        "a CPU utilisation sample",
        timeout=60,
        interval=0.5,
    )
    response = report["response"]
    assert report["status"] == "healthy", report["kpis"]
    assert report["kpis"]["cpu_usage_percent"]["level"] == "ok"
    assert 0 <= response["cpu_usage_avg"] < 5.0
    # CPU time per response is still measured, as its own figure: cache hits make it high.
    assert response["cpu_per_response_avg"] is not None and response["cpu_per_response_avg"] > 0
    assert response["cache_hits"] >= 6


def test_both_cpu_series_are_in_metrics_and_no_cpu_alert_fires(demo: IrosProcess) -> None:
    """/metrics carries the utilisation gauge and the per-response histogram; the rules that name the
    CPU KPI read the utilisation and stay quiet on a lightly used demo."""
    chat(demo, "lightweight", "Hello")
    text = httpx.get(f"{demo.url}/metrics", timeout=10).text
    names = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    assert "iros_cpu_usage_percent" in names
    assert "iros_response_cpu_percent_count" in names
    rules = httpx.get(f"{demo.url}/api/alerts/rules", timeout=10).json()
    cpu_rules = [r for r in rules["alert_rules"] if "cpu_usage" in r["condition"]]
    assert cpu_rules, rules
    active = httpx.get(f"{demo.url}/api/alerts/active", timeout=10).json()
    assert not [a for a in active["alerts"] if "cpu" in a["rule"]], active
