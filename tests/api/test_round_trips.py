"""What a GET returns for rules and settings, the PUT beside it takes back unchanged: read-only fields
are ignored, not rejected, and nothing changes; a field no GET reports is still refused."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from iros.testing.iros import IrosProcess
from tests.conftest import ADMIN_KEY

pytestmark = pytest.mark.e2e

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
PAIRS = [
    ("/api/alerts/rules", "/api/alerts/rules"),
    ("/api/optimization/rules", "/api/optimization/rules"),
    ("/api/optimization/settings", "/api/optimization/settings"),
    ("/api/optimization/models", "/api/optimization/models/tune"),
    ("/api/optimization/resources", "/api/optimization/resources/tune"),
    ("/api/optimization/cache", "/api/optimization/cache/tune"),
]


@pytest.fixture(scope="module")
def iros() -> Iterator[IrosProcess]:
    config = {
        "auth": {"admin_keys": [ADMIN_KEY]},
        "models": [{"name": "local", "backend": "simulated", "profile": "instant"}],
        "cache": {"enabled": True, "semantic": False},
        "alerting": {"alert_rules": [{"name": "slow", "condition": "response_time_p95 > 5000"}]},
        "optimization": {
            "auto_optimization": {
                "optimization_rules": [
                    {"name": "busy", "trigger": "cpu_usage > 90", "actions": ["enable_aggressive_caching"]}
                ]
            }
        },
    }
    with IrosProcess.serve(config) as proc:
        yield proc


def _call(proc: IrosProcess, method: str, path: str, body: Any = None) -> httpx.Response:
    return httpx.request(method, f"{proc.url}{path}", json=body, headers=ADMIN, timeout=10)


@pytest.mark.parametrize(("get", "put"), PAIRS)
def test_a_get_body_is_accepted_back_and_changes_nothing(iros: IrosProcess, get: str, put: str) -> None:
    """PUT of exactly what GET returned answers 200 and leaves every live setting and rule as it was."""
    before = _call(iros, "GET", get).json()
    settings = _call(iros, "GET", "/api/optimization/settings").json()
    answer = _call(iros, "PUT", put, before)
    assert answer.status_code == 200, answer.text
    assert _call(iros, "GET", "/api/optimization/settings").json() == settings
    if get.endswith("/rules"):
        after = _call(iros, "GET", get).json()
        key = "alert_rules" if "alerts" in get else "rules"
        assert [r["name"] for r in after[key]] == [r["name"] for r in before[key]]


@pytest.mark.parametrize("put", [p for _, p in PAIRS])
def test_a_field_no_get_reports_is_still_refused(iros: IrosProcess, put: str) -> None:
    """An unknown field is a 4xx in the OpenAI error shape, not silently dropped."""
    body: Any = {"no_such_field": 1}
    if put == "/api/alerts/rules":
        body = {"alert_rules": [{"name": "x", "condition": "count > 1", "no_such_field": 1}]}
    answer = _call(iros, "PUT", put, body)
    assert 400 <= answer.status_code < 500 and "error" in answer.json()
