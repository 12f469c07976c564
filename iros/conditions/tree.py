"""The parts of a parsed condition (parse.py builds them): values, comparisons, and/or/not,
the names they may use, and what they read from (a Source).

Compare(">", KpiRef("response_time_p95", "response_time_p95"), Number(5000.0))
await node.run(source, now, seen)          # Evaluation(value, active); `seen` collects every value read
resolve_kpi("memory_usage")                # "memory_percent"; unknown names raise ConditionError
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, NamedTuple, Protocol

from iros.core.timefmt import format_duration
from iros.metrics import kpi
from iros.metrics.catalog import METRICS
from iros.metrics.sketch import Sketch

LIVE_WINDOW_SECONDS = 300.0  # the collector's in-memory window (collector.LIVE_WINDOW_SECONDS)
MAX_WINDOW_SECONDS = 30 * 86400.0
MAX_CONDITION_CHARS = 1000
DEFAULT_KPI_WINDOW = 60.0

Match = tuple[tuple[str, str | tuple[str, ...]], ...]


class ConditionError(ValueError):
    """A condition that cannot be used; the message says what is wrong and, if it can, what was meant."""

    def __init__(self, message: str, column: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.column = column


# --- what may be named -------------------------------------------------------------------------------

# Names the seed and people use for KPIs the report spells otherwise.
KPI_ALIASES = {
    **kpi.TARGET_ALIASES,
    "response_time": "response_time_avg",
    "cpu_usage": "cpu_usage_avg",
    "memory_usage": "memory_percent",
    "gpu_usage": "gpu_utilization",
    "disk_usage": "disk_usage_percent",
    "throughput": "throughput_rps",
    "ttft": "ttft_avg_ms",
}
_SYSTEM_KPIS = (
    "cpu_percent",
    "memory_percent",
    "gpu_utilization",
    "disk_usage_percent",
    "process_cpu_percent",
    "process_memory_bytes",
    "network_rx_bytes_per_second",
    "network_tx_bytes_per_second",
    "active_connections",
    "queue_length",
    # The semantic cache's verified false-hit rate (Wilson upper end) and its bound δ: Monitor.extra_kpis.
    "cache_false_hit_rate_upper",
    "cache_max_false_hit_rate",
)
# Event series for rate() and count(): one catalog series with fixed label filters.
EVENTS: dict[str, tuple[str, Match]] = {
    "requests": ("response_time_ms", ()),
    "errors": ("response_time_ms", (("outcome", ("server_error", "client_error")),)),
    "server_errors": ("response_time_ms", (("outcome", "server_error"),)),
    "client_errors": ("response_time_ms", (("outcome", "client_error"),)),
    "cache_hits": ("response_time_ms", (("cache", ("hit", "exact_hit", "semantic_hit")),)),
    "cache_misses": ("response_time_ms", (("cache", "miss"),)),
}
FUNCTIONS = ("avg", "min", "max", "sum", "count", "rate", "p50", "p75", "p90", "p95", "p99", "p999")
_PERCENTILE = re.compile(r"^p(\d{2,3})$")


@cache
def kpi_names() -> tuple[str, ...]:
    """Every numeric KPI a bare name may read (the live report's flat keys), aliases not included."""
    empty: kpi.Sketches = {}
    names = [
        *kpi.response_kpis(empty, 60.0),
        *kpi.experience_kpis(empty, None),
        *kpi.business_kpis(empty, 60.0),
        *_SYSTEM_KPIS,
    ]
    return tuple(dict.fromkeys(names))


def series_names() -> tuple[str, ...]:
    return (*METRICS, *EVENTS)


def resolve_kpi(name: str) -> str:
    name = KPI_ALIASES.get(name, name)
    if name in kpi_names():
        return name
    raise ConditionError(
        unknown_name(
            "KPI",
            name,
            [*kpi_names(), *KPI_ALIASES],
            "use a function such as avg(metric, 5m) to read a metric series",
        )
    )


def resolve_series(name: str) -> str:
    if name in METRICS or name in EVENTS:
        return name
    for suffix in ("_ms", "_percent", "_bytes", "_per_second"):
        if name + suffix in METRICS:
            return name + suffix
    raise ConditionError(unknown_name("metric series", name, list(series_names()), None))


def unknown_name(kind: str, name: str, known: list[str], hint: str | None) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    meant = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    tail = f"; {hint}" if hint else ""
    return f"unknown {kind} {name!r}{meant}; known: {', '.join(known)}{tail}"


def quantile_of(func: str) -> float | None:
    m = _PERCENTILE.match(func)
    if not m:
        return None
    digits = m.group(1)
    return int(digits) / 10.0 ** len(digits)


# --- the tree --------------------------------------------------------------------------------------


class Source(Protocol):
    """What conditions read: the live KPI report and window statistics of one series."""

    def kpis(self, now: float) -> Mapping[str, Any]:
        """The flat KPI report over the source's default window ending at `now`."""
        ...

    async def stats(self, metric: str, match: Match, seconds: float, now: float) -> Stats:
        """Statistics of the catalog series `metric` (labels matching `match`) over [now - seconds, now]."""
        ...


@dataclass(slots=True)
class Stats:
    count: int = 0
    sum: float = 0.0
    min: float | None = None
    max: float | None = None
    quantile: Callable[[float], float | None] = field(default=lambda q: None)

    @classmethod
    def of(cls, sketch: Sketch) -> Stats:
        if not sketch.count:
            return cls()
        return cls(sketch.count, sketch.sum, sketch.min, sketch.max, sketch.quantile)


class Operand(Protocol):
    """A value in a condition: a number, a KPI, a window function or arithmetic on them."""

    def text(self) -> str: ...

    async def value_of(self, source: Source, now: float) -> float | None: ...


class Test(Protocol):
    """A true/false part of a condition: a comparison, and/or, not."""

    def text(self) -> str: ...

    async def run(self, source: Source, now: float, seen: dict[str, float | None]) -> Evaluation: ...

    def relaxed(self, fraction: float) -> Test: ...


@dataclass(frozen=True, slots=True)
class Number:
    value: float

    def text(self) -> str:
        return f"{self.value:g}"

    async def value_of(self, source: Source, now: float) -> float | None:
        return self.value


@dataclass(frozen=True, slots=True)
class KpiRef:
    name: str  # resolved
    written: str

    def text(self) -> str:
        return self.written

    async def value_of(self, source: Source, now: float) -> float | None:
        value: Any = source.kpis(now).get(self.name)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class WindowRef:
    func: str
    series: str  # resolved: a catalog metric or an event series
    written: str
    match: Match
    seconds: float

    def text(self) -> str:
        labels = ""
        if self.match:
            labels = "{" + ", ".join(f'{k}="{v}"' for k, v in self.match) + "}"
        return f"{self.func}({self.written}{labels}, {format_duration(self.seconds)})"

    def query(self) -> tuple[str, Match]:
        """The catalog metric and label filters this reads."""
        metric, fixed = EVENTS.get(self.series, (self.series, ()))
        given = dict(self.match)
        if metric == "response_time_ms" and self.series not in EVENTS and "outcome" not in given:
            given["outcome"] = "ok"  # as the response_time_* KPIs: failures are not response times
        return metric, tuple(sorted({**dict(fixed), **given}.items()))

    async def value_of(self, source: Source, now: float) -> float | None:
        metric, match = self.query()
        s = await source.stats(metric, match, self.seconds, now)
        f = self.func
        if f == "rate":
            return s.count / self.seconds
        if f == "count":
            return float(s.count)
        if not s.count:
            return None
        if f == "avg":
            return s.sum / s.count
        if f == "sum":
            return s.sum
        if f == "min":
            return s.min
        if f == "max":
            return s.max
        q = quantile_of(f)
        assert q is not None
        return s.quantile(q)


@dataclass(frozen=True, slots=True)
class Arith:
    op: str
    left: Operand
    right: Operand

    def text(self) -> str:
        return f"({self.left.text()} {self.op} {self.right.text()})"

    async def value_of(self, source: Source, now: float) -> float | None:
        a = await self.left.value_of(source, now)
        b = await self.right.value_of(source, now)
        if a is None or b is None:
            return None
        if self.op == "+":
            return a + b
        if self.op == "-":
            return a - b
        if self.op == "*":
            return a * b
        return a / b if b else None


_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


class Evaluation(NamedTuple):
    value: float | None  # the observed value that decided (the left side of the deciding comparison)
    active: bool


@dataclass(frozen=True, slots=True)
class Compare:
    op: str
    left: Operand
    right: Operand

    def text(self) -> str:
        return f"{self.left.text()} {self.op} {self.right.text()}"

    async def run(self, source: Source, now: float, seen: dict[str, float | None]) -> Evaluation:
        a = await self.left.value_of(source, now)
        b = await self.right.value_of(source, now)
        seen[self.left.text()] = a
        if not isinstance(self.right, Number):
            seen[self.right.text()] = b
        if a is None or b is None:
            return Evaluation(a, False)
        return Evaluation(a, _COMPARE[self.op](a, b))

    def relaxed(self, fraction: float) -> Compare:
        """The same test with its threshold moved `fraction` towards clearing (hysteresis)."""
        if not isinstance(self.right, Number) or self.op in ("==", "!="):
            return self
        margin = abs(self.right.value) * fraction
        shift = -margin if self.op in (">", ">=") else margin
        return Compare(self.op, self.left, Number(self.right.value + shift))


@dataclass(frozen=True, slots=True)
class Logic:
    op: str  # "and" | "or"
    items: tuple[Test, ...]

    def text(self) -> str:
        return f" {self.op} ".join(f"({i.text()})" if isinstance(i, Logic) else i.text() for i in self.items)

    async def run(self, source: Source, now: float, seen: dict[str, float | None]) -> Evaluation:
        results = [await item.run(source, now, seen) for item in self.items]
        want = self.op == "or"
        # The deciding term: the first true one for "or", the first false one for "and".
        for r in results:
            if r.active == want:
                return r
        return results[0] if not want else Evaluation(results[0].value, False)

    def relaxed(self, fraction: float) -> Logic:
        return Logic(self.op, tuple(i.relaxed(fraction) for i in self.items))


@dataclass(frozen=True, slots=True)
class Not:
    item: Test

    def text(self) -> str:
        return f"not ({self.item.text()})"

    async def run(self, source: Source, now: float, seen: dict[str, float | None]) -> Evaluation:
        r = await self.item.run(source, now, seen)
        return Evaluation(r.value, not r.active)

    def relaxed(self, fraction: float) -> Not:
        return self  # relaxing under a negation would tighten: leave it
