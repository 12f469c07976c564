"""The condition language of alert rules and optimization triggers: comparisons over KPIs and metrics.

    cond = parse_condition("avg(response_time, 5m) > 3000 and cache_hit_rate < 0.5 for 2m")
    cond.for_seconds                      # 120.0: how long it must hold (Prometheus's `for`)
    cond.names                            # ["response_time_ms", "cache_hit_rate"]: what it reads
    source = LiveSource.of(monitor)       # live window + metrics store; StaticSource(kpis) in tests
    value, active = await cond.evaluate(source, time.time())
    await cond.values(source, now)        # {"avg(response_time, 5m)": 3120.5, "cache_hit_rate": 0.41}
    hold = Hold(cond.for_seconds)         # `for` on its own: hold.update(active, now) -> held long enough

Grammar (case-sensitive, keywords lower case):

    condition  := expr [ "for" DURATION ]
    expr       := expr "or" expr | expr "and" expr | "not" expr | "(" expr ")" | sum CMP sum
    sum        := sum ("+"|"-") product | product;  product := product ("*"|"/") atom | atom
    atom       := NUMBER | KPI | FUNC "(" SERIES ["{" label="value", ... "}"] "," DURATION ")" | "(" sum ")"
    CMP        := > >= < <= == !=          DURATION := 500ms | 30s | 5m | 1.5h | 1d | 1w

A bare KPI (`response_time_p95`, `cache_hit_rate`, `error_rate`, `memory_usage`, ...) is read from
the live KPI report over the source's default window (60 s unless configured). A function reads one
catalog series over the window it names: `avg`, `min`, `max`, `sum`, `count`, `rate` (events per
second), and percentiles `p50`, `p90`, `p95`, `p99`, `p999`. Besides the catalog's series (by name, with
or without the unit suffix: `response_time`, `ttft`, `cpu_usage`) there are event series for `rate`
and `count`: `requests`, `errors`, `server_errors`, `cache_hits`, `cache_misses`. `response_time`
counts successful responses unless an `outcome` label is given, as the response_time_* KPIs do.
Windows up to five minutes come from the in-memory live window; longer ones from the metrics store.
A comparison with no data is false: silence never fires an alert.

Parsed with a lark LALR grammar into a small tree (its node types live in tree.py and are
re-exported here); nothing is ever passed to eval.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from iros.conditions.sources import LiveSource, StaticSource
from iros.conditions.tree import (
    DEFAULT_KPI_WINDOW,
    EVENTS,
    FUNCTIONS,
    KPI_ALIASES,
    MAX_CONDITION_CHARS,
    MAX_WINDOW_SECONDS,
    Arith,
    Compare,
    ConditionError,
    Evaluation,
    KpiRef,
    Logic,
    Match,
    Not,
    Number,
    Operand,
    Source,
    Stats,
    Test,
    WindowRef,
    kpi_names,
    quantile_of,
    resolve_kpi,
    resolve_series,
    series_names,
    unknown_name,
)
from iros.core.limits import MAX_NESTING, paren_depth
from iros.core.timefmt import format_duration, parse_duration
from iros.metrics.catalog import METRICS

__all__ = [
    "DEFAULT_KPI_WINDOW",
    "EVENTS",
    "FUNCTIONS",
    "KPI_ALIASES",
    "Arith",
    "Compare",
    "Condition",
    "ConditionError",
    "Evaluation",
    "Hold",
    "KpiRef",
    "LiveSource",
    "Logic",
    "Match",
    "Not",
    "Number",
    "Operand",
    "Source",
    "StaticSource",
    "Stats",
    "Test",
    "WindowRef",
    "kpi_names",
    "parse_condition",
    "resolve_kpi",
    "resolve_series",
    "series_names",
]

# --- the grammar -----------------------------------------------------------------------------------

_GRAMMAR = r"""
condition: expr ["for" DURATION]
?expr: or_
?or_: and_ ("or" and_)*                  -> either
?and_: not_ ("and" not_)*                -> both
?not_: "not" not_                        -> negate
     | comparison
     | "(" expr ")"
comparison: sum CMP sum
?sum: product | sum ADDOP product        -> arith
?product: atom | product MULOP atom      -> arith
?atom: NUMBER                            -> number
     | "-" atom                          -> neg
     | NAME                              -> kpi
     | NAME "(" NAME [matchers] "," DURATION ")" -> window
     | "(" sum ")"
