"""Bottleneck analysis: per-stage shares from stored spans, saturated resources, the slowed stage named."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from iros.analysis.bottlenecks import STAGE_GROUPS, analyse
from iros.metrics.store import Samples
from iros.metrics.tsdb.db import SQLiteStore
from iros.testing.iros import IrosProcess

START = 1_790_000_000.0
ADMIN = {"authorization": "Bearer sk-admin-b"}
CLIENT = {"authorization": "Bearer sk-client-b"}


def stage_samples(store: SQLiteStore, means: dict[str, float], n: int, rng: np.random.Generator) -> None:
    """n requests, each with every given stage drawn around its mean, and `other` closing the total."""
    ts = START + np.sort(rng.uniform(0, 600, n))
    for stage, mean in means.items():
        store.append({("stage_ms", (("stage", stage),)): Samples(ts, rng.gamma(4, mean / 4, n))})
    store.append({("stage_ms", (("stage", "other"),)): Samples(ts, np.full(n, 0.01))})


def run_analysis(tmp: Path, fill: Any, max_concurrency: int = 8) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        store = SQLiteStore(tmp / "metrics.db")
        await store.start()
        fill(store)
        await store.flush()
        try:
            return await analyse(store, START, START + 600, max_concurrency, cache_hit_rate=0.25)
        finally:
            await store.close()

    return asyncio.run(go())


BASE = {"auth": 0.05, "parse": 0.1, "cache": 0.02, "route": 0.01, "queue": 0.05, "respond": 0.1}


class TestStages:
    def test_shares_add_up_and_the_dominant_stage_is_named(self, tmp_path: Path) -> None:
        """Pipeline shares sum to one and a queue wait larger than everything else is the top bottleneck."""
        means = {**BASE, "queue": 400.0, "upstream_connect": 2.0, "upstream_ttft": 120.0, "stream": 60.0}
        out = run_analysis(tmp_path, lambda s: stage_samples(s, means, 400, np.random.default_rng(3)))
        shares = [g["share"] for g in out["stage_groups"].values()]
        assert sum(shares) == pytest.approx(1.0, abs=1e-3)
        assert out["requests"] == 400
        top = out["top_bottleneck"]
        assert top["kind"] == "stage" and top["name"] == "queue_wait"
        assert top["share"] == max(shares)
        assert "8 slots" in top["recommendation"]  # the configured limit, read from the call
        queue = next(r for r in out["stages"] if r["span"] == "queue")
        assert queue["p50_ms"] < queue["p95_ms"]
        assert queue["mean_ms"] == pytest.approx(400.0, rel=0.1)

    def test_a_slow_upstream_is_named_with_the_leading_iros_stage(self, tmp_path: Path) -> None:
        """When the model's time to first token dominates, it is named, and Iros's own largest stage too."""
        means = {**BASE, "upstream_connect": 1.0, "upstream_ttft": 900.0, "stream": 50.0, "parse": 3.0}
        out = run_analysis(tmp_path, lambda s: stage_samples(s, means, 300, np.random.default_rng(4)))
        top = out["top_bottleneck"]
        assert top["name"] == "upstream_ttft"
        assert "25%" in top["recommendation"]  # the cache hit rate it was given
        assert top["top_iros_stage"]["name"] == "auth_parsing"

    def test_a_saturated_resource_outranks_every_stage(self, tmp_path: Path) -> None:
        """A process CPU at nearly a whole core is the bottleneck, with a worker count from its value."""
        means = {**BASE, "upstream_ttft": 50.0}

        def fill(store: SQLiteStore) -> None:
            stage_samples(store, means, 100, np.random.default_rng(5))
            ts = START + np.arange(0, 600, 5.0)
            store.append({("process_cpu_percent", ()): Samples(ts, np.full(ts.size, 180.0))})

        out = run_analysis(tmp_path, fill)
        top = out["top_bottleneck"]
        assert top["kind"] == "resource" and top["name"] == "process_cpu_saturation"
        assert "run 3 workers" in top["recommendation"]  # ceil(180 / 70)
        cpu = next(r for r in out["resources"] if r["resource"] == "process_cpu_saturation")
        assert cpu["saturated"] and cpu["p95"] == pytest.approx(180.0, rel=0.02)

    def test_an_empty_window_names_nothing(self, tmp_path: Path) -> None:
        """Without requests there is no top bottleneck and the finding says why."""
        out = run_analysis(tmp_path, lambda s: None)
        assert out["top_bottleneck"] is None
        assert out["requests"] == 0
        assert any("no requests" in f for f in out["findings"])
        assert set(out["stage_groups"]) == set(STAGE_GROUPS)


@pytest.fixture(scope="module")
def slow_upstream() -> Iterator[IrosProcess]:
    with IrosProcess.mock_upstream("large") as proc:
        yield proc


def serve(upstream: IrosProcess, concurrency: int) -> IrosProcess:
    return IrosProcess.serve(
        {
            "server": {"host": "127.0.0.1", "max_concurrency": concurrency, "max_queue": 32},
            "auth": {"api_keys": ["sk-client-b"], "admin_keys": ["sk-admin-b"]},
            "models": [{"name": "slow", "base_url": f"{upstream.url}/v1", "upstream_model": "large"}],
        }
    )


def traffic(url: str, n: int) -> None:
    body = {"model": "slow", "stream": True, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}

    def one(i: int) -> int:
        with httpx.Client(base_url=url, timeout=30) as client:
            return client.post("/v1/chat/completions", json=body, headers=CLIENT).status_code

    with ThreadPoolExecutor(n) as pool:
        assert list(pool.map(one, range(n))) == [200] * n


def top_after(url: str, n: int) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    with httpx.Client(base_url=url, timeout=30) as client:
        while True:
            out = client.get("/api/analysis/bottlenecks", headers=ADMIN).json()
            if out["requests"] >= n or time.monotonic() > deadline:
                assert out["requests"] == n
                return dict(out)
            time.sleep(0.3)


@pytest.mark.e2e
class TestLiveServer:
    def test_a_slow_model_is_named_as_upstream_ttft(self, slow_upstream: IrosProcess) -> None:
        """Against a model server with a long time to first token, that stage is the top bottleneck."""
        with serve(slow_upstream, 16) as iros:
            traffic(iros.url, 6)
            out = top_after(iros.url, 6)
        # A busy test machine can make this process's own CPU (start-up included) the top finding: the
        # slowed stage must still lead the stages, and lead overall whenever a stage does.
        groups = out["stage_groups"]
        assert max(groups, key=lambda g: groups[g]["share"] or 0) == "upstream_ttft"
        assert groups["upstream_ttft"]["share"] > 0.5
        if out["top_bottleneck"]["kind"] == "stage":
            assert out["top_bottleneck"]["name"] == "upstream_ttft"

    def test_the_same_model_behind_one_slot_is_a_queue_bottleneck(self, slow_upstream: IrosProcess) -> None:
        """With one concurrency slot and parallel clients, the queue wait becomes the named bottleneck."""
        with serve(slow_upstream, 1) as iros:
            traffic(iros.url, 6)
            out = top_after(iros.url, 6)
        top = out["top_bottleneck"]
        groups = out["stage_groups"]
        assert max(groups, key=lambda g: groups[g]["share"] or 0) == "queue_wait"
        if top["kind"] == "stage":  # see above: a busy machine may put this process's CPU first
            assert top["name"] == "queue_wait"
            assert "1 slots" in top["recommendation"]
        queue = next(r for r in out["stages"] if r["span"] == "queue")
        ttft = next(r for r in out["stages"] if r["span"] == "upstream_ttft")
        assert queue["mean_ms"] > ttft["mean_ms"]


class TestSideStages:
    def test_timed_embeddings_reach_the_store_as_a_stage(self, tmp_path: Path) -> None:
        """Each embedding call through TimedEmbedder is stored as an `embedding` stage sample."""
        from iros.cache.embedder import TimedEmbedder
        from iros.config import Settings
        from iros.core.admission import Admission
        from iros.metrics.monitor import Monitor
        from iros.metrics.store import Query

        class SlowEmbedder:
            """A stand-in for an embedding server on another machine: answers after a pause."""

            name, dim = "slow", 4

            async def start(self) -> None: ...

            async def embed(self, texts: list[str]) -> Any:
                await asyncio.sleep(0.02)
                return np.ones((len(texts), self.dim), dtype=np.float32)

            async def aclose(self) -> None: ...

        settings = Settings(
            models=[{"name": "m", "backend": "simulated"}], server={"data_dir": str(tmp_path)}
        )

        async def go() -> list[Any]:
            monitor = Monitor(settings, Admission(4, 4, 1.0))
            await monitor.start()
            embedder = TimedEmbedder(SlowEmbedder(), monitor.collector.note_stage)
            for _ in range(3):
                await embedder.embed(["a question"])
            await monitor.collector.ingest()
            await monitor.store.flush()
            now = time.time()
            points = await monitor.store.query(
                Query("stage_ms", now - 60, now + 1, 61, (("stage", "embedding"),))
            )
            await monitor.close()
            return points

        points = asyncio.run(go())
        assert sum(p.count for p in points) == 3
        # A lower bound only (the pause the stand-in takes): load can lengthen it, never shorten it.
        assert all(p.min is not None and p.min >= 19.0 for p in points if p.count)
