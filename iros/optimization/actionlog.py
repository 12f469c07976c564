"""The audit of optimization actions and live setting changes, kept in SQLite under server.data_dir.

log = ActionLog(Path("iros-data/optimization.db"))
row_id = await log.add({"event": "applied", "rule": "high_load_optimization", ...})
await log.update(row_id, kpis_after={...}, reverted_at=...)
rows = await log.rows(limit=100)                     # newest first, each a dict
rows = read_audit(Path("iros-data"))                 # the same, synchronously, for other tools

Each row: id, at (unix seconds), event ("applied", "reverted", "would_apply", "would_revert",
"changed"), rule, actions, dry_run, changes {setting: {before, after}}, kpis_before, kpis_after,
applied_at, reverted_at, source, note.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import orjson

from iros.core.sqlitefile import open_wal

FILENAME = "optimization.db"
MAX_ROWS = 100_000  # oldest rows beyond this are dropped

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    rule TEXT,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at);
"""


class ActionLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = open_wal(
                self.path, setup=lambda conn: conn.executescript(_SCHEMA), check_same_thread=False
            )
        return self._conn

    def _add(self, row: dict[str, Any]) -> int:
        with self._lock:
            db = self._db()
            cur = db.execute(
                "INSERT INTO audit (at, event, rule, body) VALUES (?, ?, ?, ?)",
                (row["at"], row["event"], row.get("rule"), orjson.dumps(row)),
            )
            row_id = int(cur.lastrowid or 0)
            if row_id % 1000 == 0:
                db.execute("DELETE FROM audit WHERE id <= ?", (row_id - MAX_ROWS,))
            return row_id

    def _update(self, row_id: int, fields: dict[str, Any]) -> None:
        with self._lock:
            db = self._db()
            found = db.execute("SELECT body FROM audit WHERE id = ?", (row_id,)).fetchone()
            if found is None:
                return
            body = {**orjson.loads(found[0]), **fields}
            db.execute("UPDATE audit SET body = ? WHERE id = ?", (orjson.dumps(body), row_id))

    def _rows(self, limit: int, since: float | None) -> list[dict[str, Any]]:
        with self._lock:
            db = self._db()
            rows = db.execute(
                "SELECT id, body FROM audit WHERE at >= ? ORDER BY id DESC LIMIT ?",
                (since or 0.0, limit),
            ).fetchall()
        return [{"id": row_id, **orjson.loads(body)} for row_id, body in rows]

    async def add(self, row: dict[str, Any]) -> int:
        return await asyncio.to_thread(self._add, row)

    async def update(self, row_id: int, **fields: Any) -> None:
        await asyncio.to_thread(self._update, row_id, fields)

    async def rows(self, limit: int = 100, since: float | None = None) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._rows, limit, since)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def read_audit(data_dir: Path, limit: int = 1000, since: float | None = None) -> list[dict[str, Any]]:
    """The audit rows of the Iros whose server.data_dir is `data_dir`, newest first ([] if none yet)."""
    path = Path(data_dir) / FILENAME
    if not path.exists():
        return []
    log = ActionLog(path)
    try:
        return log._rows(limit, since)
    finally:
        log.close()
