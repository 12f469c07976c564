"""Alerting state in SQLite: alerts (current and past episodes), their transitions, silences, the
notification outbox and rules set through the API. Survives restarts; shared by every worker.

store = AlertStore(Path("iros-data/alerts.db"))
await store.save_alert(alert); await store.alerts(states=("pending", "firing"))
await store.enqueue([OutboxItem(...)]); await store.due(now)     # the durable outbox
await store.add_silence(Silence(...)); await store.silences(now)
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from iros.core.sqlitefile import SQLiteFile
from iros.core.timefmt import iso, iso_or_none

SCHEMA = """
CREATE TABLE alerts (
    id TEXT PRIMARY KEY, rule TEXT NOT NULL, severity TEXT NOT NULL, labels TEXT NOT NULL,
    annotations TEXT NOT NULL, state TEXT NOT NULL, value REAL, active_at REAL NOT NULL,
    fired_at REAL, resolved_at REAL, last_true_at REAL, acked_by TEXT, ack_comment TEXT, acked_at REAL,
    notified TEXT NOT NULL DEFAULT '{}', updated_at REAL NOT NULL
);
CREATE INDEX alerts_state ON alerts(state);
CREATE INDEX alerts_time ON alerts(active_at);
CREATE TABLE transitions (
    alert_id TEXT NOT NULL, at REAL NOT NULL, from_state TEXT NOT NULL, to_state TEXT NOT NULL, value REAL,
    note TEXT
);
CREATE INDEX transitions_alert ON transitions(alert_id, at);
CREATE TABLE silences (
    id TEXT PRIMARY KEY, matchers TEXT NOT NULL, starts_at REAL NOT NULL, ends_at REAL NOT NULL,
    created_by TEXT NOT NULL, comment TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, group_key TEXT NOT NULL,
    alert_id TEXT NOT NULL, status TEXT NOT NULL, alert TEXT NOT NULL, created_at REAL NOT NULL,
    not_before REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,
    state TEXT NOT NULL DEFAULT 'queued', sent_at REAL
);
CREATE INDEX outbox_due ON outbox(state, not_before);
CREATE TABLE rules (id INTEGER PRIMARY KEY CHECK (id = 1), body TEXT NOT NULL, updated_by TEXT NOT NULL,
    updated_at REAL NOT NULL);
