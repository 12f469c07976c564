"""Metric history read back from a Prometheus server that scrapes Iros's /metrics.

store = PrometheusStore("http://127.0.0.1:9090", timeout=5.0)
await store.start()
points = await store.query(Query("response_time_ms", start, end, step=60, match=(("model", "large"),)))
await store.close()

Writes are no-ops: Prometheus scrapes /metrics itself. Every catalog query becomes a handful of
PromQL `query_range` calls, run concurrently; see `promql()` for the exact expressions.

Windows mean what they mean in the SQLite store: aligned multiples of `step`, each covering
[ts, ts + step). Prometheus evaluates a range query at `start + k*step` looking back over `[step]`,
so the evaluation instant t answers for the window that starts at t - step.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import orjson

from iros.core.errors import StoreUnavailable
from iros.core.redact import redact_text, redact_url
from iros.core.timefmt import format_duration
from iros.metrics.catalog import METRICS, MetricDef
from iros.metrics.store import Point, Query, Samples, SeriesKey

__all__ = ["GAUGE_AGGREGATION", "MAX_POINTS", "PromQL", "PrometheusStore", "promql"]

# Prometheus refuses a query_range that would return more points than this per series.
MAX_POINTS = 11_000

Aggregation = Literal["sum", "avg", "max"]

# How the series of one gauge combine into one (several workers each expose it with a `pid` label;
# GPU gauges also carry `gpu`). Per-process quantities add up across workers; host-wide readings
# are the same host seen by every worker, so they are averaged (summing would multiply them);
# event-loop lag is per process and the worst worker is the one that matters.
GAUGE_AGGREGATION: dict[str, Aggregation] = {
    "iros_requests_in_flight": "sum",
    "iros_queue_length": "sum",
    "iros_backend_queue_length": "sum",  # per worker, like iros_queue_length
    "iros_process_resident_memory_bytes": "sum",
    "iros_process_cpu_percent": "sum",
    "iros_cpu_usage_percent": "sum",  # each worker's share of the machine
    "iros_system_cpu_percent": "avg",
    "iros_system_memory_percent": "avg",
    "iros_disk_usage_percent": "avg",
    "iros_network_receive_bytes_per_second": "avg",
    "iros_network_transmit_bytes_per_second": "avg",
    "iros_gpu_utilization_percent": "avg",
    "iros_gpu_memory_percent": "avg",
    "iros_event_loop_lag_seconds": "max",
    "iros_budget_used_ratio": "max",  # every worker reads the same shared ledger
}

# Across-series operator per statistic, for each aggregation. `count` is the number of scrapes in
# the window, so it is the max over series (every worker is scraped together), never their sum.
# min/max/quantiles of a sum or max of series are approximated from the per-series statistics:
# Prometheus does not keep the combined series, and a subquery would need the scrape interval.
_ACROSS: dict[Aggregation, dict[str, str]] = {
    "sum": {"count": "max", "sum": "sum", "min": "sum", "max": "sum", "quantile": "sum"},
    "avg": {"count": "max", "sum": "avg", "min": "min", "max": "max", "quantile": "avg"},
    "max": {"count": "max", "sum": "max", "min": "max", "max": "max", "quantile": "max"},
}


@dataclass(frozen=True, slots=True)
class PromQL:
    """The expressions for one query: one per statistic, quantiles keyed by q."""

    count: str
    sum: str
    min: str | None
    max: str | None
    quantiles: dict[float, str]

    def all(self) -> dict[str, str]:
        out = {"count": self.count, "sum": self.sum}
        if self.min is not None:
            out["min"] = self.min
        if self.max is not None:
            out["max"] = self.max
        out.update({f"q{q!r}": expr for q, expr in self.quantiles.items()})
        return out


def metric_def(name: str) -> MetricDef:
    definition = METRICS.get(name)
    if definition is None:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
    return definition


def _check_label(definition: MetricDef, label: str) -> None:
    if label not in definition.labels:
        known = ", ".join(definition.labels) or "none"
        raise ValueError(f"metric {definition.name!r} has no label {label!r}; its labels: {known}")


def escape(value: str) -> str:
    """A PromQL double-quoted string literal (Go escaping) holding exactly `value`."""
    out = ['"']
    for ch in value:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _selector(name: str, definition: MetricDef, match: tuple[tuple[str, str], ...]) -> str:
    for label, _ in match:
        _check_label(definition, label)
    if not match:
        return name
    return name + "{" + ",".join(f"{label}={escape(value)}" for label, value in match) + "}"


def _duration(step_ms: int) -> str:
    return format_duration(step_ms / 1000, largest="s")


def _scaled(expr: str, scale: float) -> str:
    return expr if scale == 1 else f"{expr} * {scale:g}"


def _check_quantiles(quantiles: tuple[float, ...]) -> None:
    for q in quantiles:
        if not 0 <= q <= 1:
            raise ValueError(f"quantile {q!r} is outside 0..1")


def promql(
    metric: str, match: tuple[tuple[str, str], ...], step_ms: int, quantiles: tuple[float, ...]
) -> PromQL:
    """The PromQL for one window of `step_ms` of a catalog metric. Only catalog names get in."""
    definition = metric_def(metric)
    _check_quantiles(quantiles)
    window = f"[{_duration(step_ms)}]"
    scale = definition.scale
    if definition.kind == "response":
        # Not increase(): its window sees only samples inside the range, so a burst scraped between two
        # windows is lost and the rest is extrapolated. The difference against the value one step
        # earlier telescopes: windows add up to exactly what was scraped. `>= 0 or X` counts a series
        # that is new or was reset (a restarted worker) from zero.
        offset = _duration(step_ms)

        def delta(name: str) -> str:
            selector = _selector(definition.prom + name, definition, match)
            return f"(({selector} - {selector} offset {offset}) >= 0 or {selector})"

        count = f"sum({delta('_count')})"
        total = f"sum({delta('_sum')})"
        buckets = f"sum by (le) ({delta('_bucket')})"
        return PromQL(
            count=count,
            sum=_scaled(total, scale),
            min=None,  # histograms keep neither
            max=None,
            quantiles={q: _scaled(f"histogram_quantile({q!r}, {buckets})", scale) for q in quantiles},
        )
    series = _selector(definition.prom, definition, match) + window
    across = _ACROSS[GAUGE_AGGREGATION.get(definition.prom, "avg")]
    return PromQL(
        count=f"{across['count']}(count_over_time({series}))",
        sum=_scaled(f"{across['sum']}(sum_over_time({series}))", scale),
        min=_scaled(f"{across['min']}(min_over_time({series}))", scale),
        max=_scaled(f"{across['max']}(max_over_time({series}))", scale),
        quantiles={
            q: _scaled(f"{across['quantile']}(quantile_over_time({q!r}, {series}))", scale) for q in quantiles
        },
    )


def _ms(seconds: float) -> int:
    # Prometheus timestamps have millisecond resolution; integer ms keep window arithmetic exact.
    return round(seconds * 1000)


def _seconds(ms: int) -> str:
    return f"{ms // 1000}.{ms % 1000:03d}"


def _value(raw: Any) -> float | None:
    # Values arrive as strings ("NaN", "+Inf" included); a NaN quantile means an empty window.
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class PrometheusStore:
    """A MetricsStore whose history is whatever the Prometheus at `endpoint` scraped from Iros."""

    name = "prometheus"

    def __init__(
        self, endpoint: str, *, timeout: float = 5.0, session: aiohttp.ClientSession | None = None
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.endpoint = endpoint.rstrip("/")
        self.shown = redact_url(self.endpoint)  # in messages and status: never a password
        self.timeout = timeout
        self._session = session
        self._owns_session = session is None

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
            self._owns_session = True

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def append(self, batch: dict[SeriesKey, Samples]) -> None:
        """Nothing to write: Prometheus scrapes /metrics itself."""

    async def flush(self) -> None:
        """Nothing queued."""

    async def health(self) -> dict[str, Any]:
        """For a status endpoint: whether Prometheus answers, and its version or what went wrong."""
        base: dict[str, Any] = {"backend": self.name, "endpoint": self.shown}
        try:
            data = await self._get("/api/v1/status/buildinfo", [])
        except StoreUnavailable as exc:
            return {**base, "reachable": False, "error": str(exc)}
        version = data.get("version") if isinstance(data, dict) else None
        return {**base, "reachable": True, "version": version}

    async def query(self, query: Query) -> list[Point]:
        if not query.step > 0:
            raise ValueError(f"step must be positive, not {query.step!r}")
        if not query.end > query.start:
            raise ValueError(f"end ({query.end!r}) must be after start ({query.start!r})")
        step_ms = _ms(query.step)
        if step_ms < 1:
            raise ValueError(f"step {query.step!r}s is below Prometheus' resolution of 1 ms")
        exprs = promql(query.metric, query.match, step_ms, query.quantiles)
        first_ms = _ms(query.start) // step_ms * step_ms
        end_ms = -(-_ms(query.end) // step_ms) * step_ms
        windows = (end_ms - first_ms) // step_ms
        if windows > MAX_POINTS:
            span = query.end - query.start
            raise ValueError(
                f"{windows} windows of {query.step:g}s exceed Prometheus' limit of {MAX_POINTS} points "
                f"per series; use a step of at least {math.ceil(span / (MAX_POINTS - 1))}s for this range"
            )
        # Evaluating at the end of each window, looking back one step, answers for that window.
        params = {
            "start": _seconds(first_ms + step_ms),
            "end": _seconds(end_ms),
            "step": _seconds(step_ms),
        }
        named = exprs.all()
        results = await self._gather([self._range(expr, params, step_ms) for expr in named.values()])
        by_name = dict(zip(named, results, strict=True))
        counts = by_name["count"]
        points = []
        for ts_ms in sorted(counts):
            # Counter values are floats in Prometheus' API.
            raw = counts[ts_ms]
            count = round(raw) if raw is not None else 0
            if count <= 0:
                continue
            points.append(
                Point(
                    ts=ts_ms / 1000,
                    count=count,
                    sum=by_name["sum"].get(ts_ms) or 0.0,
                    min=by_name["min"].get(ts_ms) if "min" in by_name else None,
                    max=by_name["max"].get(ts_ms) if "max" in by_name else None,
                    quantiles={q: by_name[f"q{q!r}"].get(ts_ms) for q in exprs.quantiles},
                )
            )
        return points

    async def label_values(self, metric: str, label: str, start: float, end: float) -> list[str]:
        definition = metric_def(metric)
        _check_label(definition, label)
        if end < start:
            raise ValueError(f"end ({end!r}) is before start ({start!r})")
        # Histogram labels live on the _count/_bucket/_sum series, never on the bare name.
        series = definition.prom + "_count" if definition.kind == "response" else definition.prom
        params = [("match[]", series), ("start", _seconds(_ms(start))), ("end", _seconds(_ms(end)))]
        data = await self._get(f"/api/v1/label/{label}/values", params)
        if not isinstance(data, list):
            raise StoreUnavailable(f"Prometheus at {self.shown} answered label values without a list")
        return sorted(str(v) for v in data)

    async def _gather(self, coros: list[Any]) -> list[dict[int, float | None]]:
        # A TaskGroup cancels the sibling requests as soon as one fails, so a dead Prometheus costs
        # one timeout, not one per statistic.
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(c) for c in coros]
        except BaseExceptionGroup as eg:
            raise _first(eg) from None
        return [t.result() for t in tasks]

    async def _range(self, expr: str, params: dict[str, str], step_ms: int) -> dict[int, float | None]:
        data = await self._request("POST", "/api/v1/query_range", form={**params, "query": expr})
        if not isinstance(data, dict) or data.get("resultType") != "matrix":
            raise StoreUnavailable(f"Prometheus at {self.shown} answered query_range without a matrix")
        series = data.get("result") or []
        if len(series) > 1:
            # Every expression aggregates to one series; more means a label slipped past the sum.
            raise StoreUnavailable(f"Prometheus at {self.shown} returned {len(series)} series for {expr}")
        out: dict[int, float | None] = {}
        for t, raw in series[0].get("values", []) if series else []:
            out[_ms(float(t)) - step_ms] = _value(raw)
        return out

    async def _get(self, path: str, params: list[tuple[str, str]]) -> Any:
        return await self._request("GET", path, params=params)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: list[tuple[str, str]] | None = None,
        form: dict[str, str] | None = None,
    ) -> Any:
        await self.start()
        assert self._session is not None
        url = self.endpoint + path
        where = f"the history backend, Prometheus at {self.shown},"
        try:
            # The timeout is set per request too: an injected session may carry a longer one.
            async with self._session.request(
                method,
                url,
                params=params,
                data=form,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as response:
                body = await response.read()
                status = response.status
        except TimeoutError:
            raise StoreUnavailable(f"{where} did not answer within {self.timeout:g}s") from None
        except aiohttp.ClientConnectorError as exc:
            raise StoreUnavailable(f"{where} is unreachable: {_connect_reason(exc)}") from None
        except aiohttp.ClientError as exc:
            raise StoreUnavailable(
                f"{where} is unreachable: {redact_text(str(exc)) or type(exc).__name__}"
            ) from None
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict) or doc.get("status") not in ("success", "error"):
            raise StoreUnavailable(
                f"{where} answered HTTP {status} to {path} with something that is not a Prometheus API "
                f"response (is {self.shown} a Prometheus server?)"
            )
        if doc["status"] == "error":
            raise StoreUnavailable(
                f"{where} answered HTTP {status} to {path}: {doc.get('errorType')}: {doc.get('error')}"
            )
        return doc.get("data")


def _connect_reason(exc: aiohttp.ClientConnectorError) -> str:
    os_error = exc.os_error
    if isinstance(os_error, ConnectionRefusedError) or os_error.errno == errno.ECONNREFUSED:
        return "connection refused"
    if os_error.errno:
        return os.strerror(os_error.errno).lower()
    return str(os_error) or type(os_error).__name__


def _first(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    # Prefer the store's own error (it names the endpoint); otherwise whatever failed first.
    leaves: list[BaseException] = []

    def walk(group: BaseExceptionGroup[BaseException]) -> None:
        for exc in group.exceptions:
            if isinstance(exc, BaseExceptionGroup):
                walk(exc)
            else:
                leaves.append(exc)

    walk(eg)
    for exc in leaves:
        if isinstance(exc, StoreUnavailable):
            return exc
    return leaves[0]
