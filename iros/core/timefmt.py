"""Durations and times, read and written one way everywhere: config, conditions, query parameters, reports.

parse_duration("1.5h")                 # 5400.0; also 500ms, 30s, 5m, 1d, 1w or a number of seconds
format_duration(120)                   # "2m", the shortest exact form
parse_time("2024-01-01")               # 1704067200.0: ISO dates (midnight UTC), ISO datetimes, unix seconds
iso(1704067200)                        # "2024-01-01T00:00:00+00:00"
RANGES["1m"]                           # the dashboard's named ranges, where 1m is a month (30 days)

A bad value raises DurationError or TimeError (both ValueError) with a message that says what to write;
each caller turns it into its own kind of error (a 400 naming the parameter, a ConditionError, a config
field's error).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, date, datetime

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)(ms|s|m|h|d|w)?\s*$")

# Named ranges of the dashboard's range selector and its panels; not durations: here 1m is a month.
RANGES = {
    "1h": 3600.0,
    "1d": 86400.0,
    "24h": 86400.0,
    "1w": 7 * 86400.0,
    "7d": 7 * 86400.0,
    "1m": 30 * 86400.0,
}


class DurationError(ValueError):
    pass


class TimeError(ValueError):
    pass


def parse_duration(text: str | float | int, what: str = "duration") -> float:
    """'500ms' | '30s' | '5m' | '1.5h' | '1d' | '1w' | a number of seconds (0 or more) -> seconds."""
    if isinstance(text, bool):
        raise DurationError(f"{what} {text!r} is not a duration: use 30s, 5m, 1h, 1d or seconds")
    if isinstance(text, int | float):
        if text < 0 or not math.isfinite(text):
            raise DurationError(f"{what} must be 0 or more seconds, not {text}")
        return float(text)
    match = _DURATION.match(str(text))
    if not match:
        raise DurationError(f"{what} {text!r} is not a duration: use 30s, 5m, 1h, 1d or seconds")
    return float(match.group(1)) * UNITS[match.group(2) or "s"]


def format_duration(seconds: float, largest: str = "w") -> str:
    """The shortest exact form in units up to `largest`: 120 -> '2m', 90 -> '90s', 1.5 -> '1500ms';
    format_duration(120, largest="s") -> '120s' (PromQL steps)."""
    units = ("w", "d", "h", "m", "s")
    for unit in units[units.index(largest) :]:
        size = UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    # Whole milliseconds otherwise: every reader of durations (PromQL included) takes them.
    return f"{round(seconds * 1000)}ms"


def parse_time(text: str) -> float:
    """ISO dates (midnight UTC), ISO datetimes (UTC unless they say otherwise) or unix seconds."""
    given, text = text, text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            return datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise TimeError(
            f"{given!r} is not a date: use 2024-01-01, 2024-01-01T10:00:00Z or unix seconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def iso(ts: float) -> str:
    """Unix seconds as an ISO 8601 UTC time: 2024-01-01T00:00:00+00:00."""
    return datetime.fromtimestamp(ts, UTC).isoformat()


def iso_or_none(ts: float | None) -> str | None:
    return None if ts is None else iso(ts)


def iso_date(ts: float) -> str:
    """The UTC day of unix seconds: 2024-01-01."""
    return datetime.fromtimestamp(ts, UTC).date().isoformat()
