"""A real Alertmanager as a child process: for tests and local use of the alertmanager channel.

with AlertmanagerServer() as am:
    am.url                      # http://127.0.0.1:<port>; point an alertmanager channel at it
    am.alerts()                 # GET /api/v2/alerts: what it holds now

python -m iros.testing.alertmanager      # run one until Ctrl+C

It routes everything to a receiver with no integrations (it only holds and groups the alerts); its
configuration and state live in a temporary directory removed when it stops.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from iros.testing.process import ChildProcess, ProcessFailed, free_port

__all__ = ["ALERTMANAGER", "AlertmanagerServer"]

ALERTMANAGER = "/usr/bin/prometheus-alertmanager"  # the Debian package's binary (scripts/install --system)


class AlertmanagerServer(ChildProcess):
    def __init__(self, *, port: int | None = None, binary: str = ALERTMANAGER) -> None:
        if not Path(binary).is_file():
            raise ProcessFailed(
                f"{binary} not found: install the Debian package with scripts/install --system "
                "(or apt-get install prometheus-alertmanager)"
            )
        self.workdir = Path(tempfile.mkdtemp(prefix="iros-alertmanager-"))
        config = {
            "route": {"receiver": "hold", "group_by": ["alertname"], "group_wait": "1s"},
            "receivers": [{"name": "hold"}],
        }
        (self.workdir / "alertmanager.yml").write_text(yaml.safe_dump(config))
        port = port or free_port()
        args = [
            binary,
            f"--config.file={self.workdir / 'alertmanager.yml'}",
            f"--storage.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",  # one instance: no gossip port
            "--log.level=warn",
        ]
        super().__init__(args, port, health="/-/ready", name="alertmanager")

    def alerts(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=5) as response:
            data: list[dict[str, Any]] = json.loads(response.read())
        return data

    def stop(self) -> int | None:
        try:
            return super().stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


if __name__ == "__main__":
    server = AlertmanagerServer(port=int(sys.argv[1]) if len(sys.argv) > 1 else 9093)
    server.serve_forever(f"alertmanager on {server.url}")
