"""`iros bench ...`: the benchmarks, each printing its figures as JSON on stdout (progress on stderr).

iros bench overhead --concurrency 1,16,64 --duration 10
iros bench overhead --concurrency 1,64 --cache default
iros bench tsdb --samples 2000000
iros bench cache-quality --limit 2000 --json     # per domain; --pairs FILE, repeated
iros bench soak --duration 600 --rate 40
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from iros.cli.common import count_progress, err, fail, print_json, step_progress

bench_app = typer.Typer(help="Benchmarks that print JSON figures.", no_args_is_help=True)

# What a bench may need beyond a plain install, by top-level module: the extra that brings it.
EXTRAS = {"httpx": "bench"}


@contextlib.contextmanager
def _needs_extras(command: str) -> Iterator[None]:
    """Around a bench's imports (iros.bench loads only inside its command): a package a plain install
    leaves out is one line naming the extra, not a traceback."""
    try:
        yield
    except ModuleNotFoundError as exc:
        top = (exc.name or "").partition(".")[0]
        if top not in EXTRAS:
            raise
        raise fail(
            f"`iros bench {command}` needs {top}, which a plain install leaves out: "
            f"pip install 'iros[{EXTRAS[top]}]'"
        ) from None


@bench_app.command("overhead")
def bench_overhead(
    concurrency: Annotated[str, typer.Option(help="comma-separated client concurrencies")] = "1,16,64",
    duration: Annotated[float, typer.Option(help="seconds of measured load per concurrency and path")] = 10.0,
    warmup: Annotated[float, typer.Option(help="seconds of unmeasured load before each run")] = 2.0,
    output: Annotated[Path | None, typer.Option(help="also write the JSON to this file")] = None,
    metrics_baseline: Annotated[
        bool, typer.Option(help="also run an Iros with metrics collection off, to show what collection costs")
    ] = False,
    workers: Annotated[int, typer.Option(help="Iros worker processes (iros serve --workers)")] = 1,
    otel: Annotated[
        bool,
        typer.Option(help="also run an Iros exporting OpenTelemetry (OTLP/HTTP), to show what export costs"),
    ] = False,
    cache: Annotated[
        str,
        typer.Option(
            help="off, or default: the cache as configured by default, every request a new question "
            "(a miss), and an Iros with the cache off under the same load in the same run"
        ),
    ] = "off",
    ratelimit_redis: Annotated[
        bool,
        typer.Option(help="also run a keyed Iros with and without its rate limit checked in Redis (state)"),
    ] = False,
) -> None:
    """The latency Iros adds: the same load at a zero-cost upstream (nginx), direct and through Iros."""
    from iros.bench.overhead import run_overhead
    from iros.bench.processes import BenchError, check_tools

    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
    except ValueError:
        raise fail(
            f"--concurrency {concurrency!r}: give whole numbers separated by commas, e.g. 1,16,64"
        ) from None
    if not levels or min(levels) < 1:
        raise fail("--concurrency needs at least one number, each 1 or more")
    if duration <= 0:
        raise fail("--duration must be more than 0 seconds")
    if cache not in ("off", "default"):
        raise fail(f"--cache {cache!r}: off or default")
    try:
        check_tools()
        result = run_overhead(
            levels,
            duration,
            warmup=warmup,
            metrics_baseline=metrics_baseline,
            iros_workers=workers,
            otel=otel,
            cache=cache == "default",
            ratelimit_redis=ratelimit_redis,
        )
    except BenchError as exc:
        raise fail(str(exc)) from None
    print_json(result, output)


@bench_app.command("tsdb")
def bench_tsdb(
    samples: Annotated[int, typer.Option(help="samples to write, spread over the last 30 days")] = 2_000_000,
    series: Annotated[int, typer.Option(help="series (label sets) the samples are spread over")] = 12,
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir", help="where to build the database (default: a temporary directory, removed after)"
        ),
    ] = None,
) -> None:
    """The embedded metrics store (SQLite): ingest rate, query time per dashboard range, size per sample."""
    import sqlite3
    import tempfile

    from iros.bench.tsdb import run_tsdb_bench

    if samples < 1 or series < 1:
        raise fail("--samples and --series must each be 1 or more")
    bar, progress = step_progress()

    try:
        with bar:
            if directory is None:
                with tempfile.TemporaryDirectory(prefix="iros-bench-tsdb-") as tmp:
                    result = run_tsdb_bench(Path(tmp), samples=samples, series=series, progress=progress)
            else:
                result = run_tsdb_bench(directory, samples=samples, series=series, progress=progress)
    except (OSError, sqlite3.Error, RuntimeError) as exc:
        raise fail(f"bench tsdb: {exc}") from None
    print_json(result)


@bench_app.command("otel")
def bench_otel(
    requests: Annotated[int, typer.Option(help="synthetic finished requests to export")] = 2000,
) -> None:
    """CPU that OpenTelemetry export spends per request (spans, instruments, OTLP encoding), in-process."""
    from iros.bench.otel import run_otel_bench

    if requests < 1:
        raise fail("--requests must be 1 or more")
    print_json(run_otel_bench(requests=requests))


@bench_app.command("collector")
def bench_collector(
    responses: Annotated[int, typer.Option(help="synthetic responses to collect")] = 50_000,
    rate: Annotated[float, typer.Option(help="requests per second the batches are sized for")] = 3000.0,
) -> None:
    """CPU that metrics collection (collector and SQLite store) spends per response, in-process."""
    import sqlite3

    from iros.bench.collector import run_collector_bench

    if responses < 1 or rate <= 0:
        raise fail("--responses must be 1 or more and --rate above 0")
    bar, advance = count_progress("collecting", responses)
    try:
        with bar:
            result = run_collector_bench(responses=responses, rate=rate, progress=advance)
    except (OSError, sqlite3.Error) as exc:
        raise fail(f"bench collector: {exc}") from None
    print_json(result)


@bench_app.command("alerts")
def bench_alerts(
    models: Annotated[int, typer.Option(help="models whose response series fill the live window")] = 10,
    seconds: Annotated[int, typer.Option(help="seconds of live window (1-300)")] = 60,
    evaluations: Annotated[int, typer.Option(help="evaluations measured")] = 30,
) -> None:
    """CPU one alert evaluation (every rule, the target rules included) takes from the event loop."""
    from iros.bench.alerts import run_alert_bench

    if models < 1 or not 1 <= seconds <= 300 or evaluations < 1:
        raise fail("--models and --evaluations must be 1 or more, --seconds 1 to 300")
    bar, advance = count_progress("evaluating", evaluations, elapsed=False)
    with bar:
        result = run_alert_bench(models, seconds, evaluations, progress=advance)
    print_json(result)


PairsOption = Annotated[
    Path | None,
    typer.Option(
        "--pairs",
        help="JSON lines (gzipped or not) of {a, b, label} (default: ../shared/data/qqp/dev.jsonl.gz)",
    ),
]


def _cache_bench(
    name: str, pairs: Path | None, limit: int | None, run: Any, offset: int = 0
) -> dict[str, Any]:
    """Read the pairs, run one cache bench under a progress bar on stderr, turn its failures into errors."""

    from iros.bench.pairs import DEFAULT_PAIRS, read_pairs
    from iros.testing.process import ProcessFailed

    path = pairs or DEFAULT_PAIRS
    if limit is not None and limit < 1:
        raise fail("--limit must be 1 or more")
    try:
        data = read_pairs(path, limit, offset)
    except (OSError, ValueError) as exc:
        raise fail(f"bench {name}: cannot read the pairs: {exc}") from None
    bar, progress = step_progress()

    try:
        with bar:
            result: dict[str, Any] = run(data, progress)
    except (OSError, ValueError, RuntimeError, ProcessFailed) as exc:
        raise fail(f"bench {name}: {exc}") from None
    return result


@bench_app.command("cache-quality")
def bench_cache_quality(
    pairs: Annotated[
        list[Path] | None,
        typer.Option(
            "--pairs",
            help="JSON lines (gzipped or not) of {a, b, label}, one domain each; repeat for several "
            "(default: the four development domains in ../shared/data)",
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="only the first N pairs of each file")] = None,
    json_only: Annotated[bool, typer.Option("--json", help="only the JSON: no summary on stderr")] = False,
) -> None:
    """The semantic cache's cold prior under the label-graph protocol, per domain: precision, recall,
    false hits per question, and the best fixed cosine threshold at the same precision."""
    from iros.bench.cache import run_cache_quality
    from iros.bench.pairs import DATA_DIR, DOMAINS, read_pairs

    if limit is not None and limit < 1:
        raise fail("--limit must be 1 or more")
    files = pairs or [DATA_DIR / name / "dev.jsonl.gz" for name in DOMAINS]
    domains: dict[str, Any] = {}
    for path in files:
        name = path.parent.name if path.name.startswith("dev.") else path.name.split(".")[0]
        try:
            domains[name if name not in domains else str(path)] = read_pairs(path, limit)
        except (OSError, ValueError) as exc:
            raise fail(f"bench cache-quality: cannot read the pairs: {exc}") from None
    bar, progress = step_progress()
    try:
        with bar:
            result = run_cache_quality(domains, progress)
    except (OSError, ValueError, RuntimeError) as exc:
        raise fail(f"bench cache-quality: {exc}") from None
    if not json_only:
        for name, d in result["domains"].items():
            fixed = d["fixed_threshold_at_same_precision"]
            err.print(
                f"{name}: precision {d['precision']} ({d['precision_strict_labels']} by the labels "
                f"alone) recall {d['recall']} false hits/question {d['false_hits_per_question']}; "
                f"best fixed threshold at that precision: recall {fixed['recall']} (cosine "
                f"{fixed['threshold']})",
                highlight=False,
            )
    print_json(result)


@bench_app.command("cache-latency")
def bench_cache_latency(
    pairs: PairsOption = None,
    entries: Annotated[int, typer.Option(min=1, help="paraphrase pairs whose a is stored")] = 1000,
    duration: Annotated[float, typer.Option(help="seconds of lookups per concurrency level")] = 3.0,
) -> None:
    """Exact and semantic hit and miss latency in-process, and semantic lookups/s (and how many were
    skipped) at concurrency 1, 8, 32 and 64."""
    from iros.bench.cache import run_cache_latency

    if duration <= 0:
        raise fail("--duration must be more than 0 seconds")

    def run(data: Any, progress: Any) -> dict[str, Any]:
        return run_cache_latency(data, progress, entries=entries, duration=duration)

    result = _cache_bench("cache-latency", pairs, None, run)
    print_json(result)


def _meaning_workload(pairs: Path | None, requests: int | None, concurrency: int, seed: int) -> None:
    from iros.bench.meaning import run_meaning_workload

    def run(data: Any, progress: Any) -> dict[str, Any]:
        return run_meaning_workload(
            data, requests=requests, concurrency=concurrency, seed=seed, progress=progress
        )

    print_json(_cache_bench("workload", pairs, None, run))


@bench_app.command("workload")
def bench_workload(
    by_meaning: Annotated[
        bool,
        typer.Option(
            "--by-meaning",
            help="every text of --pairs once, against an upstream answering by label group, verification "
            "judged exactly: cold and warm precision and recall beside the best fixed threshold",
        ),
    ] = False,
    pairs: PairsOption = None,
    requests: Annotated[
        int | None, typer.Option(min=1, help="requests in the stream (default 2000; 200 on a real model)")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="requests in flight at once")] = 16,
    profile: Annotated[str, typer.Option(help="the simulated model's latency profile")] = "lightweight",
    seed: Annotated[int, typer.Option(help="seed of the stream")] = 7,
    upstream: Annotated[
        str | None,
        typer.Option(help="a real OpenAI-compatible server instead, e.g. http://127.0.0.1:8000/v1"),
    ] = None,
    upstream_model: Annotated[str | None, typer.Option(help="the model name --upstream serves")] = None,
    connections: Annotated[int, typer.Option(min=1, help="max_connections to --upstream")] = 1,
    local_model: Annotated[
        bool, typer.Option("--local-model", help="llama.cpp serving SmolLM2, started for the run")
    ] = False,
    max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens per answer of a real model")] = 48,
) -> None:
    """A Zipf stream of repeated, paraphrased and one-off questions through `iros serve`, cache on vs off."""
    if by_meaning:
        return _meaning_workload(pairs, requests, concurrency, seed)
    from iros.backends.simulation import PROFILES
    from iros.bench.workload import run_workload

    if profile not in PROFILES:
        raise fail(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    if upstream is not None and local_model:
        raise fail("give --upstream or --local-model, not both")
    if upstream is not None and not upstream.startswith(("http://", "https://")):
        raise fail(f"--upstream must be an http(s) URL ending in /v1, not {upstream!r}")
    real = upstream is not None or local_model
    count = requests or (200 if real else 2000)

    def run(data: Any, progress: Any) -> dict[str, Any]:
        return run_workload(
            data,
            requests=count,
            concurrency=concurrency,
            profile=profile,
            seed=seed,
            progress=progress,
            upstream=upstream,
            upstream_model=upstream_model,
            connections=connections,
            local_model=local_model,
            max_tokens=max_tokens,
        )

    result = _cache_bench("workload", pairs, None, run)
    print_json(result)


@bench_app.command("routing")
def bench_routing(
    requests: Annotated[int, typer.Option(min=10, max=100_000, help="requests per strategy")] = 200,
    concurrency: Annotated[int, typer.Option(min=1, max=1024, help="requests in flight at once")] = 16,
    hard_share: Annotated[float, typer.Option(min=0, max=1, help="share of requests needing 0.9")] = 0.2,
    seed: Annotated[int, typer.Option(help="seed of the workload")] = 7,
    large_price: Annotated[float, typer.Option(min=0, help="large's price per 1k tokens")] = 0.01,
    small_price: Annotated[float, typer.Option(min=0, help="lightweight's price per 1k tokens")] = 0.001,
    chart: Annotated[Path | None, typer.Option(help="also write a plotly chart (HTML) here")] = None,
) -> None:
    """Iros's model selection against always-large, always-small and round-robin, in one run."""
    with _needs_extras("routing"):
        from iros.bench import routing as routing_bench

    bar, progress = step_progress()
    with bar:
        result = routing_bench.run_routing(
            requests=requests,
            concurrency=concurrency,
            hard_share=hard_share,
            seed=seed,
            large_price=large_price,
            small_price=small_price,
            progress=lambda strategy, done, total: progress(strategy, done, total),
        )
    if chart is not None:
        routing_bench.chart(result, str(chart))
    print_json(result)


