"""GET /api/analysis/costs and the cost lines of the reports, on an in-process Iros with priced traffic
from two keys."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iros.app import IrosApp, create_app
from iros.core.record import RequestRecord
from tests.gateway.test_costs import ADMIN, ASK, KEY, OTHER, call, priced_settings


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[tuple[IrosApp, list[RequestRecord]]]:
    gateway = create_app(priced_settings(tmp_path, {"usd": 5.0, "period": "week"}))
    seen: list[RequestRecord] = []
    gateway.gateway.observers.append(seen.append)
    async with gateway.routes.router.lifespan_context(gateway.routes):
        for key, seed in ((KEY, 1), (KEY, 2), (OTHER, 3)):
            await call(
                gateway, "/v1/chat/completions", {**ASK, "seed": seed, "iros": {"cache": False}}, key=key
            )
        await call(gateway, "/v1/embeddings", {"model": "priced", "input": "one two"}, key=OTHER)
        yield gateway, seen


class TestCostsAPI:
    async def test_costs_by_key_add_up_to_what_the_answers_cost(
        self, app: tuple[IrosApp, list[RequestRecord]]
    ) -> None:
        """Each key's cost is the sum of its answers' costs; the total is theirs; budgets are listed."""
        gateway, seen = app
        body = (await call(gateway, "/api/analysis/costs?group_by=key", key=ADMIN, method="GET")).json()
        by_key = {g["key"]: g for g in body["groups"]}
        for name in ("team-a", "team-b"):
            spent = sum(r.cost_usd or 0 for r in seen if r.principal == name)
            assert by_key[name]["cost_usd"] == pytest.approx(spent, abs=1e-8)
        assert by_key["team-a"]["requests"] == 2 and by_key["team-b"]["requests"] == 2
        assert body["cost_usd"] == pytest.approx(sum(r.cost_usd or 0 for r in seen), abs=1e-8)
        assert [b["key"] for b in body["budgets"]] == ["team-a"]
        assert body["budgets"][0]["spent_usd"] == pytest.approx(by_key["team-a"]["cost_usd"], abs=1e-8)

    async def test_costs_by_model_and_an_empty_window(self, app: tuple[IrosApp, list[RequestRecord]]) -> None:
        """group_by=model sums per model; a window before any traffic has no groups and costs 0."""
        gateway, _ = app
        body = (await call(gateway, "/api/analysis/costs?group_by=model", key=ADMIN, method="GET")).json()
        assert [g["model"] for g in body["groups"]] == ["priced"]
        assert body["groups"][0]["input_tokens"] > 0 and body["groups"][0]["output_tokens"] > 0
        old = "/api/analysis/costs?start=2020-01-01&end=2020-01-02"
        empty = (await call(gateway, old, key=ADMIN, method="GET")).json()
        assert empty["groups"] == [] and empty["cost_usd"] == 0

    @pytest.mark.parametrize(
        ("query", "param"),
        [
            ("group_by=tenant", "group_by"),
            ("start=2026-02-01&end=2026-01-01", "start"),
            ("start=soon", "start"),
        ],
    )
    async def test_bad_parameters_are_400s_naming_them(
        self, app: tuple[IrosApp, list[RequestRecord]], query: str, param: str
    ) -> None:
        """A bad group_by or range is a 400 naming the parameter."""
        gateway, _ = app
        resp = await call(gateway, f"/api/analysis/costs?{query}", key=ADMIN, method="GET")
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param

    async def test_a_client_key_may_not_read_costs(self, app: tuple[IrosApp, list[RequestRecord]]) -> None:
        """Costs show every tenant's spend: admin only."""
        gateway, _ = app
        assert (await call(gateway, "/api/analysis/costs", key=KEY, method="GET")).status_code == 403


class TestReportCosts:
    async def test_a_daily_report_has_cost_lines(self, app: tuple[IrosApp, list[RequestRecord]]) -> None:
        """The daily report's summary, cost tables and first recommendation say what the day cost."""
        gateway, seen = app
        resp = await call(gateway, "/api/analysis/reports/daily", key=ADMIN)
        body = resp.json()["daily_report"]
        spent = sum(r.cost_usd or 0 for r in seen)
        assert body["summary"]["cost_usd"] == pytest.approx(spent, abs=1e-8)
        assert {g["key"] for g in body["costs"]["by_key"]} == {"team-a", "team-b"}
        assert body["recommendations"][0].startswith(f"answers cost ${spent:.6f}")
