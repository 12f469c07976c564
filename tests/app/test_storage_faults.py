"""Iros's storage failing under it, end to end: real `iros serve` processes over a real redis-server, a real
Prometheus, a real (tiny) filesystem and a real SIGKILL.

Each fault is one test: the requests keep being served, the status endpoints say what is wrong, and the
store works again once the fault is gone. After kill -9 every SQLite file in the data directory is checked
(alerts.db included); that the alert state itself is kept belongs to the alerting tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from iros.testing.iros import IrosProcess, ProcessFailed, free_port, wait_until
from iros.testing.prometheus import PrometheusServer
from iros.testing.redis import RedisServer
from tests.conftest import stale_database

pytestmark = pytest.mark.e2e

CLIENT_KEY = "sk-faults-client"
ADMIN_KEY = "sk-faults-admin"
CLIENT = {"authorization": f"Bearer {CLIENT_KEY}"}
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def config(data_dir: Path, **extra: Any) -> dict[str, Any]:
    """An Iros with one in-process simulated model, the exact cache on, history flushed every second."""
    base: dict[str, Any] = {
        "server": {"data_dir": str(data_dir)},
        "auth": {"api_keys": [CLIENT_KEY], "admin_keys": [ADMIN_KEY]},
        "models": [{"name": "local", "backend": "simulated", "profile": "instant"}],
        "cache": {"enabled": True, "semantic": False},
        "metrics_collection": {
            "collection_interval_seconds": 1,
            "live_interval_seconds": 0.2,
            "storage": {"flush_interval_seconds": 1},
        },
    }
    return {**base, **extra}


def ask(iros: IrosProcess, text: str) -> httpx.Response:
    body = {
        "model": "local",
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        "max_tokens": 256,
    }
    return httpx.post(f"{iros.url}/v1/chat/completions", json=body, headers=CLIENT, timeout=15)


def get(iros: IrosProcess, path: str, **params: str) -> httpx.Response:
    return httpx.get(f"{iros.url}{path}", params=params, headers=ADMIN, timeout=15)


def cache_store(iros: IrosProcess) -> dict[str, Any]:
    resp = get(iros, "/api/optimization/cache")
    assert resp.status_code == 200, resp.text
    store: dict[str, Any] = resp.json()["store"]
    return store


def metrics_store(iros: IrosProcess) -> dict[str, Any]:
    resp = get(iros, "/api/metrics/store")
    assert resp.status_code == 200, resp.text
    stats: dict[str, Any] = resp.json()["stats"]
    return stats


def repeated_until_hit(iros: IrosProcess, text: str, timeout: float = 10.0) -> None:
    """Asks, then asks again until the answer comes from the cache (the first is saved in the background)."""

    def hit() -> bool:
        resp = ask(iros, text)
        assert resp.status_code == 200, resp.text
        return resp.headers["x-iros-cache"] == "hit"

    assert not hit(), f"{text!r} was a hit the first time"
    wait_until(hit, f"a repeat of {text!r} to be a cache hit", timeout)


def history_count(iros: IrosProcess, since: float) -> int:
    """How many responses of `local` /api/metrics/historical counts since `since`."""
    resp = get(
        iros, "/api/metrics/historical", metric="response_time", start=str(since), step="1s", model="local"
    )
    assert resp.status_code == 200, resp.text
    points = resp.json()["series"]["response_time_ms"]["points"]
    return int(sum(p["count"] for p in points))


# ------------------------------------------------------------------------------------------ Redis


def test_redis_down_bypasses_the_cache_and_it_works_again_when_redis_returns(tmp_path: Path) -> None:
    """With redis-server stopped every request is still answered, the cache status says the store is
    unavailable, and once Redis is back a repeated request is a hit again."""
    redis = RedisServer()
    with redis:
        store = {"backend": "redis", "url": redis.url, "prefix": f"faults:{uuid.uuid4().hex[:8]}"}
        with IrosProcess.serve(
            config(tmp_path, cache={"enabled": True, "semantic": False, "store": store})
        ) as iros:
            repeated_until_hit(iros, "before the outage")
            assert cache_store(iros)["status"] == "ok"

            redis.stop()
            for text in ("before the outage", "during the outage", "during the outage"):
                resp = ask(iros, text)
                assert resp.status_code == 200, resp.text
                assert resp.headers["x-iros-cache"] != "hit"
                assert resp.json()["choices"][0]["message"]["content"]
            down = cache_store(iros)
            assert down["status"] == "unavailable"
            assert redis.url.removesuffix("/0") in down["error"] and "unavailable" in down["error"]
            assert "cache lookup failed, going upstream" in iros.output()

            redis.start()  # the same port, empty
            wait_until(lambda: cache_store(iros)["status"] == "ok", "the cache status to see Redis again")
            repeated_until_hit(iros, "after the outage")


# ------------------------------------------------------------------------------------------ Prometheus


def test_prometheus_down_is_a_clear_503_and_chat_is_unaffected(tmp_path: Path) -> None:
    """With the Prometheus history backend stopped, /api/metrics/historical answers 503 in the OpenAI error
    format naming the unreachable backend, chat completions still succeed, and history answers again once
    Prometheus is back."""
    port = free_port()
    storage = {"backend": "prometheus", "endpoint": f"http://127.0.0.1:{port}", "timeout_seconds": 2}
    settings = config(tmp_path)
    settings["metrics_collection"] = {**settings["metrics_collection"], "storage": storage}
    with IrosProcess.serve(settings) as iros:
        prom = PrometheusServer([iros.url], port=port, scrape_interval="1s", bearer_token=ADMIN_KEY)
        with prom:
            prom.wait_for_targets_up()
            assert ask(iros, "scraped").status_code == 200
            assert get(iros, "/api/metrics/historical", metric="response_time").status_code == 200

            prom.stop()
            down = get(iros, "/api/metrics/historical", metric="response_time")
            assert down.status_code == 503
            error = down.json()["error"]
            assert error["code"] == "store_unavailable" and error["type"]
            assert f"Prometheus at http://127.0.0.1:{port}" in error["message"]
            assert "history backend" in error["message"] and "unreachable" in error["message"]
            for i in range(3):
                resp = ask(iros, f"while Prometheus is down {i}")
                assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"]

            prom.start()
            wait_until(
                lambda: get(iros, "/api/metrics/historical", metric="response_time").status_code == 200,
                "the history API to answer again",
            )


# ------------------------------------------------------------------------------------------ full disk


@contextlib.contextmanager
def tiny_filesystem(where: Path, size: str = "3m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` (needs root, as in CI's container)."""
    where.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem is full; returns it (delete it to free the space)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    free = shutil.disk_usage(directory).free
    assert free < 65536, f"the filesystem still has {free} bytes free"
    return filler


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root")
def test_a_full_disk_is_reported_and_requests_are_still_served(tmp_path: Path) -> None:
    """With the data directory's filesystem full, requests are answered (cached ones from memory), both
    SQLite stores report the write error in their status, nothing crashes, and writes resume when space
    comes back."""
    with tiny_filesystem(tmp_path / "data") as data, IrosProcess.serve(config(data)) as iros:
        repeated_until_hit(iros, "before the disk fills")
        wait_until(lambda: cache_store(iros)["pending_writes"] == 0, "the cache entry to be written")

        filler = fill(data)
        since = time.time() - 1
        for i in range(5):
            repeated_until_hit(iros, f"on a full disk {i}")
        wait_until(
            lambda: cache_store(iros)["status"] == "unwritable", "the cache store to report the full disk"
        )
        wait_until(lambda: metrics_store(iros)["last_error"] is not None, "the metrics store to report it")
        cache, metrics = cache_store(iros), metrics_store(iros)
        assert "full" in cache["last_error"].lower() and cache["pending_writes"] >= 5
        assert "full" in metrics["last_error"].lower() and metrics["pending"] > 0
        assert iros.running
        log = iros.output()
        assert "cannot be written" in log and str(data) in log

        filler.unlink()
        wait_until(lambda: cache_store(iros)["status"] == "ok", "cache writes to resume")
        wait_until(lambda: metrics_store(iros)["last_error"] is None, "metrics writes to resume")
        assert cache_store(iros)["pending_writes"] == 0
        wait_until(lambda: history_count(iros, since) >= 10, "the queued history to be written")