"""

STATES = ("inactive", "pending", "firing", "resolved")


def fingerprint(labels: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(sorted(labels.items())).encode()).hexdigest()[:16]


@dataclass(slots=True)
class Alert:
    """One episode of a rule: from the first evaluation that found its condition true to resolution."""

    id: str
    rule: str
    severity: str
    labels: dict[str, str]
    annotations: dict[str, str]
    state: str
    value: float | None
    active_at: float
    fired_at: float | None = None
    resolved_at: float | None = None
    last_true_at: float | None = None
    acked_by: str | None = None
    ack_comment: str | None = None
    acked_at: float | None = None
    notified: dict[str, float] = field(default_factory=dict)  # channel -> last accepted for delivery
    updated_at: float = 0.0

    @classmethod
    def new(cls, rule: str, severity: str, labels: dict[str, str], now: float) -> Alert:
        digest = hashlib.sha256(f"{rule}|{now}|{uuid.uuid4()}".encode()).hexdigest()[:12]
        return cls(f"{rule}-{digest}", rule, severity, labels, {}, "pending", None, now, last_true_at=now)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.labels)

    def to_json(self, silenced_by: Sequence[str] = ()) -> dict[str, Any]:
        return {
            "id": self.id,
            "rule": self.rule,
            "severity": self.severity,
            "state": self.state,
            "value": self.value,
            "labels": self.labels,
            "annotations": self.annotations,
            "active_at": iso(self.active_at),
            "fired_at": iso_or_none(self.fired_at),
            "resolved_at": iso_or_none(self.resolved_at),
            "acknowledged": self.acked_by is not None,
            "acknowledged_by": self.acked_by,
            "acknowledged_at": iso_or_none(self.acked_at),
            "ack_comment": self.ack_comment,
            "silenced": bool(silenced_by),
            "silenced_by": list(silenced_by),
            "notified": {k: iso(v) for k, v in self.notified.items()},
            "fingerprint": self.fingerprint,
        }


@dataclass(slots=True)
class Silence:
    id: str
    matchers: list[dict[str, Any]]  # {"name", "value", "isEqual": true}
    starts_at: float
    ends_at: float
    created_by: str
    comment: str
    created_at: float

    def matches(self, labels: dict[str, str], now: float) -> bool:
        if not self.starts_at <= now < self.ends_at:
            return False
        for m in self.matchers:
            equal = labels.get(m["name"]) == m["value"]
            if equal != m.get("isEqual", True):
                return False
        return True

    def to_json(self, now: float) -> dict[str, Any]:
        out = asdict(self)
        out.update(starts_at=iso(self.starts_at), ends_at=iso(self.ends_at), created_at=iso(self.created_at))
        out["active"] = self.starts_at <= now < self.ends_at
        return out


@dataclass(slots=True)
class OutboxItem:
    channel: str
    group_key: str
    alert_id: str
    status: str  # firing | resolved
    alert: dict[str, Any]  # Alert.to_json() at enqueue time
    not_before: float
    id: int = 0
    attempts: int = 0
    created_at: float = 0.0
    last_error: str | None = None


_ALERT_COLUMNS = (
    "id, rule, severity, labels, annotations, state, value, active_at, fired_at, resolved_at, last_true_at, "
    "acked_by, ack_comment, acked_at, notified, updated_at"
)


# An acknowledgement only ever arrives: a save that carries none (another worker's copy of the alert,
# taken before the acknowledgement reached it, or a replica's log entry applied after it) keeps the
# one the row has. INSERT OR REPLACE would put it back to none, on this replica until the next save.
_UPSERT_ALERT = (
    f"INSERT INTO alerts ({_ALERT_COLUMNS}) VALUES ({','.join('?' * 16)}) ON CONFLICT(id) DO UPDATE SET "
    + ", ".join(
        f"{c} = excluded.{c}"
        for c in (c.strip() for c in _ALERT_COLUMNS.split(","))
        if c not in ("id", "acked_by", "ack_comment", "acked_at")
    )
    + ", acked_by = COALESCE(excluded.acked_by, alerts.acked_by)"
    + ", ack_comment = CASE WHEN excluded.acked_by IS NULL THEN alerts.ack_comment"
    + " ELSE excluded.ack_comment END"
    + ", acked_at = COALESCE(excluded.acked_at, alerts.acked_at)"
)


def _alert_row(a: Alert) -> tuple[Any, ...]:
    return (
        a.id, a.rule, a.severity, json.dumps(a.labels), json.dumps(a.annotations), a.state, a.value,
        a.active_at, a.fired_at, a.resolved_at, a.last_true_at, a.acked_by, a.ack_comment, a.acked_at,
        json.dumps(a.notified), a.updated_at,
    )  # fmt: skip


def _alert_of(row: Sequence[Any]) -> Alert:
    return Alert(
        row[0], row[1], row[2], json.loads(row[3]), json.loads(row[4]), row[5], row[6], row[7], row[8],
        row[9], row[10], row[11], row[12], row[13], json.loads(row[14]), row[15],
    )  # fmt: skip


class AlertStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.db = SQLiteFile(
            self.path, schema=SCHEMA, version=1, label="alert store", thread_name="iros-alerts"
        )

    async def start(self) -> None:
        await self.db.run(self.db.connect)

    async def close(self) -> None:
        await self.db.close()

    def _tx(self, sql: str, rows: Sequence[Sequence[Any]] | None = None) -> int:
        conn = self.db.connect()
        with conn:
            cur = conn.executemany(sql, rows) if rows is not None else conn.execute(sql)
            return cur.rowcount

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self.db.connect().execute(sql, args).fetchall())

    # --- alerts ---------------------------------------------------------------------------------
    async def save_alert(self, alert: Alert, transition: tuple[str, str, str | None] | None = None) -> None:
        """Insert or update an alert; with (from_state, to_state, note) also record the transition."""

        def write() -> None:
            conn = self.db.connect()
            with conn:
                conn.execute(_UPSERT_ALERT, _alert_row(alert))
                if transition is not None:
                    # Once: a transition copied from another replica may arrive twice.
                    head = (alert.id, alert.updated_at, transition[0], transition[1])
                    conn.execute(
                        "INSERT INTO transitions SELECT ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM "
                        "transitions WHERE alert_id = ? AND at = ? AND from_state = ? AND to_state = ?)",
                        (*head, alert.value, transition[2], *head),
                    )

        await self.db.run(write)

    async def alert(self, alert_id: str) -> Alert | None:
        rows = await self.db.run(
            self._query, f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE id = ?", (alert_id,)
        )
        return _alert_of(rows[0]) if rows else None

    async def alerts(self, states: Sequence[str] = ("pending", "firing")) -> list[Alert]:
        marks = ",".join("?" * len(states))
        sql = f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE state IN ({marks}) ORDER BY active_at"
        return [_alert_of(r) for r in await self.db.run(self._query, sql, tuple(states))]

    async def history(
        self,
        rule: str | None = None,
        severity: str | None = None,
        state: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[int, list[Alert]]:
        where: list[str] = ["1 = 1"]
        args: list[Any] = []
        for column, value in (("rule", rule), ("severity", severity), ("state", state)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("COALESCE(resolved_at, updated_at) >= ?")
            args.append(since)
        if until is not None:
            where.append("active_at < ?")
            args.append(until)
        cond = " AND ".join(where)

        def read() -> tuple[int, list[Alert]]:
            total = self._query(f"SELECT COUNT(*) FROM alerts WHERE {cond}", args)[0][0]
            rows = self._query(
                f"SELECT {_ALERT_COLUMNS} FROM alerts WHERE {cond} ORDER BY active_at DESC LIMIT ? OFFSET ?",
                [*args, limit, offset],
            )
            return int(total), [_alert_of(r) for r in rows]

        return await self.db.run(read)

    async def transitions(self, alert_id: str) -> list[dict[str, Any]]:
        rows = await self.db.run(
            self._query,
            "SELECT at, from_state, to_state, value, note FROM transitions "
            "WHERE alert_id = ? ORDER BY at, rowid",
            (alert_id,),
        )
        return [{"at": iso(r[0]), "from": r[1], "to": r[2], "value": r[3], "note": r[4]} for r in rows]

    async def acknowledge(self, alert_id: str, who: str, comment: str, now: float) -> bool:
        def write() -> bool:
            conn = self.db.connect()
            with conn:
                cur = conn.execute(
                    "UPDATE alerts SET acked_by = ?, ack_comment = ?, acked_at = ? WHERE id = ?",
                    (who, comment, now, alert_id),
                )
                if cur.rowcount:
                    note = f"acknowledged by {who}" + (f": {comment}" if comment else "")
                    conn.execute(
                        "INSERT INTO transitions SELECT id, ?, state, state, value, ? FROM alerts "
                        "WHERE id = ? AND NOT EXISTS "
                        "(SELECT 1 FROM transitions WHERE alert_id = ? AND at = ? AND note = ?)",
                        (now, note, alert_id, alert_id, now, note),
                    )
                return cur.rowcount > 0

        return await self.db.run(write)

    async def acks(self, ids: Sequence[str]) -> dict[str, tuple[str | None, str | None, float | None]]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = await self.db.run(
            self._query,
            f"SELECT id, acked_by, ack_comment, acked_at FROM alerts WHERE id IN ({marks})",
            tuple(ids),
        )
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    async def forget_before(self, before: float) -> int:
        def write() -> int:
            conn = self.db.connect()
            with conn:
                conn.execute(
                    "DELETE FROM transitions WHERE alert_id IN "
                    "(SELECT id FROM alerts WHERE state IN ('resolved', 'inactive') AND updated_at < ?)",
                    (before,),
                )
                n = conn.execute(
                    "DELETE FROM alerts WHERE state IN ('resolved', 'inactive') AND updated_at < ?", (before,)
                ).rowcount
                conn.execute("DELETE FROM silences WHERE ends_at < ?", (before,))
                conn.execute("DELETE FROM outbox WHERE state != 'queued' AND created_at < ?", (before,))
                return int(n)

        return await self.db.run(write)

    # --- silences -------------------------------------------------------------------------------
    async def add_silence(self, s: Silence) -> None:
        await self.db.run(
            self._tx,
            "INSERT OR REPLACE INTO silences VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(s.id, json.dumps(s.matchers), s.starts_at, s.ends_at, s.created_by, s.comment, s.created_at)],
        )

    async def expire_silence(self, silence_id: str, now: float) -> bool:
        n = await self.db.run(
            self._tx, "UPDATE silences SET ends_at = ? WHERE id = ? AND ends_at > ?", [(now, silence_id, now)]
        )
        return n > 0

    async def silences(self, now: float | None = None, include_expired: bool = False) -> list[Silence]:
        now = time.time() if now is None else now
        sql = "SELECT id, matchers, starts_at, ends_at, created_by, comment, created_at FROM silences"
        args: tuple[Any, ...] = ()
        if not include_expired:
            sql += " WHERE ends_at > ?"
            args = (now,)
        rows = await self.db.run(self._query, sql + " ORDER BY created_at", args)
        return [Silence(r[0], json.loads(r[1]), r[2], r[3], r[4], r[5], r[6]) for r in rows]

    # --- the outbox -----------------------------------------------------------------------------
    async def enqueue(self, items: Sequence[OutboxItem], now: float) -> None:
        rows = [
            (i.channel, i.group_key, i.alert_id, i.status, json.dumps(i.alert), now, i.not_before)
            for i in items
        ]
        await self.db.run(
            self._tx,
            "INSERT INTO outbox (channel, group_key, alert_id, status, alert, created_at, not_before) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    async def due(self, now: float, limit: int = 500) -> list[OutboxItem]:
        rows = await self.db.run(
            self._query,
            "SELECT id, channel, group_key, alert_id, status, alert, not_before, attempts, created_at, "
            "last_error FROM outbox WHERE state = 'queued' AND not_before <= ? ORDER BY id LIMIT ?",
            (now, limit),
        )
        return [
            OutboxItem(r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[0], r[7], r[8], r[9]) for r in rows
        ]

    async def next_due(self) -> float | None:
        rows = await self.db.run(self._query, "SELECT MIN(not_before) FROM outbox WHERE state = 'queued'")
        return rows[0][0] if rows else None

    async def mark_sent(self, ids: Sequence[int], now: float) -> None:
        await self.db.run(
            self._tx, "UPDATE outbox SET state = 'sent', sent_at = ? WHERE id = ?", [(now, i) for i in ids]
        )

    async def mark_failed(self, ids: Sequence[int], error: str, retry_at: float | None) -> None:
        rows: list[tuple[Any, ...]]
        if retry_at is None:
            sql, rows = (
                "UPDATE outbox SET state = 'failed', attempts = attempts + 1, last_error = ? WHERE id = ?",
                [(error, i) for i in ids],
            )
        else:
            sql, rows = (
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, not_before = ? WHERE id = ?",
                [(error, retry_at, i) for i in ids],
            )
        await self.db.run(self._tx, sql, rows)

    async def outbox_stats(self) -> dict[str, Any]:
        rows = await self.db.run(
            self._query, "SELECT channel, state, COUNT(*) FROM outbox GROUP BY channel, state"
        )
        out: dict[str, dict[str, int]] = {}
        for channel, state, n in rows:
            out.setdefault(channel, {})[state] = n
        return out

    # --- rules set through the API --------------------------------------------------------------
    async def save_rules(self, rules: list[dict[str, Any]], who: str, now: float) -> None:
        await self.db.run(
            self._tx, "INSERT OR REPLACE INTO rules VALUES (1, ?, ?, ?)", [(json.dumps(rules), who, now)]
        )

    async def clear_rules(self) -> None:
        await self.db.run(self._tx, "DELETE FROM rules")

    async def saved_rules(self) -> tuple[list[dict[str, Any]], str, float] | None:
        try:
            rows = await self.db.run(
                self._query, "SELECT body, updated_by, updated_at FROM rules WHERE id = 1"
            )
        except sqlite3.Error:
            return None
        return (json.loads(rows[0][0]), rows[0][1], rows[0][2]) if rows else None
