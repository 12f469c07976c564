"""Under load, end to end: three real model servers of different speeds behind a real `iros serve`.
A killed model server costs no client request; a rule fires under load, changes routing, and reverts."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from iros.testing.iros import IrosProcess
from tests.conftest import ADMIN_KEY, CLIENT_KEY
from tests.routing.test_routing import ADMIN, ask, chat_models, wait_for

pytestmark = pytest.mark.e2e


class Load:
    """Client threads sending `chat` requests until stopped; every status and serving model kept, with
    when its request was sent."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url = url
        self.statuses: Counter[int] = Counter()
        self.models: list[str] = []
        self.sent: list[tuple[float, str]] = []  # (time.monotonic() at sending, serving model)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            sent = time.monotonic()
            response = ask(self.url, "chat", f"load {n}-{i}")
            self.statuses[response.status_code] += 1
            self.models.append(response.headers.get("x-iros-model", "-"))
            self.sent.append((sent, self.models[-1]))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def _serve(speeds: dict[str, IrosProcess], optimization: dict[str, Any]) -> IrosProcess:
    config = {
        "auth": {"api_keys": [CLIENT_KEY], "admin_keys": [ADMIN_KEY]},
        "retry": {"attempts": 3, "backoff_ms": 5},
        "models": chat_models(speeds),
        "optimization": optimization,
    }
    return IrosProcess.serve(config)


def test_rule_fires_under_load_changes_routing_and_reverts(speeds: dict[str, IrosProcess]) -> None:
    """Under load a rule switches `chat` to the lightweight model; once the load is gone and the
    cool-down has passed, routing goes back, and the audit shows both with KPIs before and after."""
    optimization = {
        "auto_optimization": {
            "evaluation_interval_seconds": 0.5,
            "cooldown_seconds": 1,
            "optimization_rules": [
                {
                    "name": "busy",
                    "trigger": "rate(requests, 5s) > 3",
                    "actions": ["switch_to_lightweight_models"],
                }
            ],
        }
    }
    with _serve(speeds, optimization) as iros:

        def live() -> dict[str, Any]:
            return httpx.get(f"{iros.url}/api/optimization/settings", headers=ADMIN).json()  # type: ignore[no-any-return]

        assert live()["models.lightweight_only"] is False
        with Load(iros.url) as load:
            wait_for(lambda: live()["models.lightweight_only"], "the rule to fire under load")
            # Only requests sent after the switch was seen: one sent before it may still be on a slow
            # model and come back after many fast ones.
            fired = time.monotonic()

            def after() -> list[str]:
                return [model for sent, model in list(load.sent) if sent > fired]

            wait_for(lambda: len(after()) >= 30, "requests after the rule fired")
            routed = set(after())
        assert routed == {"mid"}, routed
        assert set(load.statuses) == {200}
        wait_for(lambda: not live()["models.lightweight_only"], "the action to revert after the load")
        # Few enough not to be load themselves (rate(requests, 5s) stays under 3).
        served = Counter(ask(iros.url, "chat", f"after {i}").headers["x-iros-model"] for i in range(6))
        assert set(served) - {"mid"}, served  # the other models are back in the choice
        audit = httpx.get(f"{iros.url}/api/optimization/audit", headers=ADMIN).json()["entries"]
        oldest_first = [e["event"] for e in reversed(audit) if e["rule"] == "busy"]
        assert oldest_first[:2] == ["applied", "reverted"]
        *_, compared = httpx.get(f"{iros.url}/api/analysis/compare/optimizations", headers=ADMIN).json()[
            "optimizations"
        ]
        assert compared["kpis_before"]["count"] > 0 and compared["kpis_after"]["count"] > 0
        assert compared["changes"]["models.lightweight_only"] == {"before": False, "after": True}


def test_killed_model_server_costs_no_failed_request(speeds: dict[str, IrosProcess]) -> None:
    """Killing the fastest model server in the middle of a load leaves every client request answered
    (last in this module: it kills the shared instant server)."""
    with _serve(speeds, {}) as iros, Load(iros.url) as load:
        wait_for(lambda: load.models.count("quick") >= 10, "the fast model to take traffic")
        speeds["instant"].stop()
        served = len(load.models)
        wait_for(lambda: len(load.models) >= served + 24, "requests after the kill")
    assert set(load.statuses) == {200}, load.statuses
    after = load.models[served + 8 :]  # the ones in flight at the kill may still name it
    assert "quick" not in after and len(after) >= 16
