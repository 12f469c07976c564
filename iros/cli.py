"""The `iros` command: serve, mock-upstream, config, bench."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console

from iros import __version__
from iros.config import ConfigError, Settings, load_settings

app = typer.Typer(
    help="Iros: an OpenAI-compatible gateway that makes LLM responses faster, cheaper and observable.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Check and show configuration.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print JSON figures.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")

err = Console(stderr=True)

WORKER_OVERRIDES_ENV = "IROS_WORKER_OVERRIDES"

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="YAML config file (default: the embedded demo config)", envvar="IROS_CONFIG"
    ),
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _load(config: Path | None, overrides: dict[str, Any] | None = None) -> Settings:
    try:
        return load_settings(config, overrides)
    except ConfigError as exc:
        raise _fail(f"{exc}\n(check a file with: iros config check FILE)") from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="bind address (overrides server.host)")] = None,
    port: Annotated[int | None, typer.Option(help="port (overrides server.port)")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning or error")] = None,
    workers: Annotated[
        int, typer.Option(min=1, max=256, help="worker processes sharing the port (metrics merged)")
    ] = 1,
) -> None:
    """Serve the OpenAI-compatible API (and everything else) on one port."""
    server: dict[str, Any] = {
        k: v for k, v in {"host": host, "port": port, "log_level": log_level}.items() if v
    }
    overrides = {"server": server} if server else None
    settings = _load(config, overrides)
    _setup_logging(settings.server.log_level)

    import uvicorn

    from iros.app import create_app

    application: Any
    if workers > 1:
        # Each worker builds its own app from the same file and flags; prometheus_client keeps every
        # worker's counters in one shared directory, emptied here so a restart starts from zero.
        from iros.exposition import MULTIPROC_ENV, reset_multiprocess_dir

        os.environ[MULTIPROC_ENV] = str(reset_multiprocess_dir(Path(settings.server.data_dir)))
        os.environ[WORKER_OVERRIDES_ENV] = orjson.dumps(overrides or {}).decode()
        if config is not None:
            os.environ["IROS_CONFIG"] = str(config.resolve())
        application = "iros.app:worker_app"
    else:
        try:
            application = create_app(settings)
        except ConfigError as exc:
            raise _fail(str(exc)) from None
    s = settings.server
    base = f"http://{s.host}:{s.port}"
    err.print(
        f"[bold]Iros {__version__}[/] serving {len(settings.model_names())} models "
        f"({', '.join(settings.model_names())}) on [cyan]{base}[/]"
        f"{f' with {workers} workers' if workers > 1 else ''}\n"
        f"  OpenAI base URL: [cyan]{base}/v1[/]   health: {base}/health   ready: {base}/ready\n"
        f"  metrics: {base}/metrics   live: {base}/api/metrics/stream   data: {s.data_dir}\n"
        f"  auth: {'open (loopback only)' if settings.auth.open else 'API keys required'}",
        highlight=False,
        soft_wrap=True,
    )
    uvicorn.run(
        application,
        factory=workers > 1,
        workers=workers if workers > 1 else None,
        host=s.host,
        port=s.port,
        loop="uvloop" if _has_uvloop() else "asyncio",
        http="httptools",
        ws="websockets-sansio",
        lifespan="on",
        access_log=False,
        log_config=None,
        log_level=s.log_level,
        server_header=False,
        # No proxy is trusted to name client addresses, so uvicorn's forwarded-headers middleware is off.
        proxy_headers=False,
        timeout_graceful_shutdown=int(s.shutdown_timeout_seconds) or None,
    )


def _step_progress() -> tuple[Any, Callable[[str, float, float], None]]:
    """A transient rich progress bar on stderr and the (description, done, total) callback that moves it."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    task = bar.add_task("starting", total=None)

    def progress(description: str, done: float, total: float) -> None:
        bar.update(task, description=description, completed=done, total=total)

    return bar, progress


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


