"""A real redis-server as a child process, for tests and local use.

with RedisServer() as redis:
    redis.url                          # redis://127.0.0.1:<port>/0, answering PING
    redis.stop(); redis.start()        # a restart on the same port: it comes back empty

python -m iros.testing.redis [PORT]      # run one until Ctrl+C

Nothing is persisted (no RDB snapshots, no append-only file); its working directory is temporary and
removed when it stops.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

from iros.testing.process import ChildProcess, ProcessFailed, free_port, port_argument

__all__ = ["REDIS_SERVER", "ProcessFailed", "RedisServer"]

REDIS_SERVER = "/usr/bin/redis-server"  # the Debian package's binary (apt-get install redis-server)


class RedisServer(ChildProcess):
    def __init__(self, *, port: int | None = None, binary: str = REDIS_SERVER) -> None:
        if not Path(binary).is_file():
            raise ProcessFailed(f"{binary} not found: apt-get install redis-server")
        self.workdir = Path(tempfile.mkdtemp(prefix="iros-redis-"))
        port = port or free_port()
        args = [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        super().__init__(args, port, name="redis-server", log_path=self.workdir / "redis.log")
        self.url = f"redis://127.0.0.1:{port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)  # again after a stop
        super().start(timeout)
        return self

    def __enter__(self) -> RedisServer:
        return self if self.running else self.start()

    def stop(self) -> int | None:
        status = super().stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return status

    def ping(self, timeout: float = 1.0) -> bool:
        """True if the server answers PING with PONG (not while it is still loading)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    # Redis speaks RESP, not HTTP: the health check is a PING.
    def _probe(self) -> str | None:
        try:
            return None if self.ping() else "no PONG"
        except OSError as exc:
            return str(exc)

    def _probed(self) -> str:
        return f"PING on port {self.port}"


def main(argv: Sequence[str] | None = None) -> None:
    redis = RedisServer(port=port_argument(argv, "redis", 6379))
    redis.serve_forever(f"Redis at {redis.url} (Ctrl+C stops it)")


if __name__ == "__main__":
    main()
