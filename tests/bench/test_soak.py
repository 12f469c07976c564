"""`iros bench soak`: the judgement of a run, and a short real run through the whole pipeline."""

from __future__ import annotations

import pytest

from iros.bench.processes import BenchError
from iros.bench.soak import Window, questions, run_soak, summarize


def _window(at: float, rss: float, latencies: list[float], errors: int = 0) -> Window:
    return Window(at, rss, requests=len(latencies) + errors, errors=errors, latencies_ms=latencies)


def test_memory_growth_is_measured_from_the_end_of_the_warmup() -> None:
    """Growth while caches fill (the warm-up) is not held against the run; growth after it is."""
    windows = [
        _window(0, 100, [1.0]),
        _window(10, 200, [1.0]),
        _window(20, 210, [1.0]),
        _window(30, 205, [1]),
    ]
    result = summarize(windows, warmup=10)
    assert result["rss_mb"] == {"after_warmup": 200, "peak": 210}
    assert result["memory_growth_pct"] == 5.0


def test_p99_drift_compares_the_last_quarter_with_the_first() -> None:
    """A P99 that doubles between the first and last quarter of the run shows a drift ratio of 2."""
    fast, slow = [10.0] * 100, [20.0] * 100
    windows = [_window(i, 100, fast if i < 4 else slow) for i in range(8)]
    result = summarize(windows, warmup=0)
    assert result["p99_drift_ratio"] == 2.0
    assert result["errors"] == 0 and result["requests"] == 800


def test_failed_requests_count_as_errors() -> None:
    """Errors are summed over every window, warm-up included: a failed request is never forgiven."""
    windows = [_window(0, 100, [1.0], errors=2), _window(5, 100, [1.0], errors=1)]
    result = summarize(windows, warmup=5)
    assert result["errors"] == 3
    assert result["error_rate"] == 0.6


def test_the_workload_repeats_popular_questions_and_adds_one_offs() -> None:
    """The prompts mix repeats (cache hits to be had) with questions asked once."""
    ask = questions(seed=1)
    prompts = [ask() for _ in range(400)]
    assert len(set(prompts)) < len(prompts) * 0.6
    assert sum(p.startswith("Question ") for p in prompts) > 40


def test_bad_arguments_are_refused_with_a_message() -> None:
    """A warm-up as long as the run is refused before anything starts."""
    with pytest.raises(BenchError, match="--warmup"):
        run_soak(5, warmup=5, progress=False)


@pytest.mark.e2e
def test_a_short_soak_serves_everything_and_reports_each_window() -> None:
    """A short run through the real pipeline serves every request and samples memory each interval."""
    result = run_soak(8, rate=10, interval=1, warmup=2, progress=False)
    assert result["requests"] >= 50
    assert result["errors"] == 0
    assert len(result["windows"]) >= 7
    assert all(w["rss_mb"] > 50 for w in result["windows"])
    assert result["met"]["errors"] is True
    assert result["cache_max_entries"] == 100  # the floor: 2 s of warm-up fill far fewer entries
