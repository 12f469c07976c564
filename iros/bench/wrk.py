"""wrk, the load generator: its Lua script, one timed run with a progress bar, and its figures.

script.write_text(wrk_script())    # POSTs REQUEST and prints one JSON line of results at the end
                                   # (wrk_script(distinct=True): a different question each time)
raw = run_wrk(wrk, script, url, 16, 10.0, workdir / "wrk.txt", Phase(None, None, None), "c=16")
# 16 connections for 10 s; Phase holds the progress bar and its tasks (None: no bar)
summarize(raw)                     # {"rps": ..., "p50_ms": ..., "p99_ms": ..., "errors": 0, ...}
"""

from __future__ import annotations

import contextlib
import math
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from iros.bench.processes import REQUEST, BenchError
from iros.testing.process import tail

_WRK_MARK = "IROS_BENCH_RESULT "

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


# Every request a question of its own (a cache miss): five words drawn from these, over 250 million
# sentences, alike enough in form that the semantic cache finds neighbours to weigh.
_DISTINCT_LUA = """\
local words = {{
  "harbour", "price", "winter", "engine", "river", "garden", "budget", "contract", "network", "library",
  "kitchen", "battery", "forest", "camera", "bridge", "patient", "market", "school", "storm", "planet",
  "printer", "ticket", "vaccine", "tunnel", "museum", "salary", "island", "crystal", "factory",
  "orchestra", "protein", "satellite", "village", "wallet", "glacier", "language", "violin", "tractor",
  "election", "pepper", "volcano", "keyboard", "passport", "bakery", "comet", "theatre", "dolphin",
  "mortgage",
}}
local head, tail = [[{head}]], [[{tail}]]
math.randomseed(os.time() + math.floor(os.clock() * 1000000))
request = function()
  local w = {{}}
  for i = 1, 5 do w[i] = words[math.random(#words)] end
  local prompt = "How does the " .. w[1] .. " of a " .. w[2] .. " change the " .. w[3] .. " and " ..
    w[4] .. " of " .. w[5] .. "?"
  return wrk.format(nil, nil, nil, head .. prompt .. tail)
end
"""


def wrk_script(distinct: bool = False) -> str:
    """wrk's script: the same REQUEST each time, or with `distinct`, a new question each time."""
    body = orjson.dumps(REQUEST).decode()
    # A Lua long string needs no escaping for JSON.
    script = _WRK_LUA.format(body=f"[[{body}]]", mark=_WRK_MARK)
    if not distinct:
        return script
    # The prompt's place in the JSON body: what orjson writes for a NUL character.
    head, _, tail = (
        orjson.dumps({**REQUEST, "messages": [{"role": "user", "content": "\0"}]})
        .decode()
        .partition("\\u0000")
    )
    return script + _DISTINCT_LUA.format(head=head, tail=tail)


@dataclass
class Phase:
    progress: Progress | None
    task: TaskID | None
    overall: TaskID | None


def run_wrk(
    wrk: str, script: Path, url: str, concurrency: int, duration: float, out: Path, phase: Phase, label: str
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


def wrk_progress(enabled: bool) -> Progress | None:
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
