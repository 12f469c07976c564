"""Budgets: a key that spent its period's budget gets 429 budget_exceeded with the reset time; spend
survives a restart and is shared through the ledger; at 80% a warning alert fires."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from iros.app import IrosApp, create_app
from iros.config import Budget
from iros.gateway.auth import Principal, Role
from iros.gateway.budgets import Budgets, period_bounds
from iros.gateway.spend import Spend, SQLiteSpendStore
from iros.testing.iros import IrosProcess
from tests.gateway.test_costs import ASK, KEY, OTHER, call, priced_settings

# One answer of the simulated model costs about $0.00015 at the test prices: two spend this budget.
BUDGET = {"usd": 0.0002, "period": "month"}
UNCACHED = {**ASK, "iros": {"cache": False}}


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[IrosApp]:
    gateway = create_app(priced_settings(tmp_path, BUDGET))
    async with gateway.routes.router.lifespan_context(gateway.routes):
        yield gateway


class TestPeriods:
    @pytest.mark.parametrize(
        ("period", "start", "end"),
        [
            ("day", "2026-12-09T00:00:00", "2026-12-10T00:00:00"),
            ("week", "2026-12-07T00:00:00", "2026-12-14T00:00:00"),
            ("month", "2026-12-01T00:00:00", "2027-01-01T00:00:00"),
        ],
    )
    def test_periods_are_utc_calendar_day_week_from_monday_and_month(
        self, period: str, start: str, end: str
    ) -> None:
        """Wednesday 2026-12-09 15:30 UTC lies in its day, the week from Monday the 7th, and December."""
        assert period_bounds(period, ts("2026-12-09T15:30:00")) == (ts(start), ts(end))


class TestEnforcement:
    async def test_a_spent_budget_is_a_429_naming_the_reset_time(self, app: IrosApp) -> None:
        """Once the key spent its budget its requests get 429 budget_exceeded, the reset time in header
        and message; a key without a budget goes on."""
        answers = [await call(app, "/v1/chat/completions", UNCACHED) for _ in range(3)]
        refused = await call(app, "/v1/chat/completions", UNCACHED)
        assert [a.status_code for a in answers[:2]] == [200, 200]
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["code"] == "budget_exceeded"
        _, end = period_bounds("month", datetime.now(UTC).timestamp())
        reset = datetime.fromtimestamp(end, UTC).isoformat().replace("+00:00", "Z")
        assert refused.headers["x-iros-budget-reset"] == reset and reset in error["message"]
        assert int(refused.headers["retry-after"]) > 0
        other = await call(app, "/v1/chat/completions", UNCACHED, key=OTHER)
        assert other.status_code == 200

    async def test_streamed_answers_count_against_the_budget(self, app: IrosApp) -> None:
        """Streams whose usage Iros counted spend the budget too."""
        statuses = [
            (await call(app, "/v1/chat/completions", {**UNCACHED, "stream": True, "seed": i})).status_code
            for i in range(4)
        ]
        assert statuses[:2] == [200, 200] and statuses[-1] == 429

    async def test_spend_survives_a_restart(self, tmp_path: Path) -> None:
        """A new process on the same data_dir reads the period's spend back and still refuses the key."""
        first = create_app(priced_settings(tmp_path, BUDGET))
        async with first.routes.router.lifespan_context(first.routes):
            for _ in range(2):
                await call(first, "/v1/chat/completions", UNCACHED)
        second = create_app(priced_settings(tmp_path, BUDGET))
        async with second.routes.router.lifespan_context(second.routes):
            resp = await call(second, "/v1/chat/completions", UNCACHED)
        assert resp.status_code == 429 and resp.json()["error"]["code"] == "budget_exceeded"


