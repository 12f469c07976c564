"""What every `iros` sub-command shares: errors on stderr that say what to do, config loading, a progress bar.

raise fail("--duration must be more than 0 seconds")      # prints "error: ..." on stderr, exit status 2
settings = load_config(path)                              # a ConfigError becomes such an error
bar, progress = step_progress()
with bar:
    progress("building", done=3, total=10)
print_json(result, output)                                # a bench's figures on stdout (and in a file)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.markup import escape

from iros.config import ConfigError, Settings, load_settings

err = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="YAML config file (default: the embedded demo config)", envvar="IROS_CONFIG"
    ),
]


def fail(message: str, code: int = 2) -> typer.Exit:
    # The message is text, not markup: "pip install 'iros[bench]'" keeps its brackets.
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


def load_config(config: Path | None, overrides: dict[str, Any] | None = None) -> Settings:
    """The settings of `config` (the embedded default for None), checked as `iros serve` checks them."""
    # Conditions and simulated profiles are checked where the parts are assembled, with the app.
    from iros.app import check_settings

    try:
        settings = load_settings(config, overrides)
        check_settings(settings)
        return settings
    except ConfigError as exc:
        raise fail(f"{exc}\n(check a file with: iros config check FILE)") from None


def step_progress() -> tuple[Any, Callable[[str, float, float], None]]:
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


def count_progress(label: str, total: int, elapsed: bool = True) -> tuple[Any, Callable[[int], None]]:
    """A rich progress bar on stderr counting to `total`, and the callback that advances it by n."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    columns = [TextColumn(f"[bold]{label}"), BarColumn(), TaskProgressColumn()]
    bar = Progress(*columns, *([TimeElapsedColumn()] if elapsed else []), console=err)
    task = bar.add_task(label, total=total)
    return bar, lambda n: bar.advance(task, n)


def print_json(result: Any, output: Path | None = None) -> None:
    """`result` as indented JSON on stdout, and also written to `output` when one is given."""
    text = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    typer.echo(text)
    if output:
        output.write_text(text + "\n")
