"""Budgets: what each key may spend per calendar period (UTC day, week from Monday, month), enforced.

budgets = Budgets(keyring.budgets(), SQLiteSpendStore(data_dir / "spend.db"), on_share=collector.gauge)
await budgets.start()
budgets.check(principal)          # raises IrosError(429, code budget_exceeded) once the period is spent
gateway.observers.append(budgets.observe)     # every priced answer goes to the ledger and the tally
budgets.status()                  # per key: usd, period, spent, share, resets_at

The check is a dictionary lookup: each worker holds its keys' spend in memory, adds its own answers as
they end, and every second flushes them to the shared ledger (gateway/spend.py) and reads back every
worker's total for the period. So workers agree within about a second; a key can overshoot its budget
by what its requests in flight and that second cost. Every refresh also records each key's share of its
budget as the `budget_used_ratio{key}` gauge, which the default `budget_80_percent_<key>` alert reads.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from iros.config import Budget
from iros.core.errors import IrosError
from iros.core.periodic import cancel_all, every
from iros.core.record import RequestRecord
from iros.gateway.auth import Principal
from iros.gateway.spend import Spend, SpendStore

log = logging.getLogger("iros.budgets")

REFRESH_SECONDS = 1.0


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """The UTC calendar period holding `now`: (start, end) in unix seconds."""
    at = datetime.fromtimestamp(now, UTC)
    day = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start, end = day, day + timedelta(days=1)
    elif period == "week":
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
    else:
        start = day.replace(day=1)
        end = start + timedelta(days=calendar.monthrange(start.year, start.month)[1])
    return start.timestamp(), end.timestamp()


class Budgets:
    def __init__(
        self,
        budgets: dict[str, Budget],
        store: SpendStore,
        on_share: Callable[[str, float], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.budgets = budgets
        self.store = store
        self.on_share = on_share
        self.clock = clock
        self._spent: dict[str, float] = dict.fromkeys(budgets, 0.0)
        self._period: dict[str, tuple[float, float]] = {
            k: period_bounds(b.period, clock()) for k, b in budgets.items()
        }
        self.refused = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.store.start()
        await self.refresh()
        self._tasks = [asyncio.create_task(every(REFRESH_SECONDS, self.refresh, log, "budgets"))]

    async def close(self) -> None:
        await cancel_all(self._tasks)
        await self.store.close()

    # --- the request path --------------------------------------------------------------------------
    def check(self, principal: Principal) -> None:
        budget = self.budgets.get(principal.name)
        if budget is None:
            return
        spent = self._spent[principal.name]
        end = self._period[principal.name][1]
        now = self.clock()
        if now >= end:  # a new period began since the last refresh
            self._period[principal.name] = period_bounds(budget.period, now)
            end = self._period[principal.name][1]
            spent = self._spent[principal.name] = 0.0
        if spent < budget.usd:
            return
        self.refused += 1
        reset = datetime.fromtimestamp(end, UTC).isoformat().replace("+00:00", "Z")
        raise IrosError(
            429,
            f"this key's budget of ${budget.usd:g} a {budget.period} is spent (${spent:.4f}); "
            f"it resets at {reset}",
            type="insufficient_quota",
            code="budget_exceeded",
            headers={"retry-after": str(max(1, int(end - now))), "x-iros-budget-reset": reset},
        )

    def observe(self, record: RequestRecord) -> None:
        """A gateway observer: the answer's cost to the tally and the ledger (every key's, for analysis)."""
        if not record.cost_usd and not record.saved_usd:
            return
        key, model = record.principal, _model(record)
        usage = record.usage
        self.store.add(
            Spend(
                record.started_at,
                key,
                model,
                record.cost_usd or 0.0,
                record.saved_usd,
                usage.get("prompt_tokens", 0),
                usage.get("completion_tokens", 0),
            )
        )
        if key in self._spent and record.cost_usd:
            self._spent[key] += record.cost_usd

    # --- background ------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Write this worker's spend, then read every worker's for each key's current period."""
        if not self.budgets:
            await self.store.flush()
            return
        now = self.clock()
        self._period = {k: period_bounds(b.period, now) for k, b in self.budgets.items()}
        self._spent.update(await self.store.spent({k: start for k, (start, _) in self._period.items()}))
        if self.on_share is not None:
            for key, budget in self.budgets.items():
                self.on_share(key, self._spent[key] / budget.usd)

    def status(self) -> list[dict[str, object]]:
        out = []
        for key, budget in self.budgets.items():
            start, end = self._period[key]
            spent = self._spent[key]
            out.append(
                {
                    "key": key,
                    "usd": budget.usd,
                    "period": budget.period,
                    "spent_usd": round(spent, 8),
                    "share": round(spent / budget.usd, 4),
                    "period_start": datetime.fromtimestamp(start, UTC).isoformat(),
                    "resets_at": datetime.fromtimestamp(end, UTC).isoformat(),
                }
            )
        return out


def _model(record: RequestRecord) -> str:
    # The configured model that answered (a cache hit's deployment reads "name#cache").
    if record.deployment:
        return record.deployment.rsplit("#", 1)[0]
    return record.model or "-"
