"""The `iros` command: serve, mock-upstream, config, bench (bench.py), export, report, version.

iros serve --config iros.yaml --workers 2
iros config check iros.yaml
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console

from iros import __version__
from iros.cli.bench import bench_app
from iros.cli.common import ConfigOption, err, fail, load_config
from iros.config import ConfigError
from iros.otel.env import OtelEnv

app = typer.Typer(
    help="Iros: an OpenAI-compatible gateway that makes LLM responses faster, cheaper and observable.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Check and show configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")

WORKER_OVERRIDES_ENV = "IROS_WORKER_OVERRIDES"


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
    local_model: Annotated[
        bool,
        typer.Option(
            "--local-model",
            help="serve SmolLM2-135M through llama.cpp as the only model (scripts/install --local-model)",
        ),
    ] = False,
) -> None:
    """Serve the OpenAI-compatible API (and everything else) on one port."""
    server: dict[str, Any] = {
        k: v for k, v in {"host": host, "port": port, "log_level": log_level}.items() if v
    }
    overrides: dict[str, Any] = {"server": server} if server else {}
    with contextlib.ExitStack() as stack:
        if local_model:
            overrides["models"] = [stack.enter_context(_local_model()).model_settings()]
        _serve(config, overrides or None, workers)


@contextlib.contextmanager
def _local_model() -> Iterator[Any]:
    """llama.cpp serving SmolLM2 as a child process, for as long as Iros runs."""
    from iros.testing.llama import LlamaServer, ProcessFailed

    try:
        with err.status("starting llama.cpp with SmolLM2-135M-Instruct"):
            llama = LlamaServer(embedding=True).start()
    except ProcessFailed as exc:
        raise fail(f"cannot start the local model: {exc}") from None
    err.print(f"  local model: llama.cpp serving {llama.model} at {llama.base_url} (log: {llama.log_path})")
    try:
        yield llama
    finally:
        llama.stop()


def _serve(config: Path | None, overrides: dict[str, Any] | None, workers: int) -> None:
    settings = load_config(config, overrides)
    _setup_logging(settings.server.log_level)
    try:
        # Checked here too: with --workers each worker reads OTEL_* itself, after this banner.
        otel = OtelEnv.read(os.environ)
    except ConfigError as exc:
        raise fail(str(exc)) from None

    import uvicorn

    from iros.app import create_app

    application: Any
    if workers > 1:
        # Each worker builds its own app from the same file and flags; prometheus_client keeps every
        # worker's counters in one shared directory, emptied here so a restart starts from zero.
        from iros.metrics.exposition import MULTIPROC_ENV, reset_multiprocess_dir

        os.environ[MULTIPROC_ENV] = str(reset_multiprocess_dir(Path(settings.server.data_dir)))
        os.environ[WORKER_OVERRIDES_ENV] = orjson.dumps(overrides or {}).decode()
        if config is not None:
            os.environ["IROS_CONFIG"] = str(config.resolve())
        application = "iros.app:worker_app"
    else:
        try:
            application = create_app(settings)
        except ConfigError as exc:
            raise fail(str(exc)) from None
    s = settings.server
    base = f"http://{s.host}:{s.port}"
    err.print(
        f"[bold]Iros {__version__}[/] serving {len(settings.model_names())} models "
        f"({', '.join(settings.model_names())}) on [cyan]{base}[/]"
        f"{f' with {workers} workers' if workers > 1 else ''}\n"
        f"  dashboard: [cyan]{base}/dashboard/optimization[/]\n"
        f"  OpenAI base URL: [cyan]{base}/v1[/]   health: {base}/health   ready: {base}/ready\n"
        f"  metrics: {base}/metrics   live: {base}/api/metrics/stream   data: {s.data_dir}\n"
        f"  auth: {'open (loopback only)' if settings.auth.open else 'API keys required'}"
        + (
            f"\n  OpenTelemetry (OTEL_*): traces {','.join(otel.traces) or 'off'}, "
            f"metrics {','.join(otel.metrics) or 'off'}"
            if otel is not None
            else ""
        ),
        highlight=False,
        soft_wrap=True,
    )
    from iros.server.protocol import ConnectionLimits

    uvicorn.run(
        application,
        factory=workers > 1,
        workers=workers if workers > 1 else None,
        host=s.host,
        port=s.port,
        loop="uvloop" if _has_uvloop() else "asyncio",
        # httptools and websockets-sansio, with header and body deadlines and connections per address.
        **ConnectionLimits.of(s).uvicorn_options(),
        lifespan="on",
        access_log=False,
        log_config=None,
        log_level=s.log_level,
        server_header=False,
        # Only the configured proxies may name the client's address and scheme (X-Forwarded-For/-Proto).
        proxy_headers=bool(s.trusted_proxies),
        forwarded_allow_ips=s.trusted_proxies or None,
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
    from iros.backends import mock_server as mock
    from iros.backends.simulation import PROFILES

    if profile not in PROFILES:
        raise fail(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    key = None
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise fail(f"--api-key-env {api_key_env}: that environment variable is not set")
    _setup_logging("warning")
    err.print(f"simulated model ({profile}) on http://{host}:{port}/v1", highlight=False)
    mock.run(host, port, profile, key)


@config_app.command("check")
def config_check(file: Annotated[Path, typer.Argument(help="the YAML file to check")]) -> None:
    """Validate a config file; every problem is listed with the field it is in."""
    settings = load_config(file)
    err.print(
        f"[green]ok[/]: {file} — {len(settings.models)} deployments of {len(settings.model_names())} models",
        highlight=False,
    )


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the effective configuration (file plus environment), secrets redacted, as JSON."""
    from iros.config import redacted

    typer.echo(orjson.dumps(redacted(load_config(config)), option=orjson.OPT_INDENT_2).decode())


