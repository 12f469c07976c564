"""Daily and weekly performance reports: summary, trends tested against the previous period, advice.

report = await build_report("daily", store, end=time.time(), targets=settings.performance_targets,
                            spend=SQLiteSpendStore(data_dir / "spend.db"))   # spend: the cost lines
report["daily_report"]["trends"]      # {"response_time": "improving", "cpu_usage": "stable", ...}
report["daily_report"]["costs"]       # {"cost_usd", "saved_usd", "previous_cost_usd", "by_key", "by_model"}
history = ReportStore(Path("iros-data/reports.db")); await history.save(report); await history.latest("daily")

A trend is "improving" or "degrading" only when a Mann-Whitney U test tells the per-interval values
of this period from the previous one's (p < 0.05); otherwise "stable".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from iros.analysis import bottlenecks
from iros.analysis.history import distribution, interval_values, rnd, trend
from iros.config import Target
from iros.core.periodic import cancel_all
from iros.core.timefmt import iso, iso_date, parse_time
from iros.gateway.spend import SpendStore
from iros.metrics.store import MetricsStore

log = logging.getLogger("iros.reports")

DAY = 86400.0
KINDS = {"daily": (DAY, 600.0), "weekly": (7 * DAY, 3600.0)}  # period, interval tested
HIT_LABELS = ("hit", "semantic_hit")

# name -> (metric, match, lower is better)
_GAUGED: dict[str, tuple[str, tuple[tuple[str, str], ...], bool]] = {
    "response_time": ("response_time_ms", (("outcome", "ok"),), True),
    "cpu_usage": ("cpu_usage_percent", (), True),
    "memory_usage": ("memory_percent", (), True),
    "gpu_utilization": ("gpu_utilization_percent", (), True),
}


def period_of(kind: str, end: float) -> tuple[float, float, float]:
    """(start, end, interval) of the report ending at `end`."""
    if kind not in KINDS:
        raise ValueError(f"unknown report kind {kind!r}: daily or weekly")
    span, step = KINDS[kind]
    return end - span, end, step


async def _rates(
    store: MetricsStore,
    start: float,
    end: float,
    step: float,
    num: tuple[str, ...],
    den: tuple[str, ...],
    label: str,
) -> tuple[list[tuple[float, float]], float | None]:
    """A ratio of request counts per interval (hits over lookups, errors over requests) and overall."""

    async def counts(values: tuple[str, ...]) -> dict[float, float]:
        out: dict[float, float] = {}
        for value in values:
            match = ((label, value),) if value else ()
            for ts, c in await interval_values(store, "response_time_ms", start, end, step, match, "count"):
                out[ts] = out.get(ts, 0.0) + c
        return out

    top, bottom = await counts(num), await counts(den)
    series = [(ts, top.get(ts, 0.0) / d) for ts, d in sorted(bottom.items()) if d > 0]
    total = sum(bottom.values())
    return series, (sum(top.values()) / total if total else None)


async def _measure(store: MetricsStore, start: float, end: float, step: float) -> dict[str, Any]:
    series: dict[str, list[tuple[float, float]]] = {}
    for name, (metric, match, _) in _GAUGED.items():
        series[name] = await interval_values(store, metric, start, end, step, match)
    series["cache_performance"], hit_rate = await _rates(
        store, start, end, step, HIT_LABELS, (*HIT_LABELS, "miss"), "cache"
    )
    series["error_rate"], error_rate = await _rates(
        store, start, end, step, ("server_error",), ("",), "outcome"
    )
    latency = await distribution(store, "response_time_ms", start, end, (("outcome", "ok"),))
    total = sum(c for _, c in await interval_values(store, "response_time_ms", start, end, step, (), "count"))
    cpu = await distribution(store, "cpu_usage_percent", start, end)
    memory = await distribution(store, "memory_percent", start, end)
    gpu = await distribution(store, "gpu_utilization_percent", start, end)
    summary = {
        "total_requests": int(total),
        "avg_response_time": rnd(latency.mean, 1),
        "p95_response_time": rnd(latency.p95, 1),
        "cpu_usage_avg": rnd(cpu.mean, 3),
        "cache_hit_rate": rnd(hit_rate, 4),
        "error_rate": rnd(error_rate, 5),
        "memory_usage_avg": rnd(memory.mean, 2),
        "gpu_utilization_avg": rnd(gpu.mean, 2),
    }
    return {"summary": summary, "series": series}


_LOWER_IS_BETTER = {
    "response_time": True,
    "cpu_usage": True,
    "memory_usage": True,
    "gpu_utilization": True,
    "cache_performance": False,
    "error_rate": True,
}


async def build_report(
    kind: str,
    store: MetricsStore,
    end: float,
    targets: dict[str, Target],
    max_concurrency: int = 64,
    spend: SpendStore | None = None,
) -> dict[str, Any]:
    """The seed's report for the period ending at `end`, with the previous period as the baseline; with
    the spend ledger, what the period's answers cost and what the cache saved."""
    start, end, step = period_of(kind, end)
    span = end - start
    now = await _measure(store, start, end, step)
    before = await _measure(store, start - span, start, step)
    costs = await cost_lines(spend, start, end) if spend is not None else None
    if costs is not None:
        now["summary"]["cost_usd"], now["summary"]["cost_saved_usd"] = costs["cost_usd"], costs["saved_usd"]
        before["summary"]["cost_usd"] = costs["previous_cost_usd"]
        before["summary"]["cost_saved_usd"] = costs["previous_saved_usd"]
    tests: dict[str, Any] = {}
    for name, lower in _LOWER_IS_BETTER.items():
        tests[name] = trend(
            [v for _, v in now["series"][name]], [v for _, v in before["series"][name]], lower_is_better=lower
        )
    summary = now["summary"]
    hit_rate = summary["cache_hit_rate"]
    analysis = await bottlenecks.analyse(store, start, end, max_concurrency, hit_rate)
    body: dict[str, Any] = {
        "date": iso_date(start),
        "period": {"start": iso(start), "end": iso(end), "interval_seconds": step},
        "previous_period": {"start": iso(start - span), "end": iso(start)},
        "summary": summary,
        "previous_summary": before["summary"],
        "trends": {name: t["direction"] for name, t in tests.items()},
        "trend_tests": tests,
        "top_bottleneck": analysis["top_bottleneck"],
        "recommendations": recommendations(summary, tests, targets, analysis["top_bottleneck"], costs),
        "costs": costs,
        "series": {
            name: {
                "current": [[iso(ts), rnd(v, 5)] for ts, v in now["series"][name]],
                "previous": [[iso(ts), rnd(v, 5)] for ts, v in before["series"][name]],
            }
            for name in tests
        },
        "generated_at": iso(time.time()),
    }
    return {f"{kind}_report": body, "kind": kind}


