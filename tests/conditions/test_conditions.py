"""The condition language: parsing, validation messages, and evaluation against live frames and the
metrics store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from iros.conditions.parse import (
    ConditionError,
    Hold,
    LiveSource,
    StaticSource,
    parse_condition,
)
from iros.metrics.collector import Frame
from iros.metrics.sketch import Sketch
from iros.metrics.store import Samples, SeriesKey
from iros.metrics.tsdb.db import SQLiteStore

NOW = 1_800_000_000.0


def rt(outcome: str = "ok", cache: str = "miss", model: str = "alpha") -> SeriesKey:
    return ("response_time_ms", (("cache", cache), ("model", model), ("outcome", outcome)))


def frames(*seconds: tuple[float, dict[SeriesKey, list[float]]]) -> list[Frame]:
    return [Frame(at, {k: Sketch.of(v) for k, v in series.items()}) for at, series in seconds]


class TestParsing:
    @pytest.mark.parametrize(
        ("text", "names", "for_seconds"),
        [
            ("response_time_p95 > 5000", ["response_time_p95"], 0),
            ("cache_hit_rate < 0.5", ["cache_hit_rate"], 0),
            ("avg(response_time, 5m) > 3000", ["response_time_ms"], 0),
            ("p99(ttft, 10m) > 800", ["ttft_ms"], 0),
            ("rate(errors, 5m) > 0.1", ["response_time_ms"], 0),
            ("cpu_usage > 7.0 for 5m", ["cpu_usage_avg"], 300),
            ("memory_usage > 90", ["memory_percent"], 0),
            (
                "response_time_avg > 3000 and (error_rate > 0.05 or cache_hit_rate < 0.3) for 90s",
                ["response_time_avg", "error_rate", "cache_hit_rate"],
                90,
            ),
        ],
    )
    def test_seed_and_issue_examples_parse(self, text: str, names: list[str], for_seconds: float) -> None:
        """Every example of the seed and the issue parses, names what it reads and keeps its `for`."""
        cond = parse_condition(text)
        assert cond.names == names
        assert cond.for_seconds == for_seconds
        # The canonical text is itself a condition that means the same.
        assert parse_condition(cond.canonical()).canonical() == cond.canonical()

    @pytest.mark.parametrize(
        ("text", "says"),
        [
            ("response_tme_p95 > 5000", "did you mean 'response_time_p95'"),
            ("avg(respons_time, 5m) > 1", "did you mean 'response_time_ms'"),
            ("avgg(response_time, 5m) > 1", "did you mean 'avg'"),
            ('avg(response_time{modle="a"}, 5m) > 1', "has no label 'modle'"),
            ("avg(errors, 5m) > 1", "use rate(errors"),
            ("response_time_p95", "is a value, not a condition"),
            ("response_time_p95 >", "ends too early"),
            ("response_time_p95 > 5000 and", "ends too early"),
            ("response_time_p95 >> 5000", "column"),
            ("response_time_p95 > 5000; drop table", "unexpected ';'"),
            ("__import__('os') > 1", "unexpected"),
            ("avg(response_time, 0s) > 1", "must be above 0"),
            ("", "empty"),
        ],
    )
    def test_bad_conditions_say_what_is_wrong(self, text: str, says: str) -> None:
        """A bad condition raises ConditionError whose message points at the mistake."""
        with pytest.raises(ConditionError) as err:
            parse_condition(text)
        assert says in err.value.message

    def test_unknown_names_list_the_known_ones(self) -> None:
        """An unknown KPI's message lists the KPIs that exist."""
        with pytest.raises(ConditionError) as err:
            parse_condition("nonsense > 1")
        assert "known:" in err.value.message and "cache_hit_rate" in err.value.message

    def test_for_may_be_refused(self) -> None:
        """Alert rules give their duration separately, so they may refuse a trailing for."""
        with pytest.raises(ConditionError, match="duration"):
            parse_condition("error_rate > 0.1 for 5m", allow_for=False)


