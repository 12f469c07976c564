"""A real Prometheus server as a child process, scraping given targets: for tests and local use.

with PrometheusServer(["http://127.0.0.1:8080"], scrape_interval="1s") as prom:
    prom.url                                   # http://127.0.0.1:<port>, ready to query
    prom.wait_for_targets_up()                 # every target scraped successfully at least once
    prom.instant("sum(iros_request_duration_seconds_count)")

python -m iros.testing.prometheus http://127.0.0.1:8080      # run one until Ctrl+C

Its configuration and TSDB live in a temporary directory that is removed when it stops; start() after
stop() runs it again on the same port, empty (tests of Iros with its history backend down and back).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from iros.testing.process import ChildProcess, ProcessFailed, free_port

__all__ = ["PROMETHEUS", "ProcessFailed", "PrometheusServer"]

PROMETHEUS = "/usr/bin/prometheus"  # the Debian package's binary (scripts/install --system)


def _target(target: str) -> tuple[str, str, str]:
    """("http", "127.0.0.1:8080", "/metrics") from a URL or a bare host:port."""
    parsed = urllib.parse.urlsplit(target if "://" in target else f"http://{target}")
    if not parsed.netloc:
        raise ValueError(f"scrape target {target!r} has no host:port")
    return parsed.scheme, parsed.netloc, parsed.path if parsed.path not in ("", "/") else "/metrics"


class PrometheusServer(ChildProcess):
    def __init__(
        self,
        targets: Sequence[str],
        *,
        port: int | None = None,
        scrape_interval: str = "1s",
        job: str = "iros",
        binary: str = PROMETHEUS,
        retention: str = "1d",
        bearer_token: str | None = None,
    ) -> None:
        if not targets:
            raise ValueError("give at least one target to scrape")
        if not Path(binary).is_file():
            raise ProcessFailed(
                f"{binary} not found: install the Debian package with scripts/install --system "
                "(or apt-get install prometheus)"
            )
        self.workdir = Path(tempfile.mkdtemp(prefix="iros-prometheus-"))
        self.config_path = self.workdir / "prometheus.yml"
        self._config = self.config(targets, scrape_interval, job)
        self._bearer_token = bearer_token
        if bearer_token:
            for scrape in self._config["scrape_configs"]:
                scrape["authorization"] = {"type": "Bearer", "credentials_file": str(self.workdir / "token")}
        port = port or free_port()
        args = [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--storage.tsdb.retention.time={retention}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        super().__init__(
            args, port, health="/-/ready", name="prometheus", log_path=self.workdir / "prometheus.log"
        )

    @staticmethod
    def config(targets: Sequence[str], scrape_interval: str, job: str) -> dict[str, Any]:
        # One job per scheme and path: a scrape config holds a single metrics_path.
        jobs: dict[tuple[str, str], list[str]] = {}
        for target in targets:
            scheme, hostport, path = _target(target)
            jobs.setdefault((scheme, path), []).append(hostport)
        scrape_configs = [
            {
                "job_name": job if i == 0 else f"{job}-{i}",
                "scheme": scheme,
                "metrics_path": path,
                "static_configs": [{"targets": hosts}],
            }
            for i, ((scheme, path), hosts) in enumerate(jobs.items())
        ]
        # Left unset, scrape_timeout is clamped to scrape_interval, which is what fast tests want.
        return {"global": {"scrape_interval": scrape_interval}, "scrape_configs": scrape_configs}

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        """Start, or start again after stop() on the same port (with an empty TSDB)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._bearer_token:
            # Iros's /metrics needs the admin key; Prometheus reads it from a file only it can read.
            token = self.workdir / "token"
            token.touch(mode=0o600)
            token.write_text(self._bearer_token)
        self.config_path.write_text(yaml.safe_dump(self._config))
        super().start(timeout)
        return self

    def __enter__(self) -> PrometheusServer:
        return self if self.running else self.start()

    def stop(self) -> int | None:
        status = super().stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return status

    def api(self, path: str, params: dict[str, str] | None = None, timeout: float = 5.0) -> Any:
        """GET an /api/v1 path and return its `data`; an error answer raises RuntimeError."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=timeout) as response:
                doc = json.load(response)
        except urllib.error.HTTPError as exc:
            with exc:
                doc = json.load(exc)
        if doc.get("status") != "success":
            raise RuntimeError(f"Prometheus: {doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]

    def instant(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query, at now or at unix time `at`: [{"metric": {...}, "value": [ts, "v"]}, ...]."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = self.api("query", params)
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_for_targets_up(self, timeout: float = 15.0) -> None:
        """Until every target has been scraped successfully: the first samples are in."""
        deadline = time.monotonic() + timeout
        last = "no targets yet"
        while time.monotonic() < deadline:
            active = self.api("targets", {"state": "active"})["activeTargets"]
            if active and all(t["health"] == "up" for t in active):
                return
            last = "; ".join(f"{t['scrapeUrl']}: {t['health']} {t['lastError']}".strip() for t in active)
            time.sleep(0.1)
        raise ProcessFailed(f"Prometheus targets not up within {timeout:g}s ({last or 'none'})")


def main(argv: Sequence[str] | None = None) -> None:
    targets = list(sys.argv[1:] if argv is None else argv)
    if not targets:
        print(
            "usage: python -m iros.testing.prometheus URL [URL...]   (e.g. http://127.0.0.1:8080)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    prom = PrometheusServer(targets, port=9090)
    prom.serve_forever(f"Prometheus at {prom.url}, scraping {', '.join(targets)} (Ctrl+C stops it)")


if __name__ == "__main__":
    main()
