"""`iros bench overhead` (real nginx, wrk and Iros processes, no mocks) and `iros bench collector`."""

from __future__ import annotations

import re
import socket
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest

from iros.bench import overhead as bench
from iros.bench import processes as bench_processes
from iros.bench.collector import run_collector_bench
from iros.bench.wrk import Phase, run_wrk, summarize, wrk_script


def _post(url: str, body: dict[str, Any]) -> tuple[int, str, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, response.headers["Content-Type"], orjson.loads(response.read())


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        result: dict[str, Any] = orjson.loads(response.read())
        return result


def _closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def nginx(tmp_path: Path) -> Any:
    child = bench_processes.start_nginx(tmp_path)
    try:
        yield child.port
    finally:
        child.stop()
    assert not child.running
    assert _closed(child.port)


@pytest.mark.e2e
def test_nginx_serves_a_valid_completion(nginx: int, tmp_path: Path) -> None:
    status, content_type, body = _post(
        f"http://127.0.0.1:{nginx}/v1/chat/completions", bench_processes.REQUEST
    )
    assert status == 200
    assert content_type.startswith("application/json")
    assert body["object"] == "chat.completion"
    assert body["model"] == "bench"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello!"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert (
        body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )

    models = _get(f"http://127.0.0.1:{nginx}/v1/models")
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["bench"]

    # Everything nginx writes stays in the temp dir.
    conf = (tmp_path / "nginx.conf").read_text()
    assert "access_log off;" in conf
    paths = re.findall(r"^\s*(?:pid|error_log|\w+_temp_path)\s+(\S+?)[;\s]", conf, re.MULTILINE)
    assert len(paths) == 7, conf
    for path in paths:
        assert path.startswith(str(tmp_path)), path


@pytest.mark.e2e
def test_wrk_errors_are_counted(nginx: int, tmp_path: Path) -> None:
    # A path nginx answers with 404: every response is an error and the report must say so.
    # 0.5 s also covers the fractional duration (wrk only takes whole seconds; we SIGINT it).
    script = tmp_path / "bench.lua"
    script.write_text(wrk_script())
    wrk, _ = bench_processes.find_tools()
    phase = Phase(None, None, None)
    raw = run_wrk(wrk, script, f"http://127.0.0.1:{nginx}/nope", 2, 0.5, tmp_path / "wrk.txt", phase, "404s")
    assert 0.4e6 < raw["duration_us"] < 0.9e6
    summary = summarize(raw)
    assert summary["requests"] > 0
    assert summary["error_kinds"]["status"] == summary["requests"]
    assert summary["errors"] >= summary["requests"]


def test_check_tools_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(bench_processes.BenchError, match="wrk") as info:
        bench_processes.check_tools()
    assert "apt-get install wrk nginx-light" in str(info.value)
    assert "./scripts/install" in str(info.value)


@pytest.mark.e2e
def test_run_overhead_shape(tmp_path: Path) -> None:
    result = bench.run_overhead([1], duration=1, warmup=0.5, progress=False, keep_dir=tmp_path)
    orjson.dumps(result)  # JSON-able

    assert result["benchmark"] == "overhead"
    assert result["duration_s"] == 1
    assert set(result["machine"]) >= {"cpus", "python", "iros_workers"}
    assert result["targets"] == {"added_p50_ms_at_c1_max": 0.5, "iros_rps_at_c64_min": 3000}
    assert isinstance(result["met"]["added_p50_at_c1"], bool)
    assert result["met"]["rps_at_c64"] is None  # c=64 not run

    [row] = result["results"]
    assert row["concurrency"] == 1
    for path in ("direct", "iros"):
        stats = row[path]
        assert set(stats) >= {"rps", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "requests", "errors"}
        assert stats["rps"] > 0, (path, stats)
        assert stats["requests"] > 0
        assert stats["errors"] == 0, (path, stats)
        assert 0 < stats["p50_ms"] <= stats["p95_ms"] <= stats["p99_ms"]
    assert set(row["added_ms"]) == {"p50", "p95", "p99"}
    assert row["throughput_ratio"] == pytest.approx(row["iros"]["rps"] / row["direct"]["rps"], abs=1e-3)

    # Both servers are gone, and their ports with them.
    iros_port = int(re.search(r"port: (\d+)", (tmp_path / "iros.yaml").read_text()).group(1))  # type: ignore[union-attr]
    nginx_port = int(re.search(r"listen 127.0.0.1:(\d+)", (tmp_path / "nginx.conf").read_text()).group(1))  # type: ignore[union-attr]
    assert _closed(iros_port)
    assert _closed(nginx_port)


@pytest.mark.e2e
def test_run_overhead_with_the_default_cache_measures_the_cache_off_path_too(tmp_path: Path) -> None:
    """--cache default: every request a new question (all misses, none served from the cache), an Iros
    with the cache off under the same load in the same run, what the cache costs, and both's memory."""
    result = bench.run_overhead([1], duration=1, warmup=0.5, progress=False, keep_dir=tmp_path, cache=True)
    assert result["cache"] == "default"
    [row] = result["results"]
    for path in ("direct", "iros", "iros_cache_off"):
        assert row[path]["requests"] > 0 and row[path]["errors"] == 0, (path, row[path])
    cost = row["cache_cost"]
    assert cost["added_p50_ms"] == pytest.approx(
        row["iros"]["p50_ms"] - row["iros_cache_off"]["p50_ms"], abs=1e-3
    )
    assert cost["throughput_ratio"] == pytest.approx(
        row["iros"]["rps"] / row["iros_cache_off"]["rps"], abs=1e-3
    )
    stats = result["cache_stats"]
    assert stats["lookups"] >= row["iros"]["requests"] and stats["misses"] > 0
    assert stats["exact_hits"] + stats["semantic_hits"] <= stats["lookups"] // 100  # distinct questions
    memory = result["memory_mb"]
    assert (
        0 < memory["iros_cache_off_after_start"] < memory["iros_after_start"]
        and memory["iros_after_load"] > 0
    )
    assert set(result["cache_met"]) == {"miss_added_p50_at_c1", "throughput_ratio_at_c64", "rss"}
    assert "cache: {enabled: false}" not in (tmp_path / "iros.yaml").read_text()
    assert "cache: {enabled: false}" in (tmp_path / "cache-off.yaml").read_text()


def test_collector_bench_reports_cpu_per_response(tmp_path: Path) -> None:
    """The collector benchmark runs real records through the real collector and store."""
    result = run_collector_bench(tmp_path, responses=3000, rate=1000)
    cpu = result["cpu_us_per_response"]
    assert cpu["ingest"] > 0 and cpu["store"] > 0
    assert cpu["total"] == pytest.approx(cpu["ingest"] + cpu["store"], abs=0.02)
    # Every answered response writes its response time and per-model series.
    assert result["samples_written"] > 3000 * 5