class TestEvaluation:
    async def test_comparisons_read_kpis(self) -> None:
        """A bare KPI is compared with its threshold, and the observed value comes back."""
        source = StaticSource({"response_time_p95": 5200.0, "cache_hit_rate": 0.8})
        assert await parse_condition("response_time_p95 > 5000").evaluate(source, NOW) == (5200.0, True)
        assert await parse_condition("cache_hit_rate < 0.5").evaluate(source, NOW) == (0.8, False)

    async def test_missing_data_never_fires(self) -> None:
        """A KPI with no data makes its comparison false, whatever the operator."""
        source = StaticSource({"response_time_p95": None})
        for op in (">", "<", "==", "!="):
            value, active = await parse_condition(f"response_time_p95 {op} 1").evaluate(source, NOW)
            assert (value, active) == (None, False)

    async def test_and_or_report_the_deciding_value(self) -> None:
        """`and` reports its first false term, `or` its first true one."""
        source = StaticSource({"error_rate": 0.2, "cache_hit_rate": 0.9})
        both = parse_condition("error_rate > 0.1 and cache_hit_rate < 0.5")
        either = parse_condition("error_rate > 0.5 or cache_hit_rate > 0.5")
        assert await both.evaluate(source, NOW) == (0.9, False)
        assert await either.evaluate(source, NOW) == (0.9, True)
        assert await both.values(source, NOW) == {"error_rate": 0.2, "cache_hit_rate": 0.9}

    async def test_window_functions_read_the_live_frames(self) -> None:
        """avg, p99, max, count and rate over a window merge exactly the frames inside it."""
        source = LiveSource(
            lambda: frames(
                (NOW - 200, {rt(): [9000.0] * 10}),  # outside a 2m window
                (NOW - 60, {rt(): [100.0, 200.0, 300.0], rt("server_error"): [5.0, 5.0]}),
                (NOW - 10, {rt(): [400.0], rt(cache="exact_hit"): [1.0]}),
                (NOW + 5, {rt(): [7777.0]}),  # after `now`: not seen yet
            )
        )
        assert (
            await parse_condition("avg(response_time, 2m) > 0").evaluate(source, NOW)
        ).value == pytest.approx((100 + 200 + 300 + 400 + 1) / 5)
        assert (await parse_condition("max(response_time, 2m) > 0").evaluate(source, NOW)).value == 400.0
        assert (await parse_condition("max(response_time, 5m) > 0").evaluate(source, NOW)).value == 9000.0
        assert (await parse_condition("count(errors, 2m) > 0").evaluate(source, NOW)).value == 2
        rate = (await parse_condition("rate(requests, 2m) > 0").evaluate(source, NOW)).value
        assert rate == pytest.approx(7 / 120)
        median = parse_condition('p50(response_time{model="alpha"}, 2m) > 0')
        assert (await median.evaluate(source, NOW)).value == pytest.approx(200.0, rel=0.01)
        ratio = parse_condition("rate(errors, 2m) / rate(requests, 2m) > 0.25")
        assert await ratio.evaluate(source, NOW) == (pytest.approx(2 / 7), True)

    async def test_bare_kpis_use_the_default_window(self) -> None:
        """Bare KPIs are the live report over the source's window, computed by iros.kpi."""
        data = frames(
            (NOW - 100, {rt(): [5000.0] * 4}),
            (NOW - 20, {rt(): [1000.0, 3000.0], rt(cache="exact_hit"): [2000.0]}),
        )
        source = LiveSource(lambda: data, kpi_window=30)
        assert (await parse_condition("response_time_avg > 0").evaluate(source, NOW)).value == 2000.0
        assert (await parse_condition("cache_hit_rate > 0").evaluate(source, NOW)).value == pytest.approx(
            1 / 3, abs=1e-4
        )
        wide = LiveSource(lambda: data, kpi_window=300)
        assert (await parse_condition("response_time_avg > 0").evaluate(wide, NOW)).value == pytest.approx(
            26000 / 7
        )

    async def test_long_windows_read_the_metrics_store(self, tmp_path: Path) -> None:
        """Windows beyond the live five minutes come from the SQLite store's history."""
        store = SQLiteStore(tmp_path / "m.db")
        await store.start()
        rng = np.random.default_rng(7)
        ts = NOW - rng.uniform(0, 3600, 4000)
        values = rng.lognormal(5, 0.5, 4000)
        store.append({rt(): Samples(ts, values)})
        await store.flush()
        source = LiveSource(lambda: [], store=store)
        try:
            avg = (await parse_condition("avg(response_time, 30m) > 0").evaluate(source, NOW)).value
            inside = values[ts >= NOW - 1800]
            assert avg == pytest.approx(inside.mean(), rel=1e-6)
            p95 = (await parse_condition("p95(response_time, 1h) > 0").evaluate(source, NOW)).value
            assert p95 == pytest.approx(np.quantile(values, 0.95), rel=0.05)
            count = (await parse_condition("count(requests, 1h) > 0").evaluate(source, NOW)).value
            assert count == 4000
        finally:
            await store.close()

    async def test_relaxed_conditions_clear_later(self) -> None:
        """Hysteresis: a relaxed condition stays true a margin past the threshold, in either direction."""
        high = parse_condition("response_time_avg > 1000").relaxed(0.1)
        low = parse_condition("cache_hit_rate < 0.5").relaxed(0.1)
        assert (await high.evaluate(StaticSource({"response_time_avg": 950}), NOW)).active
        assert not (await high.evaluate(StaticSource({"response_time_avg": 850}), NOW)).active
        assert (await low.evaluate(StaticSource({"cache_hit_rate": 0.52}), NOW)).active
        assert not (await low.evaluate(StaticSource({"cache_hit_rate": 0.6}), NOW)).active


def test_hold_needs_the_condition_for_its_whole_duration() -> None:
    """Hold is Prometheus's `for`: any false evaluation starts the wait again."""
    hold = Hold(60)
    assert [
        hold.update(a, t)
        for a, t in [(True, 0), (True, 30), (False, 45), (True, 50), (True, 100), (True, 110)]
    ] == [False, False, False, False, False, True]