# ------------------------------------------------------------------------------------------ kill -9


def integrity(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        result: str = conn.execute("PRAGMA integrity_check").fetchone()[0]
        return result


def test_kill_9_keeps_the_cache_and_the_history(tmp_path: Path) -> None:
    """After SIGKILL, a restart on the same data directory finds both SQLite databases intact, the cached
    answer still a hit, and the history written before the kill still readable."""
    since = time.time() - 1
    with IrosProcess.serve(config(tmp_path)) as iros:
        first = ask(iros, "survive a kill")
        assert first.status_code == 200 and first.headers["x-iros-cache"] == "miss"
        for i in range(4):
            assert ask(iros, f"history {i}").status_code == 200
        wait_until(lambda: cache_store(iros)["pending_writes"] == 0, "the cache entries to be written")
        wait_until(lambda: history_count(iros, since) >= 5, "the history to be written")
        iros.signal(signal.SIGKILL)
        assert iros.proc is not None and iros.proc.wait(10) == -signal.SIGKILL

    # Every database in the data directory: the cache and history, and whatever else keeps state there
    # (alert state, reports), so a new SQLite file is checked without this test changing.
    sqlite_files = sorted(tmp_path.glob("*.db"))
    assert {"cache.db", "metrics.db"} <= {p.name for p in sqlite_files}
    for path in sqlite_files:
        assert integrity(path) == "ok", path

    with IrosProcess.serve(config(tmp_path)) as again:
        replay = ask(again, "survive a kill")
        assert replay.status_code == 200 and replay.headers["x-iros-cache"] == "hit"
        assert replay.json()["choices"] == first.json()["choices"]
        assert history_count(again, since) >= 5


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs needs root")
def test_starting_on_a_full_disk_says_what_to_do(tmp_path: Path) -> None:
    """With no space left under the data directory at start, Iros refuses to start with one clear line
    naming the directory and what to do, rather than serving without its stores."""
    with tiny_filesystem(tmp_path / "data") as data:
        filler = fill(data)
        iros = IrosProcess.serve(config(data))
        with pytest.raises(ProcessFailed):
            iros.start(timeout=60)
        message = iros.output()
        assert f"cannot start: the data directory {data} is not usable" in message
        assert "free space there" in message
        filler.unlink()


def test_a_stale_metrics_database_is_refused_at_start_with_what_to_do(tmp_path: Path) -> None:
    """A metrics.db that says schema version 1 in an older layout (a pre-release build's) stops the start
    with one line naming the file and the fix, instead of serving while every write fails."""
    data = tmp_path / "data"
    stale_database(data / "metrics.db", "CREATE TABLE rollups (series_id INTEGER, res INTEGER)")
    iros = IrosProcess.serve(config(data))
    with pytest.raises(ProcessFailed):
        iros.start(timeout=60)
    message = iros.output()
    assert f"cannot start: metrics store {data / 'metrics.db'} cannot be used" in message
    assert "table rollups lacks" in message and "buckets" in message
    assert "Move the file aside" in message
