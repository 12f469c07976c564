"""Performance reports: trends tested on constructed history, advice, storage, schedule, the CLI."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from iros.analysis.reports import DAY, ReportScheduler, ReportStore, build_report, due_periods
from iros.config import Settings
from iros.metrics.store import Samples
from iros.metrics.tsdb.db import SQLiteStore
from tests.conftest import stale_database

END = math.floor(1_790_000_000.0 / DAY) * DAY  # a UTC midnight: the daily report covers the day before


def labels(cache: str, outcome: str = "ok") -> tuple[tuple[str, str], ...]:
    return (("cache", cache), ("model", "fast"), ("outcome", outcome))


def day_of_traffic(
    store: SQLiteStore, start: float, latency: float, hit_rate: float, rng: np.random.Generator
) -> None:
    """One day: 30 requests per 10 minutes, given mean latency and hit rate, CPU from one distribution."""
    n = 144 * 30
    ts = np.sort(start + rng.uniform(0, DAY, n))
    hit = rng.random(n) < hit_rate
    for cache, mask in (("hit", hit), ("miss", ~hit)):
        store.append(
            {("response_time_ms", labels(cache)): Samples(ts[mask], rng.normal(latency, 40, mask.sum()))}
        )
    gauges = start + np.arange(0, DAY, 60.0)
    store.append({("cpu_usage_percent", ()): Samples(gauges, rng.gamma(4, 0.5, gauges.size))})
    store.append({("memory_percent", ()): Samples(gauges, rng.normal(40, 2, gauges.size))})


def constructed(path: Path) -> SQLiteStore:
    """Yesterday faster than the day before, with fewer cache hits; CPU and memory unchanged."""

    async def fill() -> SQLiteStore:
        store = SQLiteStore(path, retention_days=400, raw_retention_hours=24 * 400)
        await store.start()
        rng = np.random.default_rng(11)
        day_of_traffic(store, END - 2 * DAY, latency=800, hit_rate=0.8, rng=rng)
        day_of_traffic(store, END - DAY, latency=500, hit_rate=0.3, rng=rng)
        await store.flush()
        await store.close()
        return store

    return asyncio.run(fill())


def daily(path: Path) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        store = SQLiteStore(path, retention_days=400, raw_retention_hours=24 * 400)
        await store.start()
        try:
            targets = Settings(models=[{"name": "m", "backend": "simulated"}]).performance_targets
            return await build_report("daily", store, END, targets)
        finally:
            await store.close()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def metrics_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reports") / "metrics.db"
    constructed(path)
    return path


class TestDailyReport:
    def test_trends_match_the_constructed_history(self, metrics_db: Path) -> None:
        """Lower latency reads improving, fewer hits degrading, unchanged CPU and memory stable."""
        body = daily(metrics_db)["daily_report"]
        assert body["trends"]["response_time"] == "improving"
        assert body["trends"]["cache_performance"] == "degrading"
        assert body["trends"]["cpu_usage"] == "stable"
        assert body["trends"]["memory_usage"] == "stable"
        test = body["trend_tests"]["response_time"]
        assert test["p_value"] < 0.05 and test["test"] == "mann-whitney-u"
        assert test["current_median"] < test["previous_median"]

    def test_summary_is_in_the_seed_shape_and_measured(self, metrics_db: Path) -> None:
        """The seed's summary fields hold the constructed day's figures."""
        body = daily(metrics_db)["daily_report"]
        s = body["summary"]
        assert set(s) >= {
            "total_requests",
            "avg_response_time",
            "cpu_usage_avg",
            "cache_hit_rate",
            "error_rate",
        }
        assert s["total_requests"] == 144 * 30
        assert s["avg_response_time"] == pytest.approx(500, rel=0.02)
        assert s["cache_hit_rate"] == pytest.approx(0.3, abs=0.03)
        assert s["error_rate"] == 0
        assert body["date"] == datetime.fromtimestamp(END - DAY, UTC).date().isoformat()

    def test_recommendations_come_from_the_figures(self, metrics_db: Path) -> None:
        """The low hit rate and its degradation are advised on with their measured values."""
        body = daily(metrics_db)["daily_report"]
        text = " ".join(body["recommendations"])
        rate = body["summary"]["cache_hit_rate"]
        assert f"cache hit rate is {rate:.1%}" in text
        assert "cache performance degraded" in text
        assert "response time degraded" not in text


class TestHistoryAndSchedule:
    def test_reports_are_stored_and_the_latest_is_returned(self, tmp_path: Path) -> None:
        """Saved reports come back newest first, and only `keep` of each kind are kept."""
        history = ReportStore(tmp_path / "reports.db", keep=2)

        def report(end: float) -> dict[str, Any]:
            period = {"start": f"{end - DAY}", "end": f"{end}"}
            iso = {k: datetime.fromtimestamp(float(v), UTC).isoformat() for k, v in period.items()}
            return {"kind": "daily", "daily_report": {"period": iso, "marker": end}}

        async def go() -> tuple[dict[str, Any] | None, list[dict[str, Any]], bool]:
            for i in range(3):
                await history.save(report(END + i * DAY))
            return (
                await history.latest("daily"),
                await history.history("daily"),
                await history.has_period("daily", END),
            )

        latest, rows, has_first = asyncio.run(go())
        assert latest is not None and latest["daily_report"]["marker"] == END + 2 * DAY
        assert len(rows) == 2 and not has_first

    def test_the_scheduler_makes_each_due_report_once(self, tmp_path: Path) -> None:
        """A check generates the last whole day and week once; a second check generates nothing."""
        made: list[tuple[str, float]] = []

        async def generate(kind: str, end: float) -> dict[str, Any]:
            made.append((kind, end))
            span = DAY if kind == "daily" else 7 * DAY
            period = {
                k: datetime.fromtimestamp(v, UTC).isoformat()
                for k, v in (("start", end - span), ("end", end))
            }
            return {"kind": kind, f"{kind}_report": {"period": period}}

        scheduler = ReportScheduler(generate, ReportStore(tmp_path / "reports.db"))
        now = END + 5 * 3600

        async def go() -> tuple[list[str], list[str]]:
            return await scheduler.check(now), await scheduler.check(now + 600)

        first, second = asyncio.run(go())
        assert sorted(first) == ["daily", "weekly"] and second == []
        due = due_periods(now)
        assert ("daily", END) in made and ("weekly", due["weekly"]) in made
        assert (due["weekly"] / DAY - 4) % 7 == 0  # a Monday midnight


@pytest.mark.e2e
class TestCommandLine:
    def test_iros_report_prints_tables_and_writes_offline_html(
        self, metrics_db: Path, tmp_path: Path
    ) -> None:
        """`iros report daily --html` shows the trends and writes a page with plotly.js inlined, no CDN."""
        config = tmp_path / "iros.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "server": {"data_dir": str(metrics_db.parent)},
                    "models": [{"name": "fast", "backend": "simulated", "profile": "instant"}],
                }
            )
        )
        page = tmp_path / "daily.html"
        end = str(END)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "iros",
                "report",
                "daily",
                "--config",
                str(config),
                "--end",
                end,
                "--html",
                str(page),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
        )
        assert result.returncode == 0, result.stderr
        assert "improving" in result.stdout and "degrading" in result.stdout
        html = page.read_text()
        # Nothing is fetched: no script or stylesheet by URL (plotly.js mentions its CDN in its own config).
        assert "<script src=" not in html and '<link rel="stylesheet"' not in html
        assert "Plotly.newPlot" in html and len(html) > 1_000_000  # the library itself is in the page

    def test_a_missing_history_is_a_clear_cli_error(self, tmp_path: Path) -> None:
        """Without a metrics database the command says where it looked and what to do."""
        config = tmp_path / "iros.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "server": {"data_dir": str(tmp_path / "none")},
                    "models": [{"name": "m", "backend": "simulated"}],
                }
            )
        )
        result = _report("weekly", config)
        assert result.returncode == 2
        assert "no metrics history" in result.stderr and "iros serve" in result.stderr

    def test_a_stale_metrics_database_is_a_clear_cli_error(self, tmp_path: Path) -> None:
        """A metrics.db in a pre-release layout is named, with what to do, not a traceback."""
        data = tmp_path / "data"
        stale_database(data / "metrics.db", "CREATE TABLE rollups (series_id INTEGER)")
        config = tmp_path / "iros.yaml"
        config.write_text(
            yaml.safe_dump(
                {"server": {"data_dir": str(data)}, "models": [{"name": "m", "backend": "simulated"}]}
            )
        )
        result = _report("daily", config)
        assert result.returncode == 2
        assert "cannot be used" in result.stderr and "Move the file aside" in result.stderr
        assert "Traceback" not in result.stderr


class TestTrendTest:
    @pytest.mark.parametrize(
        ("now", "before", "lower_is_better", "direction"),
        [
            ([10.0, 11, 12, 10, 11, 12], [20.0, 21, 22, 20, 21, 22], True, "improving"),
            ([10.0, 11, 12, 10, 11, 12], [20.0, 21, 22, 20, 21, 22], False, "degrading"),
            ([10.0, 20, 10, 20, 10, 20], [20.0, 10, 20, 10, 20, 10], True, "stable"),
            ([10.0, 11], [20.0, 21], True, "insufficient_data"),
        ],
    )
    def test_direction_follows_the_test_and_the_metric_sense(
        self, now: list[float], before: list[float], lower_is_better: bool, direction: str
    ) -> None:
        """A significant shift is improving or degrading by the metric's sense; no shift is stable."""
        from iros.analysis.history import trend

        assert trend(now, before, lower_is_better)["direction"] == direction


