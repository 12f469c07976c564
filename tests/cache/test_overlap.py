"""The semantic lookup runs beside the upstream call (cache.overlap), so a miss never waits for the
embedding: a hit that decides first cuts the call short, an answer that comes first is served and still
cached by meaning, and a priced deployment never gets a call for a hit."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from iros.testing.iros import IrosProcess, free_port, wait_until
from tests.cache.test_verification import config as verification_config
from tests.conftest import ADMIN_KEY, CLIENT_KEY, completion, serve_in_thread

pytestmark = pytest.mark.e2e

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
CLIENT = {"authorization": f"Bearer {CLIENT_KEY}"}
QUESTION = "What are the health benefits of drinking green tea?"
PARAPHRASE = "What are some health benefits of drinking green tea?"


class HeldUpstream:
    """An OpenAI-shaped server whose chat answers and embeddings wait until the test lets them go, so
    which of the two comes first is the test's choice, not the clock's. It notes the calls whose client
    left before the answer."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.asked: list[str] = []
        self.left: list[str] = []  # questions whose caller hung up while the answer was held
        self.chat_open = threading.Event()
        self.embeddings_open = threading.Event()
        self.embeddings_asked = 0
        self.chat_open.set()
        self.embeddings_open.set()

    @staticmethod
    async def _held(request: web.Request, gate: threading.Event) -> bool:
        """Wait for the gate; False when the client hung up meanwhile."""
        while not gate.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                return False
            await asyncio.sleep(0.01)
        return True

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        text = body["messages"][-1]["content"]
        self.asked.append(text)
        if not await self._held(request, self.chat_open):
            self.left.append(text)
        data = completion("Green tea has antioxidants.")
        return web.Response(body=orjson.dumps(data), content_type="application/json")

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        self.embeddings_asked += 1
        await self._held(request, self.embeddings_open)
        # Any fixed vector will do: these tests are about timing, not about meaning.
        data = [
            {"object": "embedding", "index": i, "embedding": [1.0, 0.0, 0.0, 0.0]} for i in range(len(texts))
        ]
        return web.json_response({"object": "list", "data": data, "model": "e"})

    def start(self) -> HeldUpstream:
        routes = [
            web.post("/v1/chat/completions", self._chat),
            web.post("/v1/embeddings", self._embeddings),
        ]
        serve_in_thread(self.port, routes)
        return self


def config(upstream: HeldUpstream, data_dir: Path, *, priced: bool = False, **cache: Any) -> dict[str, Any]:
    # δ 0.3: the prior alone serves the paraphrase; no verification draw, so each outcome is certain.
    cfg = verification_config(upstream, data_dir, delta=0.3, enabled=False)  # type: ignore[arg-type]
    cfg["cache"].update(cache)
    if priced:
        cfg["models"][0]["pricing"] = {"input_per_million": 0.15, "output_per_million": 0.6}
    return cfg


def ask(proc: IrosProcess, text: str, stream: bool = False) -> httpx.Response:
    body = {"model": "chat", "messages": [{"role": "user", "content": text}], "temperature": 0}
    if stream:
        body["stream"] = True
    return httpx.post(f"{proc.url}/v1/chat/completions", json=body, headers=CLIENT, timeout=60)