class TestSharing:
    async def test_workers_sharing_the_ledger_see_each_others_spend(self, tmp_path: Path) -> None:
        """What one worker spent is refused by another once both refreshed from the one file."""
        budget = {"team-a": Budget(usd=1.0, period="day")}
        one = Budgets(budget, SQLiteSpendStore(tmp_path / "spend.db"))
        two = Budgets(budget, SQLiteSpendStore(tmp_path / "spend.db"))
        await one.start()
        await two.start()
        try:
            key = Principal("team-a", Role.CLIENT)
            two.check(key)
            one.store.add(Spend(datetime.now(UTC).timestamp(), "team-a", "m", 0.6))
            one.store.add(Spend(datetime.now(UTC).timestamp(), "team-a", "m", 0.5))
            await one.refresh()
            await two.refresh()
            with pytest.raises(Exception, match="budget") as caught:
                two.check(key)
            assert getattr(caught.value, "code", None) == "budget_exceeded"
            assert two.status()[0]["spent_usd"] == pytest.approx(1.1)
        finally:
            await one.close()
            await two.close()


class TestAlert:
    async def test_a_warning_fires_once_80_percent_is_spent(self, tmp_path: Path) -> None:
        """The default budget_80_percent_<key> rule fires from the key's budget_used_ratio gauge."""
        settings = priced_settings(tmp_path, {"usd": 0.00018, "period": "day"})
        app = create_app(settings)
        async with app.routes.router.lifespan_context(app.routes):
            assert app.alerts is not None and app.monitor is not None
            rules = {r.name: r for r in app.alerts.rules}
            assert "budget_80_percent_team-a" in rules
            before = await app.alerts.evaluate()
            await call(app, "/v1/chat/completions", UNCACHED)
            assert app.gateway.budgets is not None
            await app.gateway.budgets.refresh()
            await app.monitor.collector.tick()
            changes = await app.alerts.evaluate()
        assert ("budget_80_percent_team-a", "inactive", "firing") in changes
        assert not [c for c in before if c[0].startswith("budget")]


@pytest.mark.e2e
def test_two_workers_enforce_one_budget_and_a_restart_keeps_it(tmp_path: Path) -> None:
    """`iros serve --workers 2`: whichever worker answers, a spent budget is refused once the workers have
    refreshed; a restarted server still refuses the key."""
    config = {
        "server": {"data_dir": str(tmp_path)},
        "auth": {"api_keys": [{"name": "team-a", "key": KEY, "budget": {"usd": 0.001, "period": "day"}}]},
        "models": [
            {
                "name": "priced",
                "backend": "simulated",
                "profile": "instant",
                "pricing": {"input_per_million": 2.0, "output_per_million": 8.0},
            }
        ],
    }
    headers = {"authorization": f"Bearer {KEY}"}

    def ask(url: str, seed: int) -> int:
        # A new connection each time, so both workers answer.
        body = {**ASK, "seed": seed}
        return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30).status_code

    with IrosProcess.serve(config, extra=["--workers", "2"]) as proc:
        codes = [ask(proc.url, i) for i in range(40)]
        assert codes[0] == 200 and 429 in codes
        time.sleep(2.5)  # every worker has read the other's spend back
        assert {ask(proc.url, 100 + i) for i in range(8)} == {429}
    with IrosProcess.serve(config) as again:
        assert ask(again.url, 500) == 429


class TestLedger:
    async def test_rows_past_the_retention_are_swept_and_groups_are_per_minute(self, tmp_path: Path) -> None:
        """A row older than the retention is deleted by the next store's first flush; totals cut to the
        minute and add up a minute's answers."""
        now = datetime.now(UTC).timestamp()
        first = SQLiteSpendStore(tmp_path / "spend.db")
        await first.start()
        first.add(Spend(now - 500 * 86400, "team-a", "m", 1.0))
        first.add(Spend(now, "team-a", "m", 0.25, saved_usd=0.5, input_tokens=3, output_tokens=4))
        first.add(Spend(now, "team-a", "m", 0.25))
        assert [g["cost_usd"] for g in await first.totals(0, now + 60, "key")] == [1.5]
        await first.close()
        second = SQLiteSpendStore(tmp_path / "spend.db")
        await second.start()
        try:
            (group,) = await second.totals(0, now + 60, "model")
            assert group == {
                "model": "m",
                "requests": 2,
                "cost_usd": 0.5,
                "saved_usd": 0.5,
                "input_tokens": 3,
                "output_tokens": 4,
            }
        finally:
            await second.close()