async def cost_lines(spend: SpendStore, start: float, end: float) -> dict[str, Any]:
    """The period's cost and savings by key and by model (costliest first), and the previous period's."""
    span = end - start
    by_key = await spend.totals(start, end, "key")
    by_model = await spend.totals(start, end, "model")
    before = await spend.totals(start - span, start, "key")
    return {
        "cost_usd": round(sum(g["cost_usd"] for g in by_key), 8),
        "saved_usd": round(sum(g["saved_usd"] for g in by_key), 8),
        "previous_cost_usd": round(sum(g["cost_usd"] for g in before), 8),
        "previous_saved_usd": round(sum(g["saved_usd"] for g in before), 8),
        "by_key": by_key[:20],
        "by_model": by_model[:20],
    }


def cost_line(costs: dict[str, Any]) -> str | None:
    """One sentence on the period's spend, or None when nothing was priced."""
    spent, saved, before = costs["cost_usd"], costs["saved_usd"], costs["previous_cost_usd"]
    if not spent and not saved:
        return None
    change = f", {spent / before - 1:+.0%} on the previous period" if before else ""
    line = f"answers cost {_usd(spent)}{change}; the cache saved {_usd(saved)}"
    if costs["by_key"]:
        top = costs["by_key"][0]
        line += f"; costliest key {top['key']} ({_usd(top['cost_usd'])})"
    if costs["by_model"]:
        top = costs["by_model"][0]
        line += f", costliest model {top['model']} ({_usd(top['cost_usd'])})"
    return line


