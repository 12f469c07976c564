"""Helpers for tests that run Iros and its peers as real processes on real sockets.

with IrosProcess.serve({"auth": {"open": True}, "models": [...]}) as iros:   # `iros serve`, a child
    httpx.get(f"{iros.url}/health")
with IrosProcess.mock_upstream("lightweight") as upstream:                    # `iros mock-upstream`
    ...
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from iros.testing.process import ChildProcess, ProcessFailed, free_port

__all__ = ["IrosProcess", "ProcessFailed", "free_port", "wait_until"]


class IrosProcess(ChildProcess):
    @classmethod
    def serve(
        cls, config: Path | dict[str, Any], port: int | None = None, extra: Sequence[str] = (), **kw: Any
    ) -> IrosProcess:
        port = port or free_port()
        if isinstance(config, dict):
            # Each test server keeps its state (metrics history, ...) in a directory of its own.
            server = {"data_dir": tempfile.mkdtemp(prefix="iros-data-"), **config.get("server", {})}
            # Tests that are not about the cache see every request reach the model; cache tests say so.
            cache = {"enabled": False, **config.get("cache", {})}
            config = {**config, "server": server, "cache": cache}
            path = Path(tempfile.mkstemp(prefix="iros-", suffix=".yaml")[1])
            path.write_text(yaml.safe_dump(config))
            config = path
        args = [sys.executable, "-m", "iros", "serve", "--config", str(config), "--port", str(port), *extra]
        return cls(args, port, name="iros serve", **kw)

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
        return cls(args, port, name="iros mock-upstream", **kw)


_T = TypeVar("_T")


def wait_until(
    check: Callable[[], _T], what: str = "the condition", timeout: float = 15.0, interval: float = 0.1
) -> _T:
    """Poll `check` until it returns something truthy, and return that; an AssertionError naming `what`
    (and the last value) after `timeout` seconds.

    alert = wait_until(lambda: active(proc, "high_cpu"), "the alert to fire", timeout=30)
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last value {result!r}")
        time.sleep(interval)
