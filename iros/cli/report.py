"""`iros report daily|weekly`: a report from the configured metrics store, as tables, JSON or HTML.

run_report(settings, "daily", None, Path("daily.html"), False, Console(), Console(stderr=True))
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from iros.analysis.render import render_table, write_html
from iros.analysis.reports import KINDS, build_report
from iros.config import Settings
from iros.core.timefmt import TimeError, parse_time
from iros.gateway.spend import SQLiteSpendStore
from iros.metrics.monitor import build_store


def run_report(
    settings: Settings,
    kind: str,
    end: str | None,
    html_file: Path | None,
    as_json: bool,
    console: Console,
    err: Console,
) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"unknown report {kind!r}: use daily or weekly")
    try:
        until = parse_time(end) if end else time.time()
    except TimeError as exc:
        raise ValueError(f"end={exc}") from None
    metrics = settings.metrics_collection
    data_dir = Path(settings.server.data_dir)
    if metrics.storage.backend == "sqlite":
        path = Path(metrics.storage.path) if metrics.storage.path else data_dir / "metrics.db"
        if not path.exists():
            raise ValueError(f"no metrics history at {path}: run `iros serve` with this config first")
    with Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(), console=err
    ) as bar:
        bar.add_task(f"building the {kind} report from the metrics store", total=None)
        report = asyncio.run(_build(settings, kind, until, data_dir))
    if as_json:
        console.print_json(orjson.dumps(report).decode())
    else:
        render_table(report, console)
    if html_file is not None:
        write_html(report, html_file)
        err.print(f"wrote {html_file}", highlight=False)
    return report


async def _build(settings: Settings, kind: str, end: float, data_dir: Path) -> dict[str, Any]:
    store = build_store(settings.metrics_collection, data_dir)
    await store.start()
    # The spend ledger, when `iros serve` kept one here: the report's cost lines.
    spend = SQLiteSpendStore(data_dir / "spend.db") if (data_dir / "spend.db").exists() else None
    try:
        if spend is not None:
            await spend.start()
        return await build_report(
            kind, store, end, settings.performance_targets, settings.server.max_concurrency, spend
        )
    finally:
        if spend is not None:
            await spend.close()
        await store.close()