def _usd(value: float) -> str:
    # Cents where there are some; small sums keep their first significant digits.
    return f"${value:,.4f}" if value >= 0.01 or not value else f"${value:.6f}"


def recommendations(
    summary: dict[str, Any],
    tests: dict[str, Any],
    targets: dict[str, Target],
    top: dict[str, Any] | None,
    costs: dict[str, Any] | None = None,
) -> list[str]:
    """Advice from the figures: KPIs off target, trends that degraded, the period's top bottleneck, and
    what the period cost."""
    out: list[str] = []
    spent = cost_line(costs) if costs is not None else None
    if spent is not None:
        out.append(spent)
    if not summary["total_requests"]:
        return [*out, "no requests were served in this period: nothing to recommend"]
    checks = (
        ("response_time_ms", "avg_response_time", "average response time", "ms", False),
        ("cpu_usage_percent", "cpu_usage_avg", "Iros CPU utilisation", "%", False),
        ("error_rate", "error_rate", "error rate", "", False),
        ("cache_hit_rate", "cache_hit_rate", "cache hit rate", "", True),
    )
    for target_name, key, label, unit, higher_better in checks:
        target, value = targets.get(target_name), summary.get(key)
        if target is None or value is None:
            continue
        off = value < target.target if higher_better else value > target.target
        if not off:
            continue
        shown = f"{value:.1%}" if not unit else f"{value:g} {unit}"
        goal = f"{target.target:.0%}" if not unit else f"{target.target:g} {unit}"
        advice = {
            "response_time_ms": "see the top bottleneck below",
            "cpu_usage_percent": "profile a request (POST /api/analysis/profile) to see where the CPU goes",
            "error_rate": "check the failing models in /api/analysis/performance/models",
            "cache_hit_rate": "raise the cache size or TTL, or lower the semantic similarity threshold",
        }[target_name]
        out.append(f"{label} is {shown}, off the {goal} target: {advice}")
    for name, t in tests.items():
        if t["direction"] == "degrading":
            change = t.get("relative_change")
            change_text = f" ({change:+.0%})" if change is not None else ""
            out.append(
                f"{name.replace('_', ' ')} degraded from a median of {t['previous_median']} to "
                f"{t['current_median']}{change_text}, Mann-Whitney p={t['p_value']}: compare with changes "
                "made in this period"
            )
    if top is not None:
        out.append(f"top bottleneck: {top['finding']}; {top['recommendation']}")
    if len(out) == (spent is not None):
        out.append(
            f"every KPI met its target ({summary['total_requests']} requests, "
            f"{summary['avg_response_time']} ms average) and no trend degraded"
        )
    return out


