"""A performance report for people: a rich table in the terminal, a self-contained HTML page with charts.

render_table(report, Console())                 # summary, trends with their test, recommendations
write_html(report, Path("daily.html"))          # plotly.js inlined: opens offline, no CDN
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from iros.core.timefmt import iso, parse_time

_COLOURS = {"improving": "green", "degrading": "red", "stable": "cyan", "insufficient_data": "dim"}
_LABELS = {
    "total_requests": "requests",
    "avg_response_time": "average response time (ms)",
    "p95_response_time": "p95 response time (ms)",
    "cpu_usage_avg": "Iros CPU, share of the machine (%)",
    "cache_hit_rate": "cache hit rate",
    "error_rate": "error rate",
    "memory_usage_avg": "host memory (%)",
    "gpu_utilization_avg": "GPU utilisation (%)",
    "cost_usd": "cost (USD)",
    "cost_saved_usd": "saved by the cache (USD)",
}
_CHARTS = {
    "response_time": "Response time, mean per interval (ms)",
    "cpu_usage": "Iros CPU, share of the machine, mean per interval (%)",
    "cache_performance": "Cache hit rate per interval",
    "error_rate": "Error rate per interval",
    "memory_usage": "Host memory per interval (%)",
    "gpu_utilization": "GPU utilisation per interval (%)",
}


def body_of(report: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    kind = report.get("kind") or next(k for k in report if k.endswith("_report")).removesuffix("_report")
    return kind, report[f"{kind}_report"]


def render_table(report: dict[str, Any], console: Console) -> None:
    kind, body = body_of(report)
    period = body["period"]
    summary = Table(title=f"{kind.capitalize()} performance report: {period['start']} to {period['end']}")
    summary.add_column("figure")
    summary.add_column("this period", justify="right")
    summary.add_column("previous period", justify="right")
    before = body.get("previous_summary") or {}
    for key, label in _LABELS.items():
        if key in body["summary"]:
            summary.add_row(label, _fmt(body["summary"].get(key)), _fmt(before.get(key)))
    console.print(summary)
    for group, rows in _cost_groups(body):
        costs = Table(title=f"Cost by {group}")
        for column in (group, "requests", "cost (USD)", "saved (USD)", "input tokens", "output tokens"):
            costs.add_column(column, justify="left" if column == group else "right")
        for row in rows:
            costs.add_row(*(_fmt(v) for v in row))
        console.print(costs)
    trends = Table(title="Trends (Mann-Whitney U test of per-interval values against the previous period)")
    for column in ("metric", "trend", "median now", "median before", "p-value", "intervals"):
        trends.add_column(column)
    for name, t in body["trend_tests"].items():
        colour = _COLOURS.get(t["direction"], "white")
        trends.add_row(
            name,
            f"[{colour}]{t['direction']}[/]",
            _fmt(t.get("current_median")),
            _fmt(t.get("previous_median")),
            _fmt(t.get("p_value")),
            " / ".join(str(n) for n in t.get("n", [])),
        )
    console.print(trends)
    console.print("[bold]Recommendations[/]")
    for line in body["recommendations"]:
        console.print(f"  • {line}", highlight=False)


def _cost_groups(body: dict[str, Any]) -> list[tuple[str, list[list[Any]]]]:
    """The report's cost tables (by key, by model) as rows; none when nothing was priced."""
    costs = body.get("costs") or {}
    out = []
    for group in ("key", "model"):
        rows = [
            [g[group], g["requests"], g["cost_usd"], g["saved_usd"], g["input_tokens"], g["output_tokens"]]
            for g in costs.get(f"by_{group}") or []
        ]
        if rows:
            out.append((group, rows))
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_html(report: dict[str, Any], path: Path) -> None:
    """One HTML file with plotly.js inlined once, a chart per series (this period over the previous)."""
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    kind, body = body_of(report)
    charts = []
    for name, title in _CHARTS.items():
        series = body["series"].get(name) or {}
        now, before = series.get("current") or [], series.get("previous") or []
        if not now and not before:
            continue
        fig = go.Figure()
        fig.add_scatter(
            x=[p[0] for p in now], y=[p[1] for p in now], name="this period", mode="lines+markers"
        )
        # The previous period drawn over this one: shifted by the period's length, so the curves align.
        shift = parse_time(body["period"]["start"]) - parse_time(body["previous_period"]["start"])
        fig.add_scatter(
            x=[iso(parse_time(p[0]) + shift) for p in before],
            y=[p[1] for p in before],
            name="previous period",
            mode="lines",
            line={"dash": "dot"},
        )
        direction = body["trends"].get(name, "")
        fig.update_layout(title=f"{title}: {direction}", height=320, margin={"t": 50, "b": 30})
        charts.append(fig.to_html(full_html=False, include_plotlyjs=False))
    rows = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{_fmt(body['summary'].get(k))}</td>"
        f"<td>{_fmt((body.get('previous_summary') or {}).get(k))}</td></tr>"
        for k, label in _LABELS.items()
        if k in body["summary"]
    )
    cost_tables = "".join(
        f"<h2>Cost by {group}</h2><table><tr><th>{group}</th><th>requests</th><th>cost (USD)</th>"
        "<th>saved (USD)</th><th>input tokens</th><th>output tokens</th></tr>"
        + "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
        + "</table>"
        for group, rows in _cost_groups(body)
    )
    trend_rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td class='{t['direction']}'>{t['direction']}</td>"
        f"<td>{_fmt(t.get('current_median'))}</td><td>{_fmt(t.get('previous_median'))}</td>"
        f"<td>{_fmt(t.get('p_value'))}</td></tr>"
        for n, t in body["trend_tests"].items()
    )
    advice = "".join(f"<li>{html.escape(line)}</li>" for line in body["recommendations"])
    title = f"Iros {kind} performance report, {body['period']['start']} to {body['period']['end']}"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<script type="text/javascript">{get_plotlyjs()}</script>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px}}.improving{{color:green}}.degrading{{color:#c00}}
.stable{{color:#06c}}</style></head>
<body><h1>{html.escape(title)}</h1>
<h2>Summary</h2><table><tr><th>figure</th><th>this period</th><th>previous period</th></tr>{rows}</table>
{cost_tables}
<h2>Trends</h2><p>Mann-Whitney U test of per-interval values against the previous period (p &lt; 0.05).</p>
<table><tr><th>metric</th><th>trend</th><th>median now</th><th>median before</th><th>p</th></tr>
{trend_rows}</table>
<h2>Recommendations</h2><ul>{advice}</ul>
<h2>Charts</h2>{"".join(charts) or "<p>No data in either period.</p>"}
</body></html>
"""
    path.write_text(page, encoding="utf-8")
