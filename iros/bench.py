"""`iros bench overhead`: the latency Iros adds in front of an upstream that costs nothing.

nginx answers a fixed chat completion (the cheapest upstream there is), wrk drives it once directly and
once through an Iros subprocess, and the difference between the two is Iros's cost:

    result = run_overhead([1, 16, 64], duration=10)   # a JSON-able dict; see the bottom of this file

Everything runs on loopback ports in a temp dir, and every process started here is stopped in `finally`.
"""

from __future__ import annotations

import contextlib
import grp
import math
import os
import platform
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

import orjson
import psutil
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from iros.process import ChildProcess, ProcessFailed, free_port, tail

INSTALL_HINT = "install it with `apt-get install wrk nginx-light` (Debian/Ubuntu) or run ./scripts/install"
TARGETS = {"added_p50_ms_at_c1_max": 0.5, "iros_rps_at_c64_min": 3000}

# nginx lives in /usr/sbin, which is not on a non-root user's PATH on Debian.
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")

MODEL = "bench"
COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": MODEL,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
}
MODELS = {
    "object": "list",
    "data": [{"id": MODEL, "object": "model", "created": 1700000000, "owned_by": "bench"}],
}
REQUEST = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}]}

_WRK_MARK = "IROS_BENCH_RESULT "
_STOP_TIMEOUT = 5.0


class BenchError(Exception):
    """A failure the user can act on; the message says what to do."""


# ---------------------------------------------------------------------------------------------- tools


def _find(name: str, extra_dirs: tuple[str, ...] = ()) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in extra_dirs:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _tools() -> tuple[str, str]:
    wrk = _find("wrk")
    nginx = _find("nginx", _SBIN_DIRS)
    missing = [name for name, path in (("wrk", wrk), ("nginx", nginx)) if path is None]
    if missing or wrk is None or nginx is None:
        names = " and ".join(missing)
        raise BenchError(
            f"{names} not found on PATH: `iros bench overhead` needs wrk and nginx; {INSTALL_HINT}"
        )
    return wrk, nginx


def check_tools() -> None:
    """Raise BenchError, saying what to install, when wrk or nginx is missing."""
    _tools()


def _nginx_string(value: dict[str, Any]) -> str:
    text = orjson.dumps(value).decode()
    # Inside `return 200 '...'` a `$` starts a variable and `'`/`\` need escaping; our fixed JSON has
    # none of them, so refuse rather than silently serve something else.
    if any(ch in text for ch in "$'\\"):
        raise ValueError(f"cannot embed {text!r} in an nginx string")
    return f"'{text}'"


