"""The spend ledger: what each key's answers cost, per minute and model, kept where the host's workers
share it and a restart finds it.

store = SQLiteSpendStore(data_dir / "spend.db")
await store.start()
store.add(Spend(at, "team-a", "gpt", cost_usd=0.0012, saved_usd=0.0, input_tokens=30, output_tokens=90))
await store.flush()                                  # also every second in the background
await store.spent({"team-a": period_start})          # {"team-a": 12.5}: USD since each key's start
await store.totals(start, end, "model")              # [{"model", "cost_usd", "saved_usd", ...}] by group

SpendStore is the seam: SQLite (WAL, one writer thread per worker, every worker adding to the same rows
with one UPSERT per flush) serves the workers of one host; a shared store (Redis) for several hosts can
stand behind the same calls. Rows are per minute, so reports and the analysis API can cut any range to
the minute; a row is small, exists only for a minute with spend, and is kept RETENTION_DAYS.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from iros.core.sqlitefile import SQLiteFile

log = logging.getLogger("iros.budgets")

GroupBy = Literal["key", "model"]
FLUSH_SECONDS = 1.0
RETENTION_DAYS = 400  # rows older than this are deleted (once an hour): a year of reports and more
MAX_PENDING = 100_000  # minute/key/model rows waiting for a flush; beyond it the oldest are merged away

SCHEMA = """
CREATE TABLE spend (
    minute INTEGER NOT NULL,
    key TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    saved_usd REAL NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    PRIMARY KEY (minute, key, model)
) WITHOUT ROWID;
CREATE INDEX spend_by_key ON spend (key, minute);
"""


@dataclass(slots=True)
class Spend:
    at: float
    key: str
    model: str
    cost_usd: float
    saved_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0


class SpendStore(Protocol):
    async def start(self) -> None: ...

    def add(self, spend: Spend) -> None:
        """Queue one answer's spend; it is written with the next flush."""
        ...

    async def flush(self) -> None: ...

    async def spent(self, since: dict[str, float]) -> dict[str, float]:
        """USD spent by each key since its time (unix seconds, to the minute), this worker's queue too."""
        ...

    async def totals(self, start: float, end: float, group_by: GroupBy) -> list[dict[str, Any]]:
        """Cost, savings, requests and tokens in [start, end) per key or per model, costliest first."""
        ...

    async def close(self) -> None: ...


_UPSERT = """
INSERT INTO spend VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (minute, key, model) DO UPDATE SET
    requests = requests + excluded.requests,
    cost_usd = cost_usd + excluded.cost_usd,
    saved_usd = saved_usd + excluded.saved_usd,
    input_tokens = input_tokens + excluded.input_tokens,
    output_tokens = output_tokens + excluded.output_tokens
"""


class SQLiteSpendStore:
    def __init__(self, path: Path) -> None:
        self.db = SQLiteFile(
            path,
            schema=SCHEMA,
            version=1,
            label="spend store",
            thread_name="iros-spenddb",
            meanwhile="spend stays queued and writes are retried every second",
            logger=log,
        )
        # (minute, key, model) -> [requests, cost, saved, input tokens, output tokens]
        self._pending: dict[tuple[int, str, str], list[float]] = {}
        self._swept_at = 0.0

    async def start(self) -> None:
        await self.db.run(self.db.connect)
        self.db.start_background(self.flush, FLUSH_SECONDS)

    def add(self, spend: Spend) -> None:
        key = (int(spend.at // 60) * 60, spend.key, spend.model)
        row = self._pending.get(key)
        if row is None:
            if len(self._pending) >= MAX_PENDING:
                log.warning("spend store: %d rows waiting; dropping the oldest minute's", MAX_PENDING)
                del self._pending[next(iter(self._pending))]
            row = self._pending[key] = [0, 0.0, 0.0, 0, 0]
        row[0] += 1
        row[1] += spend.cost_usd
        row[2] += spend.saved_usd
        row[3] += spend.input_tokens
        row[4] += spend.output_tokens

    async def flush(self) -> None:
        now = time.time()
        if now - self._swept_at > 3600:
            self._swept_at = now
            await self._sweep(now - RETENTION_DAYS * 86400)
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        rows = [(*key, int(v[0]), v[1], v[2], int(v[3]), int(v[4])) for key, v in pending.items()]
        try:
            await self.db.run(self._write, rows)
        except (sqlite3.Error, OSError) as exc:
            self.db.report(exc)
            for row in rows:  # back in the queue, ahead of what arrived meanwhile
                self._merge(row)
            return
        self.db.recovered()

    async def _sweep(self, before: float) -> None:
        try:
            await self.db.run(self._delete_before, before)
        except (sqlite3.Error, OSError) as exc:
            self.db.report(exc)

    def _delete_before(self, before: float) -> None:
        self.db.connect().execute("DELETE FROM spend WHERE minute < ?", (int(before),))

    def _merge(self, row: tuple[Any, ...]) -> None:
        minute, key, model, requests, cost, saved, tokens_in, tokens_out = row
        slot = self._pending.setdefault((minute, key, model), [0, 0.0, 0.0, 0, 0])
        for i, value in enumerate((requests, cost, saved, tokens_in, tokens_out)):
            slot[i] += value

    def _write(self, rows: Iterable[tuple[Any, ...]]) -> None:
        conn = self.db.connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_UPSERT, rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def spent(self, since: dict[str, float]) -> dict[str, float]:
        if not since:
            return {}
        await self.flush()  # this worker's own spend is read back too
        return await self.db.run(self._spent, since)

    def _spent(self, since: dict[str, float]) -> dict[str, float]:
        conn = self.db.connect()
        out = {}
        for key, start in since.items():
            row = conn.execute(
                "SELECT COALESCE(SUM(cost_usd), 0) FROM spend WHERE key = ? AND minute >= ?",
                (key, int(start // 60) * 60),
            ).fetchone()
            out[key] = float(row[0])
        return out

    async def totals(self, start: float, end: float, group_by: GroupBy) -> list[dict[str, Any]]:
        await self.flush()
        return await self.db.run(self._totals, start, end, group_by)

    def _totals(self, start: float, end: float, group_by: GroupBy) -> list[dict[str, Any]]:
        column = {"key": "key", "model": "model"}[group_by]  # never the caller's text in the SQL
        rows = (
            self.db.connect()
            .execute(
                f"SELECT {column}, SUM(requests), SUM(cost_usd), SUM(saved_usd), SUM(input_tokens), "
                f"SUM(output_tokens) FROM spend WHERE minute >= ? AND minute < ? GROUP BY {column} "
                "ORDER BY SUM(cost_usd) DESC",
                (int(start // 60) * 60, end),
            )
            .fetchall()
        )
        return [
            {
                group_by: name,
                "requests": int(requests),
                "cost_usd": round(cost, 8),
                "saved_usd": round(saved, 8),
                "input_tokens": int(tokens_in),
                "output_tokens": int(tokens_out),
            }
            for name, requests, cost, saved, tokens_in, tokens_out in rows
        ]

    async def close(self) -> None:
        await self.db.close(final=self.flush)
