"""Any OpenAI-compatible server (vLLM, Ollama, llama.cpp, TGI, OpenAI) over pooled keep-alive HTTP.

backend = OpenAIBackend(settings)          # settings: a ModelSettings with base_url
completion = await backend.complete(payload, spans)
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from yarl import URL

from iros.backends.base import Completion, Readiness
from iros.config import ModelSettings
from iros.core.errors import UpstreamError
from iros.core.schema import Operation
from iros.core.spans import Spans
from iros.core.tracecontext import UPSTREAM_TRACEPARENT

_DONE = b"[DONE]"
_PATHS: dict[Operation, str] = {
    "chat": "chat/completions",
    "text_completion": "completions",
    "embeddings": "embeddings",
}
# What a whole answer of each operation must hold to be one.
_ANSWER: dict[Operation, str] = {"chat": "choices", "text_completion": "choices", "embeddings": "data"}


class OpenAIBackend:
    def __init__(self, settings: ModelSettings, session: aiohttp.ClientSession | None = None) -> None:
        assert settings.base_url
        self.settings = settings
        # Parsed once: aiohttp would parse a string URL on every request.
        self.urls = {op: URL(f"{settings.base_url}/{path}") for op, path in _PATHS.items()}
        self.url = self.urls["chat"]
        self.models_url = URL(f"{settings.base_url}/models")
        self.target_model = settings.target_model
        headers = {"content-type": "application/json"}
        key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        if key:
            headers["authorization"] = f"Bearer {key}"
        self._headers = headers
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=settings.timeouts.connect_seconds,
            sock_read=settings.timeouts.read_seconds,
        )
        self._session = session
        self._own_session = session is None

    @property
    def session(self) -> aiohttp.ClientSession:
        # Created lazily so it binds to the serving event loop, not the one that built the app.
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.settings.max_connections, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                # Cookies an upstream sets for one client must never ride along on another's request.
                cookie_jar=aiohttp.DummyCookieJar(),
                raise_for_status=False,
            )
        return self._session

    def _body(self, payload: dict[str, Any]) -> bytes:
        if payload.get("model") != self.target_model:
            payload = {**payload, "model": self.target_model}
        return orjson.dumps(payload)

    async def _post(self, payload: dict[str, Any], spans: Spans, url: URL) -> aiohttp.ClientResponse:
        headers = self._headers
        traceparent = UPSTREAM_TRACEPARENT.get()  # None unless traces are exported (OTEL_*)
        if traceparent is not None:
            headers = {**headers, "traceparent": traceparent}
        try:
            resp = await self.session.post(url, data=self._body(payload), headers=headers)
        except TimeoutError as exc:
            raise UpstreamError(f"no answer from {url} in time", kind="timeout") from exc
        except aiohttp.ClientConnectionError as exc:
            raise UpstreamError(f"cannot reach {url}: {exc}", kind="connect") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"bad answer from {url}: {exc}", kind="protocol") from exc
        spans.lap("upstream_connect")
        if resp.status >= 400:
            try:
                body = await resp.read()
            except (aiohttp.ClientError, TimeoutError):
                body = b""
            finally:
                resp.release()
            raise UpstreamError(f"{url} answered {resp.status}", kind="status", status=resp.status, body=body)
        return resp

    async def complete(
        self, payload: dict[str, Any], spans: Spans, operation: Operation = "chat"
    ) -> Completion:
        url = self.urls[operation]
        resp = await self._post(payload, spans, url)
        try:
            body = await resp.read()
        except TimeoutError as exc:
            raise UpstreamError(f"{url} stopped sending mid-answer", kind="timeout") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"{url} cut the answer short: {exc}", kind="truncated") from exc
        finally:
            resp.release()
        spans.lap("upstream_ttft")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict) or _ANSWER[operation] not in data:
            raise UpstreamError(
                f"{url} answered with something other than a {operation} answer", kind="protocol"
            )
        return Completion(body=body, data=data)

    async def stream(
        self, payload: dict[str, Any], spans: Spans, operation: Operation = "chat"
    ) -> AsyncIterator[bytes]:
        url = self.urls[operation]
        resp = await self._post(payload, spans, url)
        try:
            async for line in resp.content:
                # SSE: only "data:" lines carry chunks; comments, blank lines and other fields are framing.
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == _DONE:
                    return
                if data:
                    yield data
        except TimeoutError as exc:
            raise UpstreamError(f"{url} went silent mid-stream", kind="timeout") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"{url} cut the stream: {exc}", kind="truncated") from exc
        finally:
            resp.release()
        raise UpstreamError(f"{url} ended the stream without [DONE]", kind="truncated")

    async def ready(self) -> Readiness:
        try:
            async with self.session.get(
                self.models_url, headers=self._headers, timeout=aiohttp.ClientTimeout(total=2.0)
            ) as resp:
                # Details name no address: readiness is served to unauthenticated probes.
                if resp.status in (401, 403):
                    return Readiness(False, f"upstream rejected the credentials ({resp.status})")
                if resp.status >= 500:
                    return Readiness(False, f"upstream answered {resp.status}")
                return Readiness(True, f"upstream answered {resp.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Readiness(False, f"upstream unreachable ({exc.__class__.__name__})")

    async def aclose(self) -> None:
        if self._session is not None and self._own_session:
            await self._session.close()
            self._session = None