def nginx_config(workdir: Path, port: int, max_connections: int = 64) -> str:
    """An nginx.conf that serves the fixed completion and model list, with every path inside workdir."""
    # As root, nginx would hand its worker to `nobody`; name the current user so it runs as us.
    user = ""
    if os.geteuid() == 0:
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};\n"
    temp = "\n".join(
        f"    {kind}_temp_path {workdir / 'nginx-tmp' / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
{user}worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "nginx-error.log"} warn;
events {{
    worker_connections {max(1024, 2 * max_connections + 64)};
}}
http {{
    access_log off;
{temp}
    default_type application/json;
    # wrk and Iros's pool reuse connections; nginx's default of 1000 requests each would churn them.
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /v1/chat/completions {{
            return 200 {_nginx_string(COMPLETION)};
        }}
        location = /v1/models {{
            return 200 {_nginx_string(MODELS)};
        }}
        location / {{
            return 404 '{{"error":{{"message":"not found","type":"invalid_request_error"}}}}';
        }}
    }}
}}
"""


def _start(child: ChildProcess, timeout: float) -> ChildProcess:
    try:
        return child.start(timeout)
    except ProcessFailed as exc:
        raise BenchError(str(exc)) from None


def start_nginx(workdir: Path, nginx: str | None = None, max_connections: int = 64) -> ChildProcess:
    """Start the zero-cost upstream; the caller stops it."""
    nginx = nginx or _tools()[1]
    port = free_port()
    (workdir / "nginx-tmp").mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_config(workdir, port, max_connections))
    log = workdir / "nginx-error.log"
    # -e: nginx opens its compiled-in error log before reading the config; keep even that in workdir.
    cmd = [nginx, "-p", f"{workdir}/", "-e", str(log), "-c", str(conf), "-g", "daemon off;"]
    child = ChildProcess(
        cmd,
        port,
        health="/v1/models",
        name="nginx",
        log_path=workdir / "nginx-output.log",
        stop_timeout=_STOP_TIMEOUT,
    )
    return _start(child, 10.0)


def iros_config(port: int, upstream_port: int, data_dir: Path, metrics: bool = True) -> str:
    return (
        f"server: {{host: 127.0.0.1, port: {port}, data_dir: {orjson.dumps(str(data_dir)).decode()}}}\n"
        "auth: {open: true}\n"
        f"metrics_collection: {{enabled: {str(metrics).lower()}}}\n"
        # The same request again and again: with the cache on this would measure cache hits.
        "cache: {enabled: false}\n"
        "models:\n"
        f'  - {{name: {MODEL}, backend: openai, base_url: "http://127.0.0.1:{upstream_port}/v1"}}\n'
    )


def start_iros(
    workdir: Path, upstream_port: int, workers: int = 1, metrics: bool = True, name: str = "iros"
) -> ChildProcess:
    port = free_port()
    conf = workdir / f"{name}.yaml"
    conf.write_text(iros_config(port, upstream_port, workdir / f"{name}-data", metrics))
    cmd = [sys.executable, "-m", "iros", "serve", "--config", str(conf), "--port", str(port)]
    if workers != 1:
        cmd += ["--workers", str(workers)]
    child = ChildProcess(
        cmd, port, name="Iros (`iros serve`)", log_path=workdir / f"{name}.log", stop_timeout=_STOP_TIMEOUT
    )
    return _start(child, 20.0)


# ------------------------------------------------------------------------------------------------ wrk

# wrk's Lua is LuaJIT or 5.1-5.4; %.1f works for numbers in all of them where %d would reject floats on 5.3+.
_WRK_LUA = """\
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{mark}{{"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,' ..
    '"errors":{{"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f}},' ..
    '"latency_us":{{"mean":%.3f,"stdev":%.3f,"min":%.0f,"max":%.0f,"p50":%.1f,"p90":%.1f,"p95":%.1f,"p99":%.1f}}}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.min, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(95), latency:percentile(99)))
end
"""


def wrk_script() -> str:
    body = orjson.dumps(REQUEST).decode()
    # A Lua long string needs no escaping for JSON.
    return _WRK_LUA.format(body=f"[[{body}]]", mark=_WRK_MARK)


@dataclass
class _Phase:
    progress: Progress | None
    task: TaskID | None
    overall: TaskID | None


def _run_wrk(
    wrk: str, script: Path, url: str, concurrency: int, duration: float, out: Path, phase: _Phase, label: str
) -> dict[str, Any]:
    # wrk's -d takes whole seconds only: round up, and SIGINT it at the exact time; wrk stops its clock
    # and reports normally on SIGINT.
    whole = max(1, math.ceil(duration))
    cmd = [
        wrk,
        "-t1",
        f"-c{concurrency}",
        f"-d{whole}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    if phase.progress is not None and phase.task is not None:
        phase.progress.reset(phase.task, total=duration, description=label, clock="")
    with open(out, "wb") as sink:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    start = time.monotonic()
    interrupted = False
    try:
        while proc.poll() is None:
            elapsed = time.monotonic() - start
            if not interrupted and duration < whole and elapsed >= duration:
                proc.send_signal(signal.SIGINT)
                interrupted = True
            if phase.progress is not None and phase.task is not None:
                done = min(elapsed, duration)
                phase.progress.update(phase.task, completed=done, clock=f"{done:5.1f}/{duration:g}s")
            if elapsed > whole + 15:
                raise BenchError(f"wrk did not finish {label} in time; its output:\n{tail(out)}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if phase.progress is not None:
        if phase.task is not None:
            phase.progress.update(phase.task, completed=duration)
        if phase.overall is not None:
            phase.progress.advance(phase.overall, duration)
    text = out.read_text(errors="replace")
    for line in text.splitlines():
        if line.startswith(_WRK_MARK):
            result: dict[str, Any] = orjson.loads(line[len(_WRK_MARK) :])
            return result
    raise BenchError(
        f"wrk gave no result for {label} (exit status {proc.returncode}); its output:\n{tail(out)}"
    )


def _ms(us: float) -> float:
    return round(us / 1000.0, 3)


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


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """wrk's numbers in the report's shape: rates per second, latencies in ms (3 decimals)."""
    lat = raw["latency_us"]
    kinds = {k: int(v) for k, v in raw["errors"].items()}
    seconds = raw["duration_us"] / 1e6
    return {
        "rps": round(raw["requests"] / seconds, 1) if seconds > 0 else 0.0,
        "p50_ms": _ms(lat["p50"]),
        "p90_ms": _ms(lat["p90"]),
        "p95_ms": _ms(lat["p95"]),
        "p99_ms": _ms(lat["p99"]),
        "mean_ms": _ms(lat["mean"]),
        "max_ms": _ms(lat["max"]),
        "requests": int(raw["requests"]),
        # Every failure in one number, so a run with any is plain to see; the kinds say which.
        # `status` is wrk's count of responses with an HTTP status of 400 or more.
        "errors": sum(kinds.values()),
        "error_kinds": kinds,
    }


# ----------------------------------------------------------------------------------------------- main


@contextlib.contextmanager
def _workdir(keep_dir: Path | None) -> Iterator[Path]:
    if keep_dir is not None:
        keep_dir.mkdir(parents=True, exist_ok=True)
        yield keep_dir.resolve()
        return
    path = Path(tempfile.mkdtemp(prefix="iros-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Our children run in sessions of their own, so a plain `kill` of us would orphan them: turn
    SIGTERM into KeyboardInterrupt while we run, so the same `finally` stops them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _progress(enabled: bool) -> Progress | None:
    if not enabled:
        return None
    return Progress(
        TextColumn("[bold]{task.description}", justify="left"),
        BarColumn(),
        TextColumn("{task.fields[clock]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def run_overhead(
    concurrency: list[int],
    duration: float,
    *,
    warmup: float = 2.0,
    iros_workers: int = 1,
    progress: bool = True,
    keep_dir: Path | None = None,
    metrics_baseline: bool = False,
) -> dict[str, Any]:
    """Measure wrk against nginx directly and through Iros at each concurrency; returns the report.

    With metrics_baseline, a second Iros with metrics collection off runs the same load, and each row
    gains `metrics_cost`: what collection costs in throughput and latency, measured side by side.
    """
    if not concurrency or any(c < 1 for c in concurrency):
        raise BenchError("give one or more concurrencies of at least 1, e.g. --concurrency 1,16,64")
    if duration <= 0 or warmup < 0:
        raise BenchError("--duration must be above 0 seconds, and the warm-up 0 or more")
    if iros_workers < 1:
        raise BenchError("Iros needs at least 1 worker")
    wrk, nginx = _tools()

    results: list[dict[str, Any]] = []
    nginx_proc: ChildProcess | None = None
    iros_proc: ChildProcess | None = None
    bare_proc: ChildProcess | None = None
    bar = _progress(progress)
    with (
        _sigterm_as_interrupt(),
        _workdir(keep_dir) as workdir,
        bar if bar is not None else contextlib.nullcontext(),
    ):
        try:
            phase = _Phase(bar, None, None)
            if bar is not None:
                total = len(concurrency) * (3 if metrics_baseline else 2) * (duration + warmup)
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
            for c in concurrency:
                row: dict[str, Any] = {"concurrency": c}
                for key, (url, where) in targets.items():
                    if warmup > 0:
                        out = workdir / f"wrk-c{c}-{key}-warmup.txt"
                        _run_wrk(wrk, script, url, c, warmup, out, phase, f"c={c} {where} (warm-up)")
                    out = workdir / f"wrk-c{c}-{key}.txt"
                    server = servers.get(key)
                    cpu_before = _cpu_seconds(server)
                    raw = _run_wrk(wrk, script, url, c, duration, out, phase, f"c={c} {where}")
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
                results.append(row)
        finally:
            for child in (bare_proc, iros_proc, nginx_proc):
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


if __name__ == "__main__":  # for trials: python -m iros.bench [c,c,...] [duration]
    levels = [int(c) for c in (sys.argv[1] if len(sys.argv) > 1 else "1,16,64").split(",")]
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    try:
        _write(sys.stdout.buffer, run_overhead(levels, seconds))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