@app.command("mock-upstream")
def mock_upstream(
    port: Annotated[int, typer.Option(help="port to listen on")] = 9100,
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    profile: Annotated[
        str, typer.Option(help="default latency profile (a request naming a profile gets it)")
    ] = ("lightweight"),
    api_key_env: Annotated[
        str | None, typer.Option(help="require 'Authorization: Bearer $VAR' with the key in this variable")
    ] = None,
) -> None:
    """Run the simulated model as a standalone OpenAI-compatible server."""
    from iros import mock_upstream as mock
    from iros.simulation import PROFILES

    if profile not in PROFILES:
        raise _fail(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    key = None
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise _fail(f"--api-key-env {api_key_env}: that environment variable is not set")
    _setup_logging("warning")
    err.print(f"simulated model ({profile}) on http://{host}:{port}/v1", highlight=False)
    mock.run(host, port, profile, key)


@config_app.command("check")
def config_check(file: Annotated[Path, typer.Argument(help="the YAML file to check")]) -> None:
    """Validate a config file; every problem is listed with the field it is in."""
    settings = _load(file)
    err.print(
        f"[green]ok[/]: {file} — {len(settings.models)} deployments of {len(settings.model_names())} models",
        highlight=False,
    )


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the effective configuration (file plus environment), secrets redacted, as JSON."""
    from iros.app import redacted

    typer.echo(orjson.dumps(redacted(_load(config)), option=orjson.OPT_INDENT_2).decode())


@bench_app.command("overhead")
def bench_overhead(
    concurrency: Annotated[str, typer.Option(help="comma-separated client concurrencies")] = "1,16,64",
    duration: Annotated[float, typer.Option(help="seconds of measured load per concurrency and path")] = 10.0,
    warmup: Annotated[float, typer.Option(help="seconds of unmeasured load before each run")] = 2.0,
    output: Annotated[Path | None, typer.Option(help="also write the JSON to this file")] = None,
    metrics_baseline: Annotated[
        bool, typer.Option(help="also run an Iros with metrics collection off, to show what collection costs")
    ] = False,
) -> None:
    """The latency Iros adds: the same load at a zero-cost upstream (nginx), direct and through Iros."""
    from iros.bench import BenchError, check_tools, run_overhead

    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
    except ValueError:
        raise _fail(
            f"--concurrency {concurrency!r}: give whole numbers separated by commas, e.g. 1,16,64"
        ) from None
    if not levels or min(levels) < 1:
        raise _fail("--concurrency needs at least one number, each 1 or more")
    if duration <= 0:
        raise _fail("--duration must be more than 0 seconds")
    try:
        check_tools()
        result = run_overhead(levels, duration, warmup=warmup, metrics_baseline=metrics_baseline)
    except BenchError as exc:
        raise _fail(str(exc)) from None
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    typer.echo(text)
    if output:
        output.write_text(text + "\n")


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

    from iros.tsdb_bench import run_tsdb_bench

    if samples < 1 or series < 1:
        raise _fail("--samples and --series must each be 1 or more")
    bar, progress = _step_progress()

    try:
        with bar:
            if directory is None:
                with tempfile.TemporaryDirectory(prefix="iros-bench-tsdb-") as tmp:
                    result = run_tsdb_bench(Path(tmp), samples=samples, series=series, progress=progress)
            else:
                result = run_tsdb_bench(directory, samples=samples, series=series, progress=progress)
    except (OSError, sqlite3.Error, RuntimeError) as exc:
        raise _fail(f"bench tsdb: {exc}") from None
    typer.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


@bench_app.command("collector")
def bench_collector(
    responses: Annotated[int, typer.Option(help="synthetic responses to collect")] = 50_000,
    rate: Annotated[float, typer.Option(help="requests per second the batches are sized for")] = 3000.0,
) -> None:
    """CPU that metrics collection (collector and SQLite store) spends per response, in-process."""
    import sqlite3

    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from iros.collector_bench import run_collector_bench

    if responses < 1 or rate <= 0:
        raise _fail("--responses must be 1 or more and --rate above 0")
    bar = Progress(
        TextColumn("[bold]collecting"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(), console=err
    )
    task = bar.add_task("collecting", total=responses)
    try:
        with bar:
            result = run_collector_bench(
                responses=responses, rate=rate, progress=lambda n: bar.advance(task, n)
            )
    except (OSError, sqlite3.Error) as exc:
        raise _fail(f"bench collector: {exc}") from None
    typer.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


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

    from iros.cache_bench import DEFAULT_PAIRS, read_pairs
    from iros.process import ProcessFailed

    path = pairs or DEFAULT_PAIRS
    if limit is not None and limit < 1:
        raise _fail("--limit must be 1 or more")
    try:
        data = read_pairs(path, limit, offset)
    except (OSError, ValueError) as exc:
        raise _fail(f"bench {name}: cannot read the pairs: {exc}") from None
    bar, progress = _step_progress()

    try:
        with bar:
            result: dict[str, Any] = run(data, progress)
    except (OSError, ValueError, RuntimeError, ProcessFailed) as exc:
        raise _fail(f"bench {name}: {exc}") from None
    return result


@bench_app.command("cache-quality")
def bench_cache_quality(
    pairs: PairsOption = None,
    limit: Annotated[int | None, typer.Option(help="only the first N pairs (after --offset)")] = None,
    offset: Annotated[
        int, typer.Option(min=0, help="skip the first N lines (the verifier never trained on the last 2000)")
    ] = 0,
    json_only: Annotated[bool, typer.Option("--json", help="only the JSON: no summary on stderr")] = False,
) -> None:
    """Semantic-cache precision and recall: store every a, ask every b; verifier on vs plain cosine."""
    from iros.cache_bench import run_cache_quality

    result = _cache_bench("cache-quality", pairs, limit, run_cache_quality, offset)
    if not json_only:
        plain, targets = result["plain_cosine"], result["targets"]
        err.print(
            f"threshold {result['threshold']}: verifier precision {result['precision']} "
            f"recall {result['recall']}; plain cosine precision {plain['precision']} "
            f"recall {plain['recall']} (targets: precision ≥ {targets['precision']}, "
            f"recall ≥ {targets['recall']})",
            highlight=False,
        )
    typer.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


@bench_app.command("cache-latency")
def bench_cache_latency(
    pairs: PairsOption = None,
    entries: Annotated[int, typer.Option(min=1, help="paraphrase pairs whose a is stored")] = 1000,
    duration: Annotated[float, typer.Option(help="seconds of lookups per concurrency level")] = 3.0,
) -> None:
    """Exact and semantic hit latency in-process, and semantic lookups/s at concurrency 1, 8 and 32."""
    from iros.cache_bench import run_cache_latency

    if duration <= 0:
        raise _fail("--duration must be more than 0 seconds")

    def run(data: Any, progress: Any) -> dict[str, Any]:
        return run_cache_latency(data, progress, entries=entries, duration=duration)

    result = _cache_bench("cache-latency", pairs, None, run)
    typer.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


@bench_app.command("workload")
def bench_workload(
    pairs: PairsOption = None,
    requests: Annotated[int, typer.Option(min=1, help="requests in the stream")] = 2000,
    concurrency: Annotated[int, typer.Option(min=1, help="requests in flight at once")] = 16,
    profile: Annotated[str, typer.Option(help="the simulated model's latency profile")] = "lightweight",
    seed: Annotated[int, typer.Option(help="seed of the stream")] = 7,
) -> None:
    """A Zipf stream of repeated, paraphrased and one-off questions through `iros serve`, cache on vs off."""
    from iros.cache_bench import run_workload
    from iros.simulation import PROFILES

    if profile not in PROFILES:
        raise _fail(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")

    def run(data: Any, progress: Any) -> dict[str, Any]:
        return run_workload(
            data, requests=requests, concurrency=concurrency, profile=profile, seed=seed, progress=progress
        )

    result = _cache_bench("workload", pairs, None, run)
    typer.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()