def _report(kind: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iros", "report", kind, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


class TestCosts:
    def test_reports_carry_the_periods_cost_by_key_and_model(self, metrics_db: Path, tmp_path: Path) -> None:
        """With the spend ledger the report's summary, cost tables, first line, table and page say what
        the day cost against the day before."""
        from rich.console import Console

        from iros.analysis.render import render_table, write_html
        from iros.gateway.spend import Spend, SQLiteSpendStore

        async def go() -> dict[str, Any]:
            spend = SQLiteSpendStore(tmp_path / "spend.db")
            await spend.start()
            for at, key, model, usd in (
                (END - DAY / 2, "team-a", "fast", 0.30),
                (END - DAY / 2, "team-b", "fast", 0.10),
                (END - DAY / 3, "team-a", "large", 0.20),
                (END - 1.5 * DAY, "team-a", "fast", 0.40),  # the day before
                (END + 60, "team-a", "fast", 9.0),  # after the period
            ):
                spend.add(Spend(at, key, model, usd, saved_usd=0.05, input_tokens=10, output_tokens=20))
            store = SQLiteStore(metrics_db, retention_days=400, raw_retention_hours=24 * 400)
            await store.start()
            try:
                targets = Settings(models=[{"name": "m", "backend": "simulated"}]).performance_targets
                return await build_report("daily", store, END, targets, spend=spend)
            finally:
                await store.close()
                await spend.close()

        report = asyncio.run(go())
        body = report["daily_report"]
        assert body["summary"]["cost_usd"] == pytest.approx(0.6)
        assert body["previous_summary"]["cost_usd"] == pytest.approx(0.4)
        assert [g["key"] for g in body["costs"]["by_key"]] == ["team-a", "team-b"]
        assert [g["model"] for g in body["costs"]["by_model"]] == ["fast", "large"]
        assert body["recommendations"][0].startswith("answers cost $0.6000, +50% on the previous period")
        console = Console(record=True, width=200)
        render_table(report, console)
        text = console.export_text()
        assert "Cost by key" in text and "team-b" in text and "cost (USD)" in text
        write_html(report, tmp_path / "daily.html")
        assert "<h2>Cost by model</h2>" in (tmp_path / "daily.html").read_text()