@bench_app.command("soak")
def bench_soak(
    duration: Annotated[float, typer.Option(help="seconds of steady load")] = 600.0,
    rate: Annotated[float, typer.Option(help="requests per second, sent whatever the server does")] = 40.0,
    interval: Annotated[float, typer.Option(help="seconds between memory and latency samples")] = 10.0,
    warmup: Annotated[
        float | None,
        typer.Option(help="seconds not judged (default: the 5-minute live window, at most half the run)"),
    ] = None,
    cache_entries: Annotated[
        int | None, typer.Option(help="cache.max_entries (default: a bound the warm-up fills)")
    ] = None,
    output: Annotated[Path | None, typer.Option(help="also write the JSON to this file")] = None,
) -> None:
    """Steady load through the whole pipeline: memory growth, errors and P99 drift over time."""
    from iros.bench.processes import BenchError
    from iros.bench.soak import run_soak

    try:
        result = run_soak(duration, rate=rate, interval=interval, warmup=warmup, cache_entries=cache_entries)
    except BenchError as exc:
        raise fail(str(exc)) from None
    print_json(result, output)


@bench_app.command("state")
def bench_state(
    changes: Annotated[int, typer.Option(min=1, max=10_000, help="settings changed, one after another")] = 40,
    replicas: Annotated[int, typer.Option(min=1, max=8, help="Iros replicas sharing one Redis")] = 2,
    workers: Annotated[int, typer.Option(min=1, max=16, help="workers per replica")] = 2,
) -> None:
    """How long a live setting takes from the worker that changed it to every other (P50/P99)."""
    with _needs_extras("state"):
        from iros.bench.processes import BenchError
        from iros.bench.state import run_state

    try:
        result = run_state(changes=changes, replicas=replicas, workers=workers)
    except BenchError as exc:
        raise fail(str(exc)) from None
    print_json(result)
