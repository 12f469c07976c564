"""Embedders: texts to unit vectors, with concurrent calls batched into one model call.

embedder = build_embedder(settings.cache.embedder)   # LocalEmbedder or OpenAIEmbedder
await embedder.start()                                # loads MiniLM off the event loop / probes the server
vectors = await embedder.embed(["How do I learn Python?"])   # float32, shape (1, embedder.dim)
encoded = await embedder.embed_tokens(["How do I learn Python?"])   # the vectors and, locally, each
                                                      # text's last-layer token embeddings (the verifier's)
await embedder.aclose()

A call that would wait behind more than `skip_after_ms` of work raises EmbedderBusy at once (batcher.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import aiohttp
import numpy as np
import numpy.typing as npt
import orjson
from yarl import URL

from iros.cache.base import Embedder, EmbedderBusy, EmbedderError, Encoded
from iros.cache.batcher import Batcher
from iros.cache.local_models import (
    PACKAGED_DIM,
    PACKAGED_MODEL,
    PACKAGED_NAMES,
    LocalModel,
    OnnxModel,
    TorchModel,
    default_threads,
    load_local_model,
    pick_device,
)
from iros.config import EmbedderSettings
from iros.core.redact import redact_text, redact_url

__all__ = [
    "PACKAGED_MODEL",
    "EmbedderBusy",
    "EmbedderError",
    "Encoded",
    "LocalEmbedder",
    "OpenAIEmbedder",
    "TimedEmbedder",
    "WrappedEmbedder",
    "build_embedder",
    "default_threads",
    "load_local_model",
    "pick_device",
]

Vectors = npt.NDArray[np.float32]

State = Literal["new", "starting", "ready", "closed"]


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
            skip_after=settings.skip_after_ms / 1000 if settings.skip_after_ms is not None else None,
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
    def skipped(self) -> int:
        """Calls refused with EmbedderBusy because the model was behind."""
        return self._batcher.skipped

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


# The model's thread (and the threads it starts, which inherit it) yields the CPU to the event loop: under
# load the gateway keeps its pace and the embedder falls behind, so lookups are skipped, not served late.
NICENESS = 10


def _lower_priority() -> None:
    if sys.platform == "linux":  # a thread's own nice value (elsewhere it would be the process's)
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)


class LocalEmbedder(_Front):
    """all-MiniLM-L6-v2 (or another sentence-transformers folder) in this process: through ONNX Runtime
    (runtime: onnx, the default; torch is never imported) or torch (runtime: torch; CUDA when present).

    Loading and every model call run in one dedicated thread, so the event loop never waits on the model.
    """

    def __init__(self, settings: EmbedderSettings, *, threads: int | None = None, max_queue: int = 4096):
        super().__init__(settings, max_in_flight=1, max_queue=max_queue)
        self.name = settings.model
        self.runtime = settings.runtime
        self.dim = PACKAGED_DIM if settings.model in PACKAGED_NAMES else 0
        self.device = ""
        self.threads = threads or settings.threads
        self._model: LocalModel | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="iros-embed", initializer=_lower_priority)

    def _load(self) -> LocalModel:
        settings = self.settings
        if settings.runtime == "torch":
            return TorchModel.load(settings.model, settings.device, self.threads)
        if settings.device == "cuda":
            raise EmbedderError("embedder device 'cuda' needs runtime: torch (runtime onnx runs on the CPU)")
        model = OnnxModel.load(settings.model, self.threads)
        model.encode(["warm up"])  # the first run sets ONNX Runtime up: not a lookup's cost
        return model

    async def start(self) -> None:
        if self.state != "new":
            raise EmbedderError(f"{self.name} embedder is {self.state}; start() runs once")
        self.state = "starting"
        loop = asyncio.get_running_loop()
        try:
            model = await loop.run_in_executor(self._thread, self._load)
        except Exception as exc:
            self._failed_start()
            if isinstance(exc, EmbedderError):
                raise
            raise EmbedderError(f"cannot load embedding model {self.settings.model!r}: {exc!r}") from exc
        if self._closed():  # aclose() while loading
            return
        self._model = model
        self.device = model.device
        self.dim = model.dim
        self._batcher.start()
        self.state = "ready"

    def _encode_sync(self, texts: list[str]) -> Encoded:
        model = self._model
        if model is None:
            raise EmbedderError("the embedder was closed")
        return model.encode(texts)

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
