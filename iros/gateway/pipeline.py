"""The request pipeline of the model API: auth → parse → cache → route → queue → call → respond.

One pipeline serves /v1/chat/completions, /v1/completions (the legacy text API) and /v1/embeddings
(core/schema.py's OPERATIONS): each is validated by its own schema, cached exactly (chat semantically
too), routed, failed over and metered the same way; the backend is told which endpoint to call.

A plain ASGI app, the one hot path of Iros: every microsecond here is added to every answer, so it
speaks ASGI directly instead of going through a framework's request and response objects.

gateway = Gateway(settings, router, keyring, admission, cache)
gateway.observers.append(collector.observe)   # each RequestRecord (core/record.py) when it ends
await gateway(scope, receive, send)           # streams go out through stream_relay.relay
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from time import perf_counter_ns
from typing import Any, TypeVar

import orjson
from starlette.types import Receive, Scope, Send

from iros.backends.base import Completion
from iros.cache import replay
from iros.cache.engine import Hit, ResponseCache
from iros.cache.plan import SHARED, Plan
from iros.config import Settings
from iros.core.admission import Admission
from iros.core.errors import IrosError
from iros.core.record import Observer, RequestIds, RequestRecord, log_access, note_result, upstream_ms
from iros.core.schema import OPERATIONS, Operation, ParsedRequest, parse_request
from iros.core.spans import Spans
from iros.core.tokens import counted_usage
from iros.core.tracecontext import TraceContext
from iros.gateway import overlap
from iros.gateway.auth import KeyRing
from iros.gateway.budgets import Budgets
from iros.gateway.costs import Prices, cost
from iros.gateway.keyguard import KeyGuard
from iros.gateway.overlap import Gate
from iros.gateway.ratelimit import RateLimiter
from iros.gateway.relay import DONE, JSON, SSE, relay, response_headers
from iros.gateway.singleflight import SingleFlight, request_key
from iros.routing import failover
from iros.routing.router import Deployment, Router, take_min_accuracy

T = TypeVar("T")

log = logging.getLogger("iros.gateway")


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
        guard: KeyGuard | None = None,
        tracing: Callable[[bytes | None], TraceContext] | None = None,
        budgets: Budgets | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.settings = settings
        # Set only while traces are exported (OTEL_*): the request's trace from the client's traceparent.
        self.tracing = tracing
        self.budgets = budgets
        self.cache = cache
        self.router = router
        self.keyring = keyring
        self.admission = admission
        self.max_body = settings.server.max_body_bytes
        self.ratelimit = limiter or RateLimiter(settings.auth.burst)
        # Wrong keys slow their address down (the other routes share it through KeyGuardMiddleware).
        self.guard = guard or KeyGuard()
        self.observers: list[Observer] = []
        self.prices = Prices(settings.models)
        metrics = settings.metrics_collection
        self.stall_ns = int(metrics.stall_threshold_ms * 1e6)
        self.sample_rate = metrics.relevance_sample_rate if metrics.enabled else 0.0
        # Random, so that no key can guess another's (feedback names a request by its id).
        self._next_id = RequestIds()
        if settings.server.access_log:
            self.observers.append(log_access)
        # Identical requests in flight at once share one upstream call.
        self.flight: SingleFlight[tuple[Deployment, Completion]] | None = (
            SingleFlight() if settings.optimization.single_flight else None
        )
        self.observers.append(self._measure)
        if budgets is not None:
            self.observers.append(budgets.observe)  # every priced answer to the ledger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        spans = Spans()
        record = RequestRecord(self._next_id(), time.time(), spans)
        if self.tracing is not None:
            record.trace = self.tracing(_header(scope, b"traceparent"))
        try:
            operation = record.operation = OPERATIONS[scope["path"]]
            if scope["method"] != "POST":
                raise IrosError(
                    405,
                    f"use POST for {scope['path']}",
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
            guard = self.guard
            if guard.active and (delay := guard.penalty(_address(scope), authorization)):
                await asyncio.sleep(delay)  # this address is guessing keys: it waits before the check
            try:
                principal = self.keyring.authenticate(authorization)
            except IrosError as exc:
                if exc.status == 401 and authorization is not None:
                    guard.failed(_address(scope))
                raise
            if guard.active:
                guard.passed(_address(scope), authorization)
            record.principal = principal.name
            await self.ratelimit.check(principal)
            if self.budgets is not None:
                self.budgets.check(principal)
            spans.lap("auth")
            request = parse_request(await self._read_body(receive, content_length), operation)
            record.model, record.stream = request.model, request.stream
            if self.sample_rate and random.random() < self.sample_rate:
                record.sampled, record.payload = True, request.data
                if request.stream:
                    record.chunk_log = []
            min_accuracy = take_min_accuracy(request.data)
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
                    if hit is not None:
                        record.cache = hit.kind
                        spans.lap("cache")
                        await self._replay(hit, request, record, send)
                        return
                    record.cache = "miss"
            spans.lap("cache")
            candidates = self.router.candidates(request.model, min_accuracy)
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
        deployment, completion, spans = await self._once(model, data)
        if not self.cache.acceptable(completion.data):
            return "not_cacheable"
        await self.cache.store_now(plan, completion.data, upstream_ms(spans), deployment.name)
        return "cached"

    async def ask(self, model: str, prompt: str) -> str:
        """One question to a configured model, outside the cache (the verification judge's): its text."""
        data = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
        _, completion, _ = await self._once(model, data)
        choices = completion.data.get("choices") or [{}]
        message = choices[0].get("message") if isinstance(choices[0], dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        return content if isinstance(content, str) else ""

    async def _once(
        self, model: str, data: dict[str, Any], operation: Operation = "chat"
    ) -> tuple[Deployment, Completion, Spans]:
        """One whole answer through routing, admission and failover, for Iros's own questions."""
        candidates = self.router.candidates(model)
        record = RequestRecord(self._next_id(), time.time(), Spans())
        await self.admission.acquire()
        try:

            async def complete(deployment: Deployment) -> Completion:
                return await deployment.backend.complete(data, record.spans, operation)

            deployment, completion = await self._call(candidates, record, complete)
        finally:
            self.admission.release()
        return deployment, completion, record.spans

    async def _lookup(self, plan: Plan) -> Hit | None:
        """The exact hit, or with cache.overlap off the semantic one too. Otherwise the semantic lookup
        is started here (plan.lookup) and met by the upstream call (overlap.race)."""
        cache = self.cache
        assert cache is not None
        if not plan.read:
            return None  # Cache-Control: no-cache: neither a hit nor a miss
        try:
            hit = await cache.exact(plan)
        except Exception as exc:
            # A cache that cannot answer (Redis down, embedder failing) is bypassed, never fatal.
            log.warning("cache lookup failed, going upstream: %s", exc)
            plan.write = False
            cache.settle(plan, None)
            return None
        if hit is None:
            lookup = cache.begin(plan)
            if lookup is not None:
                if cache.settings.overlap != "off":
                    return None
                hit = await lookup
                plan.lookup = None
        cache.settle(plan, hit)
        return hit

    async def _race(
        self,
        plan: Plan | None,
        gate: Gate,
        call: Awaitable[T],
        request: ParsedRequest,
        record: RequestRecord,
        send: Send,
        keep: Callable[[], bool] | None = None,
    ) -> T | None:
        """The call, beside the semantic lookup when one runs (overlap.race); None when a hit came
        first and was replayed."""
        if plan is None or plan.lookup is None or self.cache is None:
            return await call
        won = await overlap.race(self.cache, plan, gate, call, keep)
        if not isinstance(won, Hit):
            return won
        record.cache, record.attempts = won.kind, 0
        record.spans.lap("cache")
        await self._replay(won, request, record, send)
        return None

    async def _replay(self, hit: Hit, request: ParsedRequest, record: RequestRecord, send: Send) -> None:
        if hit.verify is not None and self.cache is not None:
            # Drawn for verification: the same request goes upstream beside the client's answer, as
            # one whole answer, and the cache judges it against the one served.
            data = {k: v for k, v in request.data.items() if k not in ("stream", "stream_options")}
            model, operation = request.model, request.operation

            async def fresh() -> dict[str, Any]:
                return (await self._once(model, data, operation))[1].data

            self.cache.verify_served(hit.verify, fresh)
        completion = orjson.loads(hit.entry.body)
        note_result(record, completion)
        record.status, record.deployment = 200, f"{hit.entry.model}#cache"
        record.cost_usd, record.saved_usd = (
            0.0,
            cost(self.prices.of_model(hit.entry.model), record.usage) or 0.0,
        )
        if not request.stream:
            body = replay.replay_json(hit.entry, record.request_id)
            record.body_bytes = len(body)
            headers = response_headers(
                record, hit.entry.model, [JSON, (b"content-length", b"%d" % len(body))]
            )
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        else:
            chunks = replay.replay_chunks(hit.entry, record.request_id, request.include_usage)
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": response_headers(record, hit.entry.model, SSE),
                }
            )
            record.first_chunk_ns = perf_counter_ns()
            body = b"".join(b"data: " + c + b"\n\n" for c in chunks) + DONE
            record.chunks, record.body_bytes = len(chunks), len(body)
            await send({"type": "http.response.body", "body": body})
            record.last_chunk_ns = perf_counter_ns()
        record.spans.lap("respond")

    async def _read_body(self, receive: Receive, content_length: bytes | None) -> bytes:
        limit = self.max_body
        if content_length is not None and content_length.isdigit() and int(content_length) > limit:
            raise _too_large(limit)
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        part: bytes = message.get("body") or b""
        if not message.get("more_body"):  # the common case: the whole body in one message
            if len(part) > limit:
                raise _too_large(limit)
            return part
        # A body that trickles in holds a connection and a task: it gets a deadline (slow clients).
        timeout = self.settings.server.body_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                return await self._read_rest(receive, part, limit)
        except TimeoutError:
            raise IrosError(
                408, f"the request body did not arrive within {timeout:g} s", code="body_timeout"
            ) from None

    @staticmethod
    async def _read_rest(receive: Receive, first: bytes, limit: int) -> bytes:
        # Joining parts keeps large chunked bodies linear.
        parts = [first]
        size = len(first)
        while True:
            if size > limit:
                raise _too_large(limit)
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            part: bytes = message.get("body") or b""
            size += len(part)
            parts.append(part)
            if not message.get("more_body"):
                if size > limit:
                    raise _too_large(limit)
                return b"".join(parts)

    async def _call(
        self,
        candidates: list[Deployment],
        record: RequestRecord,
        call: Callable[[Deployment], Awaitable[T]],
        hold: bool = False,
    ) -> tuple[Deployment, T]:
        """Run `call` on deployments in turn until one answers (see iros.routing.failover)."""
        return await failover.call(candidates, record, call, self.settings.retry, self.router.selector, hold)

    _done = staticmethod(failover.release)

    def _measure(self, record: RequestRecord) -> None:
        self.router.observe(record)

    async def _complete(
        self,
        request: ParsedRequest,
        candidates: list[Deployment],
        record: RequestRecord,
        send: Send,
        plan: Plan | None = None,
    ) -> None:
        spans = record.spans
        gate = Gate.of(self.cache, plan, spans)

        async def complete(deployment: Deployment) -> Completion:
            await gate(deployment)
            return await deployment.backend.complete(request.data, spans, request.operation)

        async def upstream() -> tuple[Deployment, Completion]:
            return await self._call(candidates, record, complete)

        if self.flight is None:
            answered = await self._race(plan, gate, upstream(), request, record, send)
            if answered is None:
                return  # the cache's answer was served
            deployment, completion = answered
        else:
            flight = self.flight
            key = request_key(f"{record.principal}\0{request.operation}", request.data)

            def keep() -> bool:
                return flight.followers(key) > 0  # identical requests wait on this call

            flown = await self._race(plan, gate, flight.do(key, upstream), request, record, send, keep)
            if flown is None:
                return
            (deployment, completion), shared = flown
            if shared:
                # The wait was for the model's answer: upstream time, not Iros's.
                spans.lap("upstream_connect")
                record.coalesced, record.deployment, record.attempts = True, deployment.label, 0
                plan = None  # the call's owner caches the answer
        note_result(record, completion.data)
        if not record.usage:
            # The body goes out as the server wrote it; the metrics get the usage Iros counts.
            record.usage, record.usage_counted = counted_usage(request.data, completion.data), True
        price = cost(deployment.settings.pricing, record.usage)
        if record.coalesced:
            record.cost_usd, record.saved_usd = 0.0, price or 0.0  # the call's owner paid for it
        else:
            record.cost_usd = price
        record.status = 200
        record.body_bytes = len(completion.body)
        if record.sampled:
            record.answer = completion.data
        headers = response_headers(
            record, deployment.name, [JSON, (b"content-length", b"%d" % len(completion.body))]
        )
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": completion.body})
        spans.lap("respond")
        if plan is not None and self.cache is not None:
            self.cache.save(plan, completion.data, upstream_ms(spans), deployment.name)

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
        gate = Gate.of(self.cache, plan, spans)

        # Headers wait for the first chunk, so a deployment that fails before answering can be swapped
        # for another without the client ever seeing it.
        async def open_stream(deployment: Deployment) -> tuple[AsyncIterator[bytes], bytes | None]:
            await gate(deployment)
            chunks = deployment.backend.stream(request.data, spans, request.operation)
            try:
                return chunks, await anext(chunks)
            except StopAsyncIteration:
                return chunks, None

        opened = await self._race(
            plan, gate, self._call(candidates, record, open_stream, hold=True), request, record, send
        )
        if opened is None:
            return  # the cache's answer was served
        deployment, (chunks, first) = opened
        try:
            spans.lap("upstream_ttft")
            keep: list[bytes] | None = (
                [] if plan is not None and plan.write and self.cache is not None else None
            )
            if keep is not None and first is not None:
                keep.append(first)
            complete = await relay(
                chunks,
                first,
                deployment,
                record,
                receive,
                send,
                keep,
                stall_ns=self.stall_ns,
                selector=self.router.selector,
                payload=request.data,
                include_usage=request.include_usage,
            )
        finally:
            self._done(deployment)
        if complete and keep is not None and self.cache is not None and plan is not None:
            # Only a stream that reached [DONE] is put back together and cached.
            assembled = replay.assemble(keep)
            if assembled is not None:
                self.cache.save(plan, assembled, upstream_ms(spans), deployment.name)

    async def _send_error(self, send: Send, error: IrosError, record: RequestRecord) -> None:
        body = error.body()
        headers = [
            JSON,
            (b"content-length", b"%d" % len(body)),
            (b"x-iros-request-id", record.request_id.encode()),
            *((k.encode(), v.encode()) for k, v in error.headers.items()),
        ]
        try:
            await send({"type": "http.response.start", "status": error.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        except OSError:
            pass


def _address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


def _too_large(limit: int) -> IrosError:
    return IrosError(
        413, f"the request body is over the {limit}-byte limit (server.max_body_bytes)", code="body_too_large"
    )