class ReportStore:
    """Generated reports in SQLite under server.data_dir, newest last; the oldest beyond `keep` go."""

    def __init__(self, path: Path, keep: int = 400) -> None:
        self.path = path
        self.keep = keep
        self._lock = asyncio.Lock()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=10)
        conn.execute(
            "CREATE TABLE IF NOT EXISTS reports (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, "
            "period_start REAL NOT NULL, period_end REAL NOT NULL, created_at REAL NOT NULL, "
            "body BLOB NOT NULL)"
        )
        conn.execute("CREATE INDEX IF NOT EXISTS reports_kind_end ON reports(kind, period_end)")
        return conn

    def _save(self, kind: str, start: float, end: float, body: bytes, once: bool = False) -> int:
        with contextlib.closing(self._connect()) as conn, conn:
            conn.execute("BEGIN IMMEDIATE")  # several workers' schedulers: one of them writes a period
            if (
                once
                and conn.execute(
                    "SELECT 1 FROM reports WHERE kind = ? AND period_end = ?", (kind, end)
                ).fetchone()
            ):
                return 0
            cur = conn.execute(
                "INSERT INTO reports(kind, period_start, period_end, created_at, body) "
                "VALUES (?, ?, ?, ?, ?)",
                (kind, start, end, time.time(), body),
            )
            conn.execute(
                "DELETE FROM reports WHERE kind = ? AND id NOT IN "
                "(SELECT id FROM reports WHERE kind = ? ORDER BY id DESC LIMIT ?)",
                (kind, kind, self.keep),
            )
            return int(cur.lastrowid or 0)

    async def save(self, report: dict[str, Any], once: bool = False) -> int:
        """Store a report; with `once`, only if no report of its kind ends where it ends (returns 0)."""
        kind = report["kind"]
        body = report[f"{kind}_report"]
        start = parse_time(body["period"]["start"])
        end = parse_time(body["period"]["end"])
        async with self._lock:
            rid = await asyncio.to_thread(self._save, kind, start, end, orjson.dumps(report), once)
        report["id"] = rid
        return rid

    def _query(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with contextlib.closing(self._connect()) as conn:
            return conn.execute(sql, args).fetchall()

    async def latest(self, kind: str) -> dict[str, Any] | None:
        rows = await asyncio.to_thread(
            self._query, "SELECT id, body FROM reports WHERE kind = ? ORDER BY id DESC LIMIT 1", (kind,)
        )
        if not rows:
            return None
        report: dict[str, Any] = orjson.loads(rows[0][1])
        report["id"] = rows[0][0]
        return report

    async def has_period(self, kind: str, end: float) -> bool:
        rows = await asyncio.to_thread(
            self._query, "SELECT 1 FROM reports WHERE kind = ? AND period_end = ? LIMIT 1", (kind, end)
        )
        return bool(rows)

    async def history(self, kind: str, limit: int = 30) -> list[dict[str, Any]]:
        rows = await asyncio.to_thread(
            self._query,
            "SELECT id, period_start, period_end, created_at FROM reports "
            "WHERE kind = ? ORDER BY id DESC LIMIT ?",
            (kind, limit),
        )
        return [{"id": r[0], "start": iso(r[1]), "end": iso(r[2]), "created_at": iso(r[3])} for r in rows]


def due_periods(now: float) -> dict[str, float]:
    """The end of the last whole period of each kind: UTC midnight, and Monday midnight for weeks."""
    midnight = math.floor(now / DAY) * DAY
    # 1970-01-01 was a Thursday: Mondays are 4 days after multiples of a week.
    monday = math.floor((now - 4 * DAY) / (7 * DAY)) * 7 * DAY + 4 * DAY
    return {"daily": midnight, "weekly": monday}


class ReportScheduler:
    """Generates each whole day's and week's report once, in the background, and stores it."""

    def __init__(
        self,
        generate: Callable[[str, float], Awaitable[dict[str, Any]]],
        history: ReportStore,
        check_seconds: float = 300.0,
    ) -> None:
        self.generate = generate
        self.history = history
        self.check_seconds = check_seconds
        self._task: asyncio.Task[None] | None = None

    async def check(self, now: float | None = None) -> list[str]:
        """Generate what is due and missing; returns the kinds generated."""
        made = []
        for kind, end in due_periods(now or time.time()).items():
            if await self.history.has_period(kind, end):
                continue
            if await self.history.save(await self.generate(kind, end), once=True):
                made.append(kind)
        return made

    async def _loop(self) -> None:
        while True:
            try:
                made = await self.check()
                if made:
                    log.info("generated %s report(s)", ", ".join(made))
            except Exception:
                log.exception("scheduled report generation failed")
            await asyncio.sleep(self.check_seconds)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        await cancel_all([self._task])
