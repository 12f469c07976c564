"""Side by side: Iros and LiteLLM's proxy in front of the same nginx upstream, under the same wrk load.

    scripts/bench-peers                  # installs LiteLLM in .peers-venv, then runs this module
    python -m iros.bench.peers --litellm .peers-venv/bin/litellm --concurrency 1,16,64 --duration 10

Both gateways run one process with their defaults for a plain proxy (Iros: no cache, metrics on, as
operators run it; LiteLLM: no database, local cost map), bound to 127.0.0.1. The report gives requests/s
and the P50/P99 each adds over nginx measured directly in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from iros.bench.processes import (
    MODEL,
    BenchError,
    bench_workdir,
    find_tools,
    sigterm_as_interrupt,
    start_child,
    start_iros,
    start_nginx,
)
from iros.bench.wrk import Phase, run_wrk, summarize, wrk_progress, wrk_script
from iros.testing.process import ChildProcess, free_port

PEERS = ("direct", "iros", "litellm")


def litellm_config(upstream_port: int) -> str:
    return (
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: http://127.0.0.1:{upstream_port}/v1\n"
        "      api_key: none\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  drop_params: true\n"
    )


def start_litellm(workdir: Path, litellm: str, upstream_port: int) -> ChildProcess:
    port = free_port()
    conf = workdir / "litellm.yaml"
    conf.write_text(litellm_config(upstream_port))
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "NO_DOCS": "True"}
    child = ChildProcess(
        [litellm, "--config", str(conf), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        port,
        health="/health/liveliness",
        name="LiteLLM proxy",
        env=env,
        log_path=workdir / "litellm.log",
    )
    return start_child(child, 120.0)


def run_peers(litellm: str, concurrency: list[int], duration: float, warmup: float = 2.0) -> dict[str, Any]:
    if not Path(litellm).exists():
        raise BenchError(f"{litellm}: not found; run scripts/bench-peers, which installs LiteLLM first")
    wrk, nginx = find_tools()
    procs: list[ChildProcess] = []
    rows: list[dict[str, Any]] = []
    bar = wrk_progress(True)
    with sigterm_as_interrupt(), bench_workdir(None) as workdir, bar if bar else contextlib.nullcontext():
        try:
            phase = Phase(bar, None, None)
            if bar is not None:
                phase.overall = bar.add_task(
                    "all runs", total=len(concurrency) * 3 * (duration + warmup), clock=""
                )
                phase.task = bar.add_task("starting nginx, Iros and LiteLLM", total=None, clock="")
            upstream = start_nginx(workdir, nginx, max(concurrency))
            procs.append(upstream)
            procs.append(iros := start_iros(workdir, upstream.port))
            procs.append(peer := start_litellm(workdir, litellm, upstream.port))
            script = workdir / "bench.lua"
            script.write_text(wrk_script())
            urls = {name: f"{p.url}/v1/chat/completions" for name, p in zip(PEERS, procs, strict=True)}
            for c in concurrency:
                row: dict[str, Any] = {"concurrency": c}
                for name, url in urls.items():
                    if warmup:
                        run_wrk(
                            wrk, script, url, c, warmup, workdir / "warm.txt", phase, f"c={c} {name} warm-up"
                        )
                    raw = run_wrk(
                        wrk, script, url, c, duration, workdir / f"{name}-{c}.txt", phase, f"c={c} {name}"
                    )
                    row[name] = summarize(raw)
                for name in ("iros", "litellm"):
                    row[name]["added_p50_ms"] = round(row[name]["p50_ms"] - row["direct"]["p50_ms"], 3)
                    row[name]["added_p99_ms"] = round(row[name]["p99_ms"] - row["direct"]["p99_ms"], 3)
                rows.append(row)
            del iros, peer
        finally:
            for child in reversed(procs):
                child.stop()
    return {"benchmark": "peers", "duration_s": duration, "cpus": os.cpu_count(), "results": rows}


def table(report: dict[str, Any]) -> Table:
    t = Table(title="Iros and LiteLLM in front of the same nginx (wrk, one process each)")
    for col in ("concurrency", "gateway", "requests/s", "added P50 ms", "added P99 ms", "errors"):
        t.add_column(col, justify="right")
    for row in report["results"]:
        for name in ("iros", "litellm"):
            r = row[name]
            t.add_row(
                str(row["concurrency"]),
                name,
                f"{r['rps']:,.0f}",
                f"{r['added_p50_ms']:.3f}",
                f"{r['added_p99_ms']:.3f}",
                str(r["errors"]),
            )
    return t


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--litellm", default=".peers-venv/bin/litellm")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
        report = run_peers(args.litellm, levels, args.duration)
    except (BenchError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    Console(stderr=True).print(table(report))
    text = orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
