"""Helpers for tests and benchmarks that run Iros and its peers as real processes on real sockets.

with IrosProcess.serve(config_path) as iros:       # `iros serve` in a child process
    httpx.get(f"{iros.url}/health")
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ProcessFailed(RuntimeError):
    pass


class IrosProcess:
    """A child process serving HTTP on 127.0.0.1:port; its output goes to a log file."""

    def __init__(
        self,
        args: Sequence[str],
        port: int,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        health: str = "/health",
    ) -> None:
        self.args = list(args)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.health = health
        self._env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="iros-", suffix=".log")[1])
        self._log: IO[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def serve(cls, config: Path | dict[str, Any], port: int | None = None, **kw: Any) -> IrosProcess:
        port = port or free_port()
        if isinstance(config, dict):
            path = Path(tempfile.mkstemp(prefix="iros-", suffix=".yaml")[1])
            path.write_text(yaml.safe_dump(config))
            config = path
        return cls(
            [sys.executable, "-m", "iros", "serve", "--config", str(config), "--port", str(port)], port, **kw
        )

    @classmethod
    def mock_upstream(
        cls, profile: str = "lightweight", port: int | None = None, *extra: str, **kw: Any
    ) -> IrosProcess:
        port = port or free_port()
        args = [
            sys.executable,
            "-m",
            "iros",
            "mock-upstream",
            "--port",
            str(port),
            "--profile",
            profile,
            *extra,
        ]
        return cls(args, port, **kw)

    def start(self, timeout: float = 20.0) -> IrosProcess:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self._env, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ProcessFailed(
                    f"{' '.join(self.args)} exited with {self.proc.returncode}:\n{self.output()}"
                )
            try:
                with urllib.request.urlopen(self.url + self.health, timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        self.stop()
        raise ProcessFailed(
            f"{' '.join(self.args)} did not answer {self.health} in {timeout}s:\n{self.output()}"
        )

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log:
            self._log.close()
        return self.proc.returncode

    def output(self) -> str:
        if self._log:
            self._log.flush()
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> IrosProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def running(*processes: IrosProcess) -> Iterator[tuple[IrosProcess, ...]]:
    started: list[IrosProcess] = []
    try:
        for p in processes:
            started.append(p.start())
        yield processes
    finally:
        for p in reversed(started):
            p.stop()
