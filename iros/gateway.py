"""The request pipeline of /v1/chat/completions: auth → parse → cache → route → queue → call → respond.

A plain ASGI app, the one hot path of Iros: every microsecond here is added to every answer, so it
speaks ASGI directly instead of going through a framework's request and response objects.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from time import perf_counter_ns
from typing import Any, TypeVar

import orjson
from starlette.types import Receive, Scope, Send

from iros.admission import Admission
from iros.auth import KeyRing
from iros.cache import SHARED, Hit, Plan, ResponseCache
from iros.config import Settings
from iros.errors import IrosError, UpstreamError
from iros.routing import Deployment, Router
from iros.schema import ParsedRequest, parse_request
from iros.spans import Spans
from iros.types import Completion

T = TypeVar("T")

log = logging.getLogger("iros.gateway")
access_log = logging.getLogger("iros.access")

_JSON = (b"content-type", b"application/json")
_SSE = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_DONE = b"data: [DONE]\n\n"


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request; observers (metrics, logs, analysis) read it when it ends."""

    request_id: str
    started_at: float
    spans: Spans
    principal: str = "-"
    model: str | None = None
    deployment: str | None = None
    stream: bool = False
    status: int = 0
    cache: str = "bypass"
    attempts: int = 0
    chunks: int = 0
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    client_gone: bool = False
    body_bytes: int = 0
    # Streams: perf_counter_ns of the first and last chunk sent, the longest pause between two, and
    # how many pauses exceeded the stall threshold.
    first_chunk_ns: int = 0
    last_chunk_ns: int = 0
    max_gap_ns: int = 0
    stalls: int = 0
    # Kept for a sample of requests only (metrics_collection.relevance_sample_rate): the request and
    # the answer, for the question-answer relevance score computed off the request path.
    sampled: bool = False
    payload: dict[str, Any] | None = None
    answer: dict[str, Any] | None = None
    chunk_log: list[bytes] | None = None


Observer = Callable[[RequestRecord], None]


class _ClientGone(Exception):
    pass


