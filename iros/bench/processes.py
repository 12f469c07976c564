"""The processes a benchmark runs, and their lifetime: nginx as a zero-cost upstream, Iros as a child.

with sigterm_as_interrupt(), bench_workdir(None) as workdir:    # a temp dir, removed at the end
    nginx = start_nginx(workdir)                             # answers COMPLETION at /v1/chat/completions
    iros = start_iros(workdir, nginx.port, workers=1)        # `iros serve` in front of it, cache off
    ...; iros.stop(); nginx.stop()

check_tools() raises BenchError, saying what to install, when wrk or nginx is missing.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from iros.testing.process import ChildProcess, ProcessFailed, free_port

INSTALL_HINT = "install it with `apt-get install wrk nginx-light` (Debian/Ubuntu) or run ./scripts/install"
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

_STOP_TIMEOUT = 5.0


class BenchError(Exception):
    """A failure the user can act on; the message says what to do."""


def _find(name: str, extra_dirs: tuple[str, ...] = ()) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in extra_dirs:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_tools() -> tuple[str, str]:
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
    find_tools()


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


def start_child(child: ChildProcess, timeout: float) -> ChildProcess:
    try:
        return child.start(timeout)
    except ProcessFailed as exc:
        raise BenchError(str(exc)) from None


def start_nginx(workdir: Path, nginx: str | None = None, max_connections: int = 64) -> ChildProcess:
    """Start the zero-cost upstream; the caller stops it."""
    nginx = nginx or find_tools()[1]
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
    return start_child(child, 10.0)


def iros_config(
    port: int, upstream_port: int, data_dir: Path, metrics: bool = True, cache: bool = False
) -> str:
    return (
        f"server: {{host: 127.0.0.1, port: {port}, data_dir: {orjson.dumps(str(data_dir)).decode()}, "
        # The load generator is one address by design: no per-address connection cap.
        "max_connections_per_address: 0}\n"
        "auth: {open: true}\n"
        f"metrics_collection: {{enabled: {str(metrics).lower()}}}\n"
        # The same request again and again: with the cache on this would measure cache hits (so the cache
        # is on, as configured by default, only for a load whose every prompt differs), and with
        # single-flight, concurrent copies would share one upstream call.
        + ("" if cache else "cache: {enabled: false}\n")
        + "optimization: {single_flight: false}\n"
        "models:\n"
        f'  - {{name: {MODEL}, backend: openai, base_url: "http://127.0.0.1:{upstream_port}/v1"}}\n'
    )


def start_iros(
    workdir: Path,
    upstream_port: int,
    workers: int = 1,
    metrics: bool = True,
    name: str = "iros",
    env: dict[str, str] | None = None,
    cache: bool = False,
) -> ChildProcess:
    port = free_port()
    conf = workdir / f"{name}.yaml"
    conf.write_text(iros_config(port, upstream_port, workdir / f"{name}-data", metrics, cache))
    cmd = [sys.executable, "-m", "iros", "serve", "--config", str(conf), "--port", str(port)]
    if workers != 1:
        cmd += ["--workers", str(workers)]
    child = ChildProcess(
        cmd,
        port,
        name="Iros (`iros serve`)",
        env=env,
        log_path=workdir / f"{name}.log",
        stop_timeout=_STOP_TIMEOUT,
    )
    return start_child(child, 20.0)


# -------------------------------------------------------------------------------------- a run's life


@contextlib.contextmanager
def bench_workdir(keep_dir: Path | None) -> Iterator[Path]:
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
def sigterm_as_interrupt() -> Iterator[None]:
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