# --- iros export: the dashboard and alert rules for a Prometheus + Grafana stack -----------------------
export_app = typer.Typer(
    help="Write the dashboard and alert rules for Grafana and Prometheus.", no_args_is_help=True
)
app.add_typer(export_app, name="export")
OutputOption = Annotated[Path | None, typer.Option("--output", "-o", help="write here instead of stdout")]


def _emit(text: str, output: Path | None) -> None:
    if output is None:
        typer.echo(text)
        return
    try:
        output.write_text(text + "\n")
    except OSError as exc:
        raise fail(f"cannot write {output}: {exc.strerror}; pick a writable path with --output") from None
    err.print(f"wrote {output}", highlight=False)


@export_app.command("grafana")
def export_grafana(config: ConfigOption = None, output: OutputOption = None) -> None:
    """A Grafana dashboard JSON with the dashboard's panels over Iros's Prometheus metrics."""
    from iros.export.grafana import grafana_dashboard

    dashboard = grafana_dashboard(load_config(config))
    _emit(orjson.dumps(dashboard, option=orjson.OPT_INDENT_2).decode(), output)


@export_app.command("prometheus-rules")
def export_prometheus_rules(config: ConfigOption = None, output: OutputOption = None) -> None:
    """The enabled alert rules as a Prometheus rule file (rules with no PromQL twin are listed, skipped)."""
    import yaml

    from iros.export.rules import prometheus_rules

    rules, skipped = prometheus_rules(load_config(config))
    for rule in skipped:
        err.print(f"[yellow]skipped[/] {rule['name']}: {rule['reason']}", highlight=False)
    _emit(yaml.safe_dump(rules, sort_keys=False, width=1000), output)


@app.command("report")
def report(
    kind: Annotated[str, typer.Argument(help="daily or weekly")],
    config: ConfigOption = None,
    end: Annotated[
        str | None, typer.Option(help="period end: 2024-01-02, an ISO time or unix seconds; default now")
    ] = None,
    html_file: Annotated[
        Path | None, typer.Option("--html", help="also write a self-contained HTML report with charts here")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
) -> None:
    """A daily or weekly performance report from the configured metrics store (analysis, issue 8)."""
    from iros.cli.report import run_report
    from iros.core.sqlitefile import IncompatibleFile

    try:
        run_report(load_config(config), kind, end, html_file, as_json, Console(), err)
    except (ValueError, IncompatibleFile) as exc:
        raise fail(str(exc)) from None
    except OSError as exc:
        raise fail(f"cannot write the report: {exc}") from None


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()
