"""The `iros` command: serve, mock-upstream, config, bench."""

from __future__ import annotations

import logging
import os
import sys
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
) -> None:
    """Serve the OpenAI-compatible API (and everything else) on one port."""
    server: dict[str, Any] = {
        k: v for k, v in {"host": host, "port": port, "log_level": log_level}.items() if v
    }
    settings = _load(config, {"server": server} if server else None)
    _setup_logging(settings.server.log_level)

    import uvicorn

    from iros.app import create_app

    try:
        application = create_app(settings)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    s = settings.server
    base = f"http://{s.host}:{s.port}"
    err.print(
        f"[bold]Iros {__version__}[/] serving {len(settings.model_names())} models "
        f"({', '.join(settings.model_names())}) on [cyan]{base}[/]\n"
        f"  OpenAI base URL: [cyan]{base}/v1[/]   health: {base}/health   ready: {base}/ready\n"
        f"  auth: {'open (loopback only)' if settings.auth.open else 'API keys required'}",
        highlight=False,
        soft_wrap=True,
    )
    uvicorn.run(
        application,
        host=s.host,
        port=s.port,
        loop="uvloop" if _has_uvloop() else "asyncio",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        log_level=s.log_level,
        server_header=False,
        # No proxy is trusted to name client addresses, so uvicorn's forwarded-headers middleware is off.
        proxy_headers=False,
        timeout_graceful_shutdown=int(s.shutdown_timeout_seconds) or None,
    )


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
        result = run_overhead(levels, duration, warmup=warmup)
    except BenchError as exc:
        raise _fail(str(exc)) from None
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    typer.echo(text)
    if output:
        output.write_text(text + "\n")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()