class Gateway:
    def __init__(
        self,
        settings: Settings,
        router: Router,
        keyring: KeyRing,
        admission: Admission,
        cache: ResponseCache | None = None,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.router = router
        self.keyring = keyring
        self.admission = admission
        self.max_body = settings.server.max_body_bytes
        self.observers: list[Observer] = []
        metrics = settings.metrics_collection
        self.stall_ns = int(metrics.stall_threshold_ms * 1e6)
        self.sample_rate = metrics.relevance_sample_rate if metrics.enabled else 0.0
        # Request ids: a random per-process prefix and a counter; unique across workers, cheaper than uuid4.
        self._id_prefix = os.urandom(5).hex()
        self._ids = itertools.count(1)
        if settings.server.access_log:
            self.observers.append(_log_access)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        spans = Spans()
        record = RequestRecord(f"{self._id_prefix}{next(self._ids):012x}", time.time(), spans)
        try:
            if scope["method"] != "POST":
                raise IrosError(
                    405,
                    "use POST for /v1/chat/completions",
                    code="method_not_allowed",
                    headers={"allow": "POST"},
                )
            authorization = content_length = cache_control = None
            for name, value in scope["headers"]:
                if name == b"authorization":
                    authorization = value
                elif name == b"content-length":
                    content_length = value
                elif name == b"cache-control":
                    cache_control = value
            principal = self.keyring.authenticate(authorization)
            record.principal = principal.name
            spans.lap("auth")
            request = parse_request(await self._read_body(receive, content_length))
            record.model, record.stream = request.model, request.stream
            if self.sample_rate and random.random() < self.sample_rate:
                record.sampled, record.payload = True, request.data
                if request.stream:
                    record.chunk_log = []
            spans.lap("parse")
            plan = None
            if self.cache is None:
                request.data.pop("iros", None)  # Iros's own extension never goes upstream
            else:
                plan = self.cache.plan(
                    request, principal.name, cache_control and cache_control.decode("latin-1")
                )
                if plan is not None:
                    hit = await self._lookup(plan)
                    record.cache = hit.kind if hit is not None else "miss"
                    if hit is not None:
                        spans.lap("cache")
                        await self._replay(hit, request, record, send)
                        return
            spans.lap("cache")
            candidates = self.router.candidates(request.model)
            spans.lap("route")
            await self.admission.acquire()
            spans.lap("queue")
            try:
                if request.stream:
                    await self._stream(request, candidates, record, receive, send, plan)
                else:
                    await self._complete(request, candidates, record, send, plan)
            finally:
                self.admission.release()
        except IrosError as exc:
            record.status, record.error = exc.status, exc.code or exc.type
            await self._send_error(send, exc, record)
        except _ClientGone:
            record.status, record.client_gone = 499, True
        except Exception:
            # A bug, not bad input: say so once, keep serving.
            log.exception("request %s failed inside Iros", record.request_id)
            # record.status is set when the response starts; after that only the connection can be dropped.
            started = record.status != 0
            record.status, record.error = 500, "internal_error"
            if not started:
                await self._send_error(
                    send,
                    IrosError(
                        500,
                        f"internal error (request {record.request_id})",
                        type="server_error",
                        code="internal_error",
                    ),
                    record,
                )
        finally:
            spans.finish()
            for observer in self.observers:
                try:
                    observer(record)
                except Exception:
                    log.exception("observer %r failed", observer)

    async def warm(self, model: str, prompt: str, params: dict[str, Any]) -> str:
        """Ask the model once and cache its answer in the shared namespace (cache warming).

        Returns "cached", "already_cached" or "not_cacheable"; upstream failures raise IrosError.
        """
        assert self.cache is not None
        data = {**params, "model": model, "messages": [{"role": "user", "content": prompt}]}
        request = ParsedRequest(data=data, model=model, stream=False, include_usage=False)
        plan = self.cache.plan(request, SHARED, None)
        if plan is None:
            return "not_cacheable"
        if await self.cache.store.get(plan.key) is not None:
            return "already_cached"
        candidates = self.router.candidates(model)
        record = RequestRecord(f"{self._id_prefix}{next(self._ids):012x}", time.time(), Spans())
        await self.admission.acquire()
        try:

            async def complete(deployment: Deployment) -> Completion:
                return await deployment.backend.complete(data, record.spans)

            deployment, completion = await self._call(candidates, record, complete)
        finally:
            self.admission.release()
        if not self.cache.acceptable(completion.data):
            return "not_cacheable"
        await self.cache.store_now(plan, completion.data, _upstream_ms(record.spans), deployment.name)
        return "cached"

    async def _lookup(self, plan: Plan) -> Hit | None:
        assert self.cache is not None
        try:
            return await self.cache.lookup(plan)
        except Exception as exc:
            # A cache that cannot answer (Redis down, embedder failing) is bypassed, never fatal.
            log.warning("cache lookup failed, going upstream: %s", exc)
            plan.write = False
            return None

    async def _replay(self, hit: Hit, request: ParsedRequest, record: RequestRecord, send: Send) -> None:
        completion = orjson.loads(hit.entry.body)
        _note_result(record, completion)
        record.status, record.deployment = 200, f"{hit.entry.model}#cache"
        if not request.stream:
            body = ResponseCache.replay_json(hit, record.request_id)
            record.body_bytes = len(body)
            headers = self._headers(record, hit.entry.model, [_JSON, (b"content-length", b"%d" % len(body))])
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        else:
            chunks = ResponseCache.replay_chunks(hit, record.request_id, request.include_usage)
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": self._headers(record, hit.entry.model, _SSE),
                }
            )
            record.first_chunk_ns = perf_counter_ns()
            body = b"".join(b"data: " + c + b"\n\n" for c in chunks) + _DONE
            record.chunks, record.body_bytes = len(chunks), len(body)
            await send({"type": "http.response.body", "body": body})
            record.last_chunk_ns = perf_counter_ns()
        record.spans.lap("respond")

    async def _read_body(self, receive: Receive, content_length: bytes | None) -> bytes:
        limit = self.max_body
        if content_length is not None and content_length.isdigit() and int(content_length) > limit:
            raise _too_large(limit)
        # One message is the common case; joining parts keeps large chunked bodies linear.
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            part: bytes = message.get("body") or b""
            size += len(part)
            if size > limit:
                raise _too_large(limit)
            if not message.get("more_body"):
                return b"".join(parts) + part if parts else part
            parts.append(part)

    def _attempts(self, candidates: list[Deployment]) -> list[Deployment]:
        n = self.settings.retry.attempts
        return [candidates[i % len(candidates)] for i in range(n)]

    async def _backoff(self, attempt: int, candidates: list[Deployment]) -> None:
        # Moving on to a fresh deployment needs no pause; coming back to one already tried does.
        if attempt < len(candidates):
            return
        retry = self.settings.retry
        delay = min(retry.backoff_ms * 2 ** (attempt - len(candidates)), retry.max_backoff_ms) / 1000
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _call(
        self, candidates: list[Deployment], record: RequestRecord, call: Callable[[Deployment], Awaitable[T]]
    ) -> tuple[Deployment, T]:
        """Run `call` on deployments in turn until one answers; retries and failover live here only."""
        spans = record.spans
        failure: UpstreamError | None = None
        for attempt, deployment in enumerate(self._attempts(candidates)):
            if attempt:
                await self._backoff(attempt, candidates)
                spans.lap("retry")
            record.attempts, record.deployment = attempt + 1, deployment.label
            try:
                return deployment, await call(deployment)
            except UpstreamError as exc:
                spans.lap("upstream_connect")
                failure = exc
                log.warning(
                    "request %s: %s attempt %d failed: %s",
                    record.request_id,
                    deployment.label,
                    attempt + 1,
                    exc,
                )
                if not exc.retryable:
                    break
        assert failure is not None
        raise failure.to_client()

    async def _complete(
        self,
        request: ParsedRequest,
        candidates: list[Deployment],
        record: RequestRecord,
        send: Send,
        plan: Plan | None = None,
    ) -> None:
        spans = record.spans

        async def complete(deployment: Deployment) -> Completion:
            return await deployment.backend.complete(request.data, spans)

        deployment, completion = await self._call(candidates, record, complete)
        _note_result(record, completion.data)
        record.status = 200
        record.body_bytes = len(completion.body)
        if record.sampled:
            record.answer = completion.data
        headers = self._headers(
            record, deployment.name, [_JSON, (b"content-length", b"%d" % len(completion.body))]
        )
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": completion.body})
        spans.lap("respond")
        if plan is not None and self.cache is not None:
            self.cache.save(plan, completion.data, _upstream_ms(spans), deployment.name)

    async def _stream(
        self,
        request: ParsedRequest,
        candidates: list[Deployment],
        record: RequestRecord,
        receive: Receive,
        send: Send,
        plan: Plan | None = None,
    ) -> None:
        spans = record.spans

        # Headers wait for the first chunk, so a deployment that fails before answering can be swapped
        # for another without the client ever seeing it.
        async def open_stream(deployment: Deployment) -> tuple[AsyncIterator[bytes], bytes | None]:
            chunks = deployment.backend.stream(request.data, spans)
            try:
                return chunks, await anext(chunks)
            except StopAsyncIteration:
                return chunks, None

        deployment, (chunks, first) = await self._call(candidates, record, open_stream)
        spans.lap("upstream_ttft")
        keep: list[bytes] | None = [] if plan is not None and plan.write and self.cache is not None else None
        if keep is not None and first is not None:
            keep.append(first)
        complete = await self._relay(chunks, first, deployment, record, receive, send, keep)
        if complete and keep is not None and self.cache is not None and plan is not None:
            # Only a stream that reached [DONE] is put back together and cached.
            assembled = ResponseCache.assemble(keep)
            if assembled is not None:
                self.cache.save(plan, assembled, _upstream_ms(spans), deployment.name)

    async def _relay(
        self,
        chunks: AsyncIterator[bytes],
        first: bytes | None,
        deployment: Deployment,
        record: RequestRecord,
        receive: Receive,
        send: Send,
        keep: list[bytes] | None = None,
    ) -> bool:
        """Relay the stream; True when it ended with [DONE]."""
        spans = record.spans
        record.status = 200
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": self._headers(record, deployment.name, _SSE),
            }
        )
        spans.skip()
        task = asyncio.current_task()
        assert task is not None
        state = {"finished": False, "gone": False}

        async def watch() -> None:
            # A client that hangs up must stop the upstream generation, not leave it running.
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not state["finished"]:
                        state["gone"] = True
                        task.cancel()
                    return

        watcher = asyncio.create_task(watch())
        try:
            if first is not None:
                record.chunks = 1
                _note_chunk(record, first)
                log_chunks = record.chunk_log
                if log_chunks is not None:
                    log_chunks.append(first)
                stall_ns, max_gap, stalls, size = self.stall_ns, 0, 0, len(first)
                await send(
                    {"type": "http.response.body", "body": b"data: " + first + b"\n\n", "more_body": True}
                )
                last = record.first_chunk_ns = perf_counter_ns()
                try:
                    async for data in chunks:
                        now = perf_counter_ns()
                        # Continuity: the longest wait between chunks and the waits long enough to be felt.
                        if now - last > max_gap:
                            max_gap = now - last
                        if now - last > stall_ns:
                            stalls += 1
                        record.chunks += 1
                        size += len(data)
                        if log_chunks is not None:
                            log_chunks.append(data)
                        if keep is not None:
                            keep.append(data)
                        if b'"finish_reason":"' in data or b'"usage":{' in data:
                            _note_chunk(record, data)
                        await send(
                            {
                                "type": "http.response.body",
                                "body": b"data: " + data + b"\n\n",
                                "more_body": True,
                            }
                        )
                        last = now
                finally:
                    record.last_chunk_ns, record.max_gap_ns, record.stalls = last, max_gap, stalls
                    record.body_bytes = size
            spans.lap("stream")
            state["finished"] = True
            await send({"type": "http.response.body", "body": _DONE})
            return True
        except UpstreamError as exc:
            spans.lap("stream")
            state["finished"] = True
            error = exc.to_client()
            record.error = error.code
            record.status = error.status
            log.warning(
                "request %s: %s stream failed after %d chunks: %s",
                record.request_id,
                deployment.label,
                record.chunks,
                exc,
            )
            # The status line is gone already; an error event tells the client the stream is incomplete.
            await send({"type": "http.response.body", "body": b"data: " + error.body() + b"\n\n"})
        except asyncio.CancelledError:
            if not state["gone"]:
                raise
            task.uncancel()
            spans.lap("stream")
            record.client_gone, record.status = True, 499
        finally:
            watcher.cancel()
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        return False

    def _headers(
        self, record: RequestRecord, model: str, base: list[tuple[bytes, bytes]]
    ) -> list[tuple[bytes, bytes]]:
        overhead = record.spans.overhead_ns(time.perf_counter_ns()) / 1e6
        return [
            *base,
            (b"x-iros-request-id", record.request_id.encode()),
            (b"x-iros-model", model.encode()),
            (b"x-iros-cache", record.cache.encode()),
            (b"x-iros-overhead-ms", b"%.3f" % overhead),
        ]

    async def _send_error(self, send: Send, error: IrosError, record: RequestRecord) -> None:
        body = error.body()
        headers = [
            _JSON,
            (b"content-length", b"%d" % len(body)),
            (b"x-iros-request-id", record.request_id.encode()),
            *((k.encode(), v.encode()) for k, v in error.headers.items()),
        ]
        try:
            await send({"type": "http.response.start", "status": error.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        except OSError:
            pass


def _upstream_ms(spans: Spans) -> float:
    d = spans.durations
    return (d.get("upstream_connect", 0) + d.get("upstream_ttft", 0) + d.get("stream", 0)) / 1e6


def _too_large(limit: int) -> IrosError:
    return IrosError(
        413, f"the request body is over the {limit}-byte limit (server.max_body_bytes)", code="body_too_large"
    )


def _note_result(record: RequestRecord, data: dict[str, Any]) -> None:
    usage = data.get("usage")
    if isinstance(usage, dict):
        record.usage = {k: v for k, v in usage.items() if isinstance(v, int)}
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        record.finish_reason = choices[0].get("finish_reason")


def _note_chunk(record: RequestRecord, data: bytes) -> None:
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    if isinstance(chunk, dict):
        usage, choices = chunk.get("usage"), chunk.get("choices")
        if isinstance(usage, dict):
            record.usage = {k: v for k, v in usage.items() if isinstance(v, int)}
        if (
            isinstance(choices, list)
            and choices
            and isinstance(choices[0], dict)
            and choices[0].get("finish_reason")
        ):
            record.finish_reason = choices[0]["finish_reason"]


def _log_access(record: RequestRecord) -> None:
    ms = record.spans.ms()
    access_log.info(
        "%s %s model=%s via=%s status=%d cache=%s stream=%s total_ms=%.2f overhead_ms=%.3f attempts=%d%s",
        record.request_id,
        record.principal,
        record.model,
        record.deployment,
        record.status,
        record.cache,
        record.stream,
        ms["total"],
        ms["overhead"],
        record.attempts,
        f" error={record.error}" if record.error else "",
    )
