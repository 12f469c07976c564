"""`iros bench overhead`: the latency Iros adds in front of an upstream that costs nothing.

nginx answers a fixed chat completion (the cheapest upstream there is), wrk drives it once directly and
once through an Iros subprocess, and the difference between the two is Iros's cost:

    result = run_overhead([1, 16, 64], duration=10)   # a JSON-able dict; see the bottom of this file

Everything runs on loopback ports in a temp dir, and every process started here is stopped in `finally`.
The processes are started by processes.py, the load comes from wrk.py.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from pathlib import Path
from typing import IO, Any

import orjson
import psutil

from iros.bench.processes import (
    BenchError,
    bench_workdir,
    find_tools,
    sigterm_as_interrupt,
    start_iros,
    start_nginx,
)
from iros.bench.wrk import Phase, run_wrk, summarize, wrk_progress, wrk_script
from iros.testing.process import ChildProcess, tail

TARGETS = {"added_p50_ms_at_c1_max": 0.5, "iros_rps_at_c64_min": 3000}


def _cpu_seconds(server: ChildProcess | None) -> float:
    """User and system CPU of a server process and its worker processes."""
    if server is None or server.proc is None:
        return 0.0
    try:
        root = psutil.Process(server.proc.pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            t = p.cpu_times()
            total += t.user + t.system
        return total
    except psutil.Error:
        return 0.0


# ----------------------------------------------------------------------------------------------- main


def run_overhead(
    concurrency: list[int],
    duration: float,
    *,
    warmup: float = 2.0,
    iros_workers: int = 1,
    progress: bool = True,
    keep_dir: Path | None = None,
    metrics_baseline: bool = False,
    ratelimit_redis: bool = False,
) -> dict[str, Any]:
    """Measure wrk against nginx directly and through Iros at each concurrency; returns the report.

    With metrics_baseline, a second Iros with metrics collection off runs the same load, and each row
    gains `metrics_cost`: what collection costs in throughput and latency, measured side by side.
    With ratelimit_redis, two more Irosen answer the same key, one without a rate limit and one whose
    limit (too high to refuse) is checked in Redis (state.backend redis, a redis-server started here),
    and each row gains `ratelimit_cost`: what the cluster-wide check adds to a request.
    """
    if not concurrency or any(c < 1 for c in concurrency):
        raise BenchError("give one or more concurrencies of at least 1, e.g. --concurrency 1,16,64")
    if duration <= 0 or warmup < 0:
        raise BenchError("--duration must be above 0 seconds, and the warm-up 0 or more")
    if iros_workers < 1:
        raise BenchError("Iros needs at least 1 worker")
    wrk, nginx = find_tools()

    results: list[dict[str, Any]] = []
    nginx_proc: ChildProcess | None = None
    iros_proc: ChildProcess | None = None
    bare_proc: ChildProcess | None = None
    extra: list[ChildProcess] = []
    bar = wrk_progress(progress)
    with (
        sigterm_as_interrupt(),
        bench_workdir(keep_dir) as workdir,
        bar if bar is not None else contextlib.nullcontext(),
    ):
        try:
            phase = Phase(bar, None, None)
            if bar is not None:
                runs = 2 + int(metrics_baseline) + 2 * int(ratelimit_redis)
                total = len(concurrency) * runs * (duration + warmup)
                phase.overall = bar.add_task("all runs", total=total, clock="")
                phase.task = bar.add_task("starting nginx and Iros", total=None, clock="")
            nginx_proc = start_nginx(workdir, nginx, max(concurrency))
            iros_proc = start_iros(workdir, nginx_proc.port, iros_workers)
            procs = [(nginx_proc, "nginx", "nginx-error.log"), (iros_proc, "Iros", "iros.log")]
            script = workdir / "bench.lua"
            script.write_text(wrk_script())
            targets = {
                "direct": (f"{nginx_proc.url}/v1/chat/completions", "directly at nginx"),
                "iros": (f"{iros_proc.url}/v1/chat/completions", "through Iros"),
            }
            servers: dict[str, ChildProcess] = {"iros": iros_proc}
            if metrics_baseline:
                bare_proc = start_iros(workdir, nginx_proc.port, iros_workers, metrics=False, name="bare")
                procs.append((bare_proc, "Iros without metrics", "bare.log"))
                servers["iros_no_metrics"] = bare_proc
                targets["iros_no_metrics"] = (
                    f"{bare_proc.url}/v1/chat/completions",
                    "through Iros without metrics",
                )
            scripts = {key: script for key in targets}
            if ratelimit_redis:
                for key, proc, where in _ratelimit_servers(workdir, nginx_proc.port, iros_workers, extra):
                    procs.append((proc, where, f"{key.removeprefix('iros_')}.log"))
                    servers[key] = proc
                    targets[key] = (f"{proc.url}/v1/chat/completions", where)
                    scripts[key] = workdir / "bench-keyed.lua"
                scripts["iros_keyed"].write_text(wrk_script(f"Bearer {BENCH_KEY}"))
            for c in concurrency:
                row: dict[str, Any] = {"concurrency": c}
                for key, (url, where) in targets.items():
                    script = scripts[key]
                    if warmup > 0:
                        out = workdir / f"wrk-c{c}-{key}-warmup.txt"
                        run_wrk(wrk, script, url, c, warmup, out, phase, f"c={c} {where} (warm-up)")
                    out = workdir / f"wrk-c{c}-{key}.txt"
                    server = servers.get(key)
                    cpu_before = _cpu_seconds(server)
                    raw = run_wrk(wrk, script, url, c, duration, out, phase, f"c={c} {where}")
                    row[key] = summarize(raw)
                    if server is not None and raw["requests"]:
                        # CPU time is the server's own, whatever else the machine is doing.
                        spent = _cpu_seconds(server) - cpu_before
                        row[key]["cpu_us_per_request"] = round(spent / raw["requests"] * 1e6, 1)
                    # A dead server shows up as connect errors; say so instead of reporting nonsense.
                    for proc, name, log in procs:
                        if not proc.running:
                            raise BenchError(
                                f"{name} exited (status {proc.stop()}) during c={c}; "
                                f"its output:\n{tail(workdir / log)}"
                            )
                direct, through = row["direct"], row["iros"]
                row["added_ms"] = {
                    p: round(through[f"{p}_ms"] - direct[f"{p}_ms"], 3) for p in ("p50", "p95", "p99")
                }
                row["throughput_ratio"] = round(through["rps"] / direct["rps"], 3) if direct["rps"] else None
                if metrics_baseline:
                    bare = row["iros_no_metrics"]
                    row["metrics_cost"] = {
                        "throughput_ratio": round(through["rps"] / bare["rps"], 3) if bare["rps"] else None,
                        "added_p50_ms": round(through["p50_ms"] - bare["p50_ms"], 3),
                        "added_p99_ms": round(through["p99_ms"] - bare["p99_ms"], 3),
                    }
                if ratelimit_redis:
                    off, on = row["iros_keyed"], row["iros_ratelimit_redis"]
                    row["ratelimit_cost"] = {
                        "throughput_ratio": round(on["rps"] / off["rps"], 3) if off["rps"] else None,
                        "added_p50_ms": round(on["p50_ms"] - off["p50_ms"], 3),
                        "added_p99_ms": round(on["p99_ms"] - off["p99_ms"], 3),
                        "added_cpu_us_per_request": round(
                            on.get("cpu_us_per_request", 0.0) - off.get("cpu_us_per_request", 0.0), 1
                        ),
                    }
                results.append(row)
        finally:
            for child in (*extra, bare_proc, iros_proc, nginx_proc):
                if child is not None:
                    child.stop()

    return {
        "benchmark": "overhead",
        "duration_s": float(duration),
        "warmup_s": float(warmup),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "iros_workers": iros_workers,
        },
        "results": results,
        "targets": dict(TARGETS),
        "met": _met(results),
    }


BENCH_KEY = "sk-bench-ratelimit"


def _ratelimit_servers(
    workdir: Path, upstream_port: int, workers: int, started: list[ChildProcess]
) -> list[tuple[str, ChildProcess, str]]:
    """A redis-server, an Iros whose key has no limit and one whose key's limit lives in that Redis."""
    from iros.testing.redis import RedisServer

    redis = RedisServer().start()
    started.append(redis)
    key = f"{{key: {BENCH_KEY}, name: bench"
    off = f"auth: {{api_keys: [{key}}}]}}\n"
    # A limit no run reaches: every request is checked in Redis and none is refused.
    on = (
        f"auth: {{api_keys: [{key}, requests_per_minute: 1.0e12}}], burst: 1000000000}}\n"
        f"state: {{backend: redis, url: '{redis.url}'}}\n"
    )
    keyed = start_iros(workdir, upstream_port, workers, name="keyed", extra=off)
    started.append(keyed)
    limited = start_iros(workdir, upstream_port, workers, name="ratelimit_redis", extra=on)
    started.append(limited)
    return [
        ("iros_keyed", keyed, "through Iros, a key without limit"),
        ("iros_ratelimit_redis", limited, "through Iros, a key limited in Redis"),
    ]


def _met(results: list[dict[str, Any]]) -> dict[str, bool | None]:
    by_c = {row["concurrency"]: row for row in results}
    met: dict[str, bool | None] = {"added_p50_at_c1": None, "rps_at_c64": None}
    # A run with errors never meets a target: fast error responses would flatter both numbers.
    if 1 in by_c:
        row = by_c[1]
        clean = row["direct"]["errors"] == 0 and row["iros"]["errors"] == 0
        met["added_p50_at_c1"] = clean and row["added_ms"]["p50"] <= TARGETS["added_p50_ms_at_c1_max"]
    if 64 in by_c:
        iros = by_c[64]["iros"]
        met["rps_at_c64"] = iros["errors"] == 0 and iros["rps"] >= TARGETS["iros_rps_at_c64_min"]
    return met


def _write(stream: IO[bytes], value: dict[str, Any]) -> None:
    stream.write(orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n")
    stream.flush()


if __name__ == "__main__":  # for trials: python -m iros.bench.overhead [c,c,...] [duration]
    levels = [int(c) for c in (sys.argv[1] if len(sys.argv) > 1 else "1,16,64").split(",")]
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    try:
        _write(sys.stdout.buffer, run_overhead(levels, seconds))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
