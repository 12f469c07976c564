"""Durations and times: one grammar for config, conditions and query parameters, one way to print them."""

from __future__ import annotations

import pytest

from iros.core.timefmt import (
    RANGES,
    DurationError,
    TimeError,
    format_duration,
    iso,
    iso_date,
    parse_duration,
    parse_time,
)


def test_durations_round_trip() -> None:
    """Durations parse from every unit and format back to their shortest exact form."""
    assert [parse_duration(t) for t in ("500ms", "30s", "2m", "1.5h", "1d", "1w", 7)] == [
        0.5,
        30,
        120,
        5400,
        86400,
        604800,
        7,
    ]
    assert [format_duration(s) for s in (0.5, 30, 120, 5400, 86400)] == [
        "500ms",
        "30s",
        "2m",
        "90m",
        "1d",
    ]
    with pytest.raises(DurationError):
        parse_duration("5 minutes")


def test_a_duration_is_a_finite_number_of_seconds_or_a_unit() -> None:
    """A bare number (or numeral) is seconds, 0 or more; booleans, negatives and other units are refused."""
    assert parse_duration("5") == parse_duration(5) == 5.0
    for bad in (-1, float("inf"), True, "", "-5s", "1y"):
        with pytest.raises(DurationError):
            parse_duration(bad)


def test_every_printed_duration_reads_back() -> None:
    """What format_duration writes, parse_duration reads as the same seconds, also past whole units."""
    for seconds in (0.001, 0.25, 1, 1.5, 59, 61, 90, 3600, 5400, 86400 * 3, 604800 * 2):
        assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)
    assert format_duration(120, largest="s") == "120s"  # PromQL steps
    assert format_duration(1.5) == "1500ms"


def test_times_read_dates_datetimes_and_unix_seconds() -> None:
    """A date is its midnight UTC; a datetime without a zone is UTC; a number is unix seconds."""
    assert parse_time("2024-01-01") == 1704067200.0
    assert parse_time("2024-01-01T10:00:00Z") == 1704067200.0 + 36000
    assert parse_time("2024-01-01T10:00:00") == 1704067200.0 + 36000
    assert parse_time("2024-01-01T11:00:00+01:00") == 1704067200.0 + 36000
    assert parse_time(" 1704067200 ") == 1704067200.0
    with pytest.raises(TimeError, match="is not a date"):
        parse_time("yesterday")


def test_times_print_as_iso_8601_utc() -> None:
    """One format everywhere (metrics, alerts, reports): the offset is spelled +00:00."""
    assert iso(1704067200) == "2024-01-01T00:00:00+00:00"
    assert parse_time(iso(1704067200.5)) == 1704067200.5
    assert iso_date(1704067200 + 86399) == "2024-01-01"


def test_named_ranges_are_not_durations() -> None:
    """The dashboard's 1m is a month; as a duration 1m is a minute."""
    assert RANGES["1m"] == 30 * 86400 and parse_duration("1m") == 60