matchers: "{" [matcher ("," matcher)*] "}"
matcher: NAME "=" STRING
CMP: ">=" | "<=" | "==" | "!=" | ">" | "<"
ADDOP: "+" | "-"
MULOP: "*" | "/"
DURATION: /\d+(\.\d+)?(ms|s|m|h|d|w)/
NUMBER: /\d+(\.\d+)?([eE][-+]?\d+)?/ | /\.\d+/
NAME: /[A-Za-z_][A-Za-z0-9_]*/
STRING: /"[^"\\]{0,200}"/ | /'[^'\\]{0,200}'/
%ignore /\s+/
"""


@cache
def _parser() -> Lark:
    return Lark(_GRAMMAR, start="condition", parser="lalr", maybe_placeholders=True)


@v_args(inline=True)
class _Build(Transformer[Token, Any]):
    def condition(self, expr: Any, duration: Token | None = None) -> tuple[Any, float]:
        if not isinstance(expr, Compare | Logic | Not):
            raise ConditionError(
                f"{expr.text()!r} is a value, not a condition: compare it, e.g. {expr.text()} > 100"
            )
        return expr, parse_duration(str(duration)) if duration is not None else 0.0

    def either(self, *items: Any) -> Any:
        return items[0] if len(items) == 1 else Logic("or", tuple(_flat("or", items)))

    def both(self, *items: Any) -> Any:
        return items[0] if len(items) == 1 else Logic("and", tuple(_flat("and", items)))

    def negate(self, item: Any) -> Not:
        return Not(_as_test(item))

    def comparison(self, left: Any, op: Token, right: Any) -> Compare:
        for side in (left, right):
            if isinstance(side, Compare | Logic | Not):
                raise ConditionError(f"cannot compare a condition ({side.text()}) with a value")
        if isinstance(left, Number) and not isinstance(right, Number):
            # "5000 < response_time_p95" reads the same as "response_time_p95 > 5000".
            flipped = {">": "<", "<": ">", ">=": "<=", "<=": ">=", "==": "==", "!=": "!="}
            return Compare(flipped[str(op)], right, left)
        return Compare(str(op), left, right)

    def arith(self, left: Any, op: Token, right: Any) -> Any:
        if isinstance(left, Number) and isinstance(right, Number):
            value = Arith(str(op), left, right)
            folded = {
                "+": left.value + right.value,
                "-": left.value - right.value,
                "*": left.value * right.value,
            }
            if str(op) in folded:
                return Number(folded[str(op)])
            return value
        return Arith(str(op), left, right)

    def number(self, token: Token) -> Number:
        return Number(float(token))

    def neg(self, item: Any) -> Any:
        if isinstance(item, Number):
            return Number(-item.value)
        return Arith("-", Number(0.0), item)

    def kpi(self, name: Token) -> KpiRef:
        known = str(name) in kpi_names() or str(name) in KPI_ALIASES
        if not known and (str(name) in FUNCTIONS or quantile_of(str(name)) is not None):
            raise ConditionError(f"{name}() needs a metric and a window, e.g. {name}(response_time, 5m)")
        return KpiRef(resolve_kpi(str(name)), str(name))

    def window(self, func: Token, series: Token, matchers: Any, duration: Token) -> WindowRef:
        f = str(func)
        if f not in FUNCTIONS and quantile_of(f) is None:
            raise ConditionError(unknown_name("function", f, list(FUNCTIONS), "pNN is any percentile"))
        if f == "p100" or (quantile_of(f) or 0) >= 1:
            raise ConditionError(f"{f} is not a percentile below 100: use max({series}, ...)")
        resolved = resolve_series(str(series))
        seconds = parse_duration(str(duration))
        if seconds <= 0 or seconds > MAX_WINDOW_SECONDS:
            raise ConditionError(f"window {duration} must be above 0 and at most 30d")
        match: Match = tuple(matchers or ())
        metric = EVENTS.get(resolved, (resolved, ()))[0]
        allowed = METRICS[metric].labels
        for label, _ in match:
            if label not in allowed:
                raise ConditionError(
                    f"{series} has no label {label!r} (it has: {', '.join(allowed) or 'none'})"
                )
        if resolved in EVENTS and f not in ("rate", "count"):
            raise ConditionError(f"{series} counts events: use rate({series}, ...) or count({series}, ...)")
        return WindowRef(f, resolved, str(series), tuple(sorted(match)), seconds)

    def matchers(self, *items: Any) -> list[tuple[str, str]]:
        return [i for i in items if i is not None]

    def matcher(self, name: Token, value: Token) -> tuple[str, str]:
        return str(name), str(value)[1:-1]


def _flat(op: str, items: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        item = _as_test(item)
        out.extend(item.items if isinstance(item, Logic) and item.op == op else [item])
    return out


def _as_test(item: Any) -> Any:
    if not isinstance(item, Compare | Logic | Not):
        raise ConditionError(
            f"{item.text()!r} is a value, not a condition: compare it, e.g. {item.text()} > 1"
        )
    return item


_TOKEN_WORDS = {
    "CMP": "a comparison (> >= < <= == !=)",
    "NUMBER": "a number",
    "NAME": "a KPI or function name",
    "DURATION": "a duration such as 5m",
    "LPAR": "'('",
    "RPAR": "')'",
    "COMMA": "','",
    "FOR": "'for'",
    "AND": "'and'",
    "OR": "'or'",
    "ADDOP": "+ or -",
    "MULOP": "* or /",
    "$END": "the end",
}


def _expected(tokens: Iterable[str]) -> str:
    words = sorted({_TOKEN_WORDS.get(t, t.lower()) for t in tokens if not t.startswith("__")})
    return ", ".join(words[:6])


@dataclass(frozen=True)
class Condition:
    """A parsed condition. `for_seconds` is the trailing `for` (0 without one)."""

    text: str
    tree: Test
    for_seconds: float = 0.0

    @property
    def names(self) -> list[str]:
        """The KPIs and catalog series the condition reads (resolved names, in order)."""
        out: list[str] = []
        for ref in self.refs():
            name = ref.name if isinstance(ref, KpiRef) else ref.query()[0]
            if name not in out:
                out.append(name)
        return out

    @property
    def windows(self) -> list[float]:
        return sorted({r.seconds for r in self.refs() if isinstance(r, WindowRef)})

    def refs(self) -> list[KpiRef | WindowRef]:
        out: list[KpiRef | WindowRef] = []

        def walk(node: Any) -> None:
            if isinstance(node, KpiRef | WindowRef):
                out.append(node)
            for child in ("left", "right", "item"):
                if hasattr(node, child):
                    walk(getattr(node, child))
            for item in getattr(node, "items", ()):
                walk(item)

        walk(self.tree)
        return out

    def canonical(self) -> str:
        tail = f" for {format_duration(self.for_seconds)}" if self.for_seconds else ""
        return self.tree.text() + tail

    async def evaluate(self, source: Source, now: float) -> Evaluation:
        """(value, active) at `now`: the value is the observed side of the deciding comparison."""
        return await self.tree.run(source, now, {})

    async def values(self, source: Source, now: float) -> dict[str, float | None]:
        """Every value the condition looked at, by its text: for alert annotations and explanations."""
        seen: dict[str, float | None] = {}
        await self.tree.run(source, now, seen)
        return seen

    def relaxed(self, fraction: float) -> Condition:
        """Thresholds moved `fraction` of their size towards clearing: the test a firing alert must
        fail before it resolves (hysteresis). `x > 100` relaxed by 0.1 is `x > 90`."""
        if fraction <= 0:
            return self
        return replace(self, tree=self.tree.relaxed(fraction))


def parse_condition(text: str, allow_for: bool = True) -> Condition:
    """Parse and check a condition; raises ConditionError naming what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ConditionError("the condition is empty: write e.g. response_time_p95 > 5000")
    if len(text) > MAX_CONDITION_CHARS:
        raise ConditionError(f"the condition is {len(text)} characters long; at most {MAX_CONDITION_CHARS}")
    if (depth := paren_depth(text)) > MAX_NESTING:
        raise ConditionError(f"the condition nests parentheses {depth} deep; at most {MAX_NESTING}")
    try:
        tree = _parser().parse(text)
        expr, for_seconds = _Build().transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, ConditionError):
            raise exc.orig_exc from None
        raise
    except UnexpectedCharacters as exc:
        raise ConditionError(
            f"unexpected {text[exc.pos_in_stream or 0]!r} at column {exc.column} of {text!r}", exc.column
        ) from None
    except UnexpectedEOF as exc:
        raise ConditionError(f"{text!r} ends too early; expected {_expected(exc.expected)}") from None
    except UnexpectedToken as exc:
        if exc.token.type == "$END" and "CMP" in exc.expected:
            raise ConditionError(
                f"{text.strip()!r} is a value, not a condition: compare it, e.g. {text.strip()} > 100"
            ) from None
        if exc.token.type == "$END":
            raise ConditionError(f"{text!r} ends too early; expected {_expected(exc.expected)}") from None
        got = "the end" if exc.token.type == "$END" else repr(str(exc.token))
        raise ConditionError(
            f"unexpected {got} at column {exc.column} of {text!r}; expected {_expected(exc.expected)}",
            exc.column if isinstance(exc.column, int) else None,
        ) from None
    except UnexpectedInput as exc:  # pragma: no cover - the three above are all lark raises
        raise ConditionError(f"cannot parse {text!r}: {exc}") from None
    if for_seconds and not allow_for:
        raise ConditionError("this condition may not end in 'for ...': give the rule's duration instead")
    return Condition(text.strip(), expr, for_seconds)


class Hold:
    """Prometheus's `for`: true once the condition has been active at every evaluation for `seconds`.

    hold = Hold(300); hold.update(active, now)   # False while pending, True once held 5 minutes
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.since: float | None = None

    def update(self, active: bool, now: float) -> bool:
        if not active:
            self.since = None
            return False
        if self.since is None:
            self.since = now
        return now - self.since >= self.seconds
