"""`iros bench state` runs its replicas on a real redis-server and reports each change's propagation."""

from __future__ import annotations

import pytest

from iros.bench.state import run_state

pytestmark = pytest.mark.e2e


def test_state_bench_reports_every_apply_of_every_change() -> None:
    """One replica of two workers, three changes: the other worker applied each, and the percentiles
    are numbers in milliseconds."""
    result = run_state(changes=3, replicas=1, workers=2, spacing=0.3)
    assert result["applies"] == result["applies_expected"] == 3
    ms = result["propagation_ms"]
    assert 0 < ms["p50"] <= ms["p99"] <= ms["max"] < 5000
