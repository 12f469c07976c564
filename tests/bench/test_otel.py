"""What OpenTelemetry export costs: the in-process bench and the side-by-side overhead run."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from iros.bench import overhead as bench
from iros.bench.otel import run_otel_bench


def test_otel_bench_reports_cpu_per_request_by_part() -> None:
    """Building spans, recording instruments and OTLP encoding are each measured, and add up."""
    result = run_otel_bench(requests=200)
    assert result["spans_per_request"] == 11  # the request, 9 stages, the upstream call
    parts = ("build_us_per_request", "metrics_us_per_request", "encode_us_per_request")
    assert all(result[p] > 0 for p in parts)
    assert result["total_us_per_request"] == pytest.approx(sum(result[p] for p in parts), abs=0.2)
    assert result["otlp_bytes_per_request"] > 500


@pytest.mark.e2e
def test_overhead_with_otel_runs_an_exporting_iros_beside_the_plain_one(tmp_path: Path) -> None:
    """`--otel` adds an Iros configured only by OTEL_* whose spans reach the bench's OTLP receiver."""
    result = bench.run_overhead([1], duration=1, warmup=0.5, progress=False, keep_dir=tmp_path, otel=True)
    orjson.dumps(result)
    [row] = result["results"]
    assert row["iros_otel"]["errors"] == 0 and row["iros_otel"]["requests"] > 0
    assert set(row["otel_cost"]) >= {
        "throughput_ratio",
        "added_p50_ms",
        "added_p99_ms",
        "added_cpu_us_per_request",
    }
    assert result["otel_received"]["export_requests"]["/v1/traces"] > 0
    assert result["otel_received"]["bytes"] > 0
    # Only the --otel Iros exported: the plain one's log has no word of it.
    assert "OpenTelemetry export on" not in (tmp_path / "iros.log").read_text()
    assert "OpenTelemetry export on" in (tmp_path / "otel.log").read_text()
