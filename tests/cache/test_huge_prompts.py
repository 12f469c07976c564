"""One tenant's huge prompt never stalls another's (issue 20, 1): against a real `iros serve` with the
semantic cache on, an 8 MB prompt in flight leaves other tenants' requests prompt, and memory stays flat
over repeats."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest
from aiohttp import web

from iros.testing.iros import IrosProcess, free_port, wait_until
from tests.cache.test_engine import ADMIN, OTHER_KEY
from tests.conftest import ADMIN_KEY, CLIENT_KEY, serve_in_thread

pytestmark = pytest.mark.e2e

HUGE_CHARS = 8_000_000  # under max_body_bytes (8 MiB) as JSON


async def _answer(request: web.Request) -> web.Response:
    # A real upstream reads the whole prompt; this one keeps none of it (read() stops at 1 MB).
    async for _ in request.content.iter_chunked(2**20):
        pass
    message = {"role": "assistant", "content": "an answer"}
    return web.json_response(
        {
            "id": "chatcmpl-up",
            "object": "chat.completion",
            "created": 1,
            "model": "up",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }
    )


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IrosProcess]:
    port = free_port()
    serve_in_thread(port, [web.post("/v1/chat/completions", _answer)])
    config: dict[str, Any] = {
        "server": {"data_dir": str(tmp_path_factory.mktemp("huge-data"))},
        "auth": {
            "api_keys": [{"name": "team-a", "key": CLIENT_KEY}, {"name": "team-b", "key": OTHER_KEY}],
            "admin_keys": [{"name": "ops", "key_env": "TEST_ADMIN_KEY"}],
        },
        "retry": {"attempts": 1},
        "models": [{"name": "up", "base_url": f"http://127.0.0.1:{port}/v1"}],
        "cache": {"enabled": True, "semantic": True},
    }
    with IrosProcess.serve(config, env={"TEST_ADMIN_KEY": ADMIN_KEY}) as proc:
        # The model loads after start (tolerant of a busy test machine: each poll may take a while).
        wait_until(
            lambda: httpx.get(f"{proc.url}/api/optimization/cache", headers=ADMIN, timeout=30).json()[
                "semantic_ready"
            ],
            "the semantic cache to be ready",
            timeout=120,
        )
        yield proc


def ask(proc: IrosProcess, text: str, key: str, client: httpx.Client) -> httpx.Response:
    body = {"model": "up", "messages": [{"role": "user", "content": text}], "temperature": 0}
    return client.post(
        f"{proc.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=60
    )


def huge(n: int) -> str:
    """A different 8 MB prompt for each n, made of ordinary words (what tokenizing costs most for)."""
    words = f"Request {n}: please summarise the following report about harbour logistics. "
    return (words * (HUGE_CHARS // len(words) + 1))[:HUGE_CHARS]


def rss_mb(proc: IrosProcess) -> float:
    assert proc.proc is not None
    return psutil.Process(proc.proc.pid).memory_info().rss / 2**20


def test_a_huge_prompt_does_not_stall_another_tenant(gateway: IrosProcess) -> None:
    """While team-a's 8 MB prompts are in flight, team-b's new questions (each a semantic lookup, which
    needs the embedder) and its repeats (exact hits) are answered promptly, and so are the huge ones."""
    repeated = "What are the opening hours of the harbour office?"
    with httpx.Client() as client:
        assert ask(gateway, repeated, OTHER_KEY, client).status_code == 200
    results: list[int] = []

    def tenant_a() -> None:
        with httpx.Client() as client:
            for n in range(3):
                results.append(ask(gateway, huge(n), CLIENT_KEY, client).status_code)

    sender = threading.Thread(target=tenant_a)
    sender.start()
    slowest, kinds, n = 0.0, [], 0
    with httpx.Client() as client:
        while sender.is_alive():
            n += 1
            for text in (f"How many ships can berth {n} hold at the harbour?", repeated):
                started = time.perf_counter()
                resp = ask(gateway, text, OTHER_KEY, client)
                slowest = max(slowest, time.perf_counter() - started)
                assert resp.status_code == 200
                kinds.append(resp.headers["x-iros-cache"])
            time.sleep(0.02)
    sender.join()
    assert results == [200, 200, 200]
    assert "hit" in kinds and "miss" in kinds
    # Before, the other tenant waited 5-17 s; the generous bound allows for a loaded test machine.
    assert slowest < 2.0, f"the other tenant waited {slowest:.2f} s"
    # Lookups the embedder was too far behind for are counted, in the stats and in /metrics.
    stats = httpx.get(f"{gateway.url}/api/optimization/cache", headers=ADMIN).json()
    assert stats["skipped"] >= 0 and stats["misses"] >= stats["skipped"]
    metrics = httpx.get(f"{gateway.url}/metrics", headers=ADMIN).text
    assert f"iros_cache_skipped_lookups_total {float(stats['skipped'])}" in metrics


def test_memory_stays_flat_over_repeated_huge_prompts(gateway: IrosProcess) -> None:
    """Repeating different 8 MB prompts and clearing the cache leaves the gateway's memory where it was
    after the first few (it grew by about 100 MB per prompt before)."""
    with httpx.Client() as client:
        for n in range(10, 13):
            assert ask(gateway, huge(n), CLIENT_KEY, client).status_code == 200
        httpx.delete(f"{gateway.url}/api/optimization/cache", headers=ADMIN)
        settled = rss_mb(gateway)
        for n in range(20, 28):
            assert ask(gateway, huge(n), CLIENT_KEY, client).status_code == 200
        httpx.delete(f"{gateway.url}/api/optimization/cache", headers=ADMIN)
        grown = rss_mb(gateway) - settled
    assert grown < 100, f"memory grew by {grown:.0f} MB over 8 huge prompts"
