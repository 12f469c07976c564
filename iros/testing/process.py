"""Child processes that serve HTTP on loopback: started, awaited until healthy, always stopped.

    with ChildProcess([sys.executable, "-m", "iros", "serve", ...], port, health="/health") as child:
        urllib.request.urlopen(child.url + "/v1/models")

Used by the benchmarks (nginx, Iros) and by the tests (Iros, the mock upstream).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Self


def free_port() -> int:
    # The kernel picks a free port; the short window before the child binds it again is accepted.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(no output)"


class ProcessFailed(RuntimeError):
    """The child exited or never answered; the message carries the tail of its output."""


class ChildProcess:
    def __init__(
        self,
        args: Sequence[str],
        port: int,
        *,
        health: str = "/health",
        name: str | None = None,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        stop_timeout: float = 10.0,
    ) -> None:
        self.args = list(args)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.health = health
        self.name = name or Path(self.args[0]).name
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="iros-child-", suffix=".log")[1])
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 20.0) -> Self:
        self._log = self.log_path.open("wb")
        try:
            # A session of its own: a terminal's Ctrl+C reaches only the parent, which stops children in
            # order, and a stop reaches the child's own children (nginx workers) through the process group.
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        except BaseException:
            self._log.close()  # a program that cannot start (missing, not executable) leaves no open file
            raise
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _probe(self) -> str | None:
        """None when the process answers its health check, else what it answered."""
        try:
            with urllib.request.urlopen(self.url + self.health, timeout=1.0) as response:
                return None if response.status == 200 else f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            exc.close()
            return f"HTTP {exc.code}"
        except OSError as exc:
            return str(exc)

    def _probed(self) -> str:
        return f"{self.url}{self.health}"

    def _wait_healthy(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        last: str | None = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ProcessFailed(
                    f"{self.name} exited with status {self.proc.returncode} while starting; its output:\n"
                    f"{self.output_tail()}"
                )
            last = self._probe()
            if last is None:
                return
            time.sleep(0.05)
        raise ProcessFailed(
            f"{self.name} did not answer {self._probed()} within {timeout:g}s (last: {last}); "
            f"its output:\n{self.output_tail()}"
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.running:
            self.proc.send_signal(sig)

    def stop(self) -> int | None:
        """SIGTERM the process group, then SIGKILL it if it lingers. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(self.stop_timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def output(self) -> str:
        if self._log is not None:
            self._log.flush()
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def output_tail(self, lines: int = 30) -> str:
        if self._log is not None:
            self._log.flush()
        return tail(self.log_path, lines)

    def serve_forever(self, banner: str) -> None:
        """Start, print `banner`, and keep running until Ctrl+C (the `python -m iros.testing.redis` way).
        If the process dies meanwhile, exit with its output."""
        with self:
            print(banner, file=sys.stderr)
            try:
                while self.running:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
            if not self.running:
                raise SystemExit(f"{self.name} exited:\n{self.output_tail()}")

    def __enter__(self) -> Self:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def port_argument(argv: Sequence[str] | None, module: str, default: int) -> int:
    """The optional PORT of `python -m iros.testing.<module> [PORT]`; a usage line and exit 2 otherwise."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or (args and not args[0].isdigit()):
        print(f"usage: python -m iros.testing.{module} [PORT]   (default {default})", file=sys.stderr)
        raise SystemExit(2)
    return int(args[0]) if args else default