def text_of(response: httpx.Response) -> str:
    """The answer's text, whole or put together from a stream's deltas."""
    if not response.headers["content-type"].startswith("text/event-stream"):
        return str(response.json()["choices"][0]["message"]["content"])
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: {")]
    return "".join(orjson.loads(line)["choices"][0]["delta"].get("content") or "" for line in lines)


def cache_stats(proc: IrosProcess) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{proc.url}/api/optimization/cache", headers=ADMIN).json()
    return stats


def serve(cfg: dict[str, Any]) -> IrosProcess:
    return IrosProcess.serve(cfg, env={"TEST_ADMIN_KEY": ADMIN_KEY})


@pytest.fixture
def held() -> HeldUpstream:
    return HeldUpstream().start()


@pytest.fixture
def speculating(held: HeldUpstream, tmp_path: Path) -> Iterator[IrosProcess]:
    with serve(config(held, tmp_path)) as proc:  # the default overlap: auto, and this model has no price
        wait_until(lambda: cache_stats(proc)["semantic_ready"], "the semantic cache", timeout=180)
        yield proc


@pytest.mark.parametrize("stream", [False, True])
def test_a_semantic_hit_cuts_the_call_started_beside_it_short(
    speculating: IrosProcess, held: HeldUpstream, stream: bool
) -> None:
    """The paraphrase's call went out at once and is still held upstream when the hit answers the
    client; Iros then hangs up on it, so the model stops working on an answer nobody will read."""
    assert ask(speculating, QUESTION).headers["x-iros-cache"] == "miss"
    held.chat_open.clear()
    try:
        hit = ask(speculating, PARAPHRASE, stream=stream)
        assert hit.status_code == 200 and hit.headers["x-iros-cache"] == "semantic_hit"
        assert text_of(hit) == "Green tea has antioxidants."
        assert held.asked == [QUESTION, PARAPHRASE]  # the call did go out beside the lookup
        wait_until(lambda: held.left == [PARAPHRASE], "the upstream to see the call dropped", timeout=10)
    finally:
        held.chat_open.set()
    stats = cache_stats(speculating)
    assert stats["speculative_cancelled"] == 1 and stats["semantic_hits"] == 1


def test_an_answer_faster_than_the_lookup_is_served_and_still_cached_by_meaning(
    held: HeldUpstream, tmp_path: Path
) -> None:
    """With the embedding held, the model's answer reaches the client first, as a miss; once the
    embedding is in, the answer is stored with it (indexed), not embedded a second time."""
    embedder = {"backend": "openai", "base_url": held.url, "model": "e", "lookup_timeout_ms": 30000}
    with serve(config(held, tmp_path, embedder=embedder, verifier=False)) as proc:
        wait_until(lambda: cache_stats(proc)["semantic_ready"], "the semantic cache", timeout=60)
        asked = held.embeddings_asked
        held.embeddings_open.clear()
        try:
            answer = ask(proc, QUESTION)
            assert answer.status_code == 200 and answer.headers["x-iros-cache"] == "miss"
            assert held.embeddings_asked == asked + 1  # the lookup's embedding is still held
            assert cache_stats(proc)["indexed"] == 0
        finally:
            held.embeddings_open.set()
        wait_until(lambda: cache_stats(proc)["indexed"] == 1, "the answer indexed by meaning", timeout=10)
        stats = cache_stats(proc)
        assert stats["overtaken"] == 1 and stats["misses"] == 1
        assert held.embeddings_asked == asked + 1


def test_a_priced_deployment_is_never_called_for_a_hit(held: HeldUpstream, tmp_path: Path) -> None:
    """auto gates the call on a priced deployment: the lookup runs while the request waits for the
    deployment's connection, and a hit means no call at all (nothing spent)."""
    with serve(config(held, tmp_path, priced=True)) as proc:
        wait_until(lambda: cache_stats(proc)["semantic_ready"], "the semantic cache", timeout=180)
        assert ask(proc, QUESTION).headers["x-iros-cache"] == "miss"
        hit = ask(proc, PARAPHRASE)
        assert hit.headers["x-iros-cache"] == "semantic_hit"
        assert held.asked == [QUESTION]
        assert cache_stats(proc)["speculative_cancelled"] == 0


def test_overlap_off_looks_up_first_and_never_calls_for_a_hit(held: HeldUpstream, tmp_path: Path) -> None:
    with serve(config(held, tmp_path, overlap="off")) as proc:
        wait_until(lambda: cache_stats(proc)["semantic_ready"], "the semantic cache", timeout=180)
        assert ask(proc, QUESTION).headers["x-iros-cache"] == "miss"
        assert ask(proc, PARAPHRASE).headers["x-iros-cache"] == "semantic_hit"
        assert held.asked == [QUESTION]
