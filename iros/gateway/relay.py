"""The streamed answer's relay: upstream chunks to the client as SSE, timed, cut cleanly on either side.

ok = await relay(chunks, first, deployment, record, receive, send, keep, stall_ns=..., selector=...,
                 payload=request.data, include_usage=True)
# True once [DONE] went out; a failed upstream ends with an error event (never [DONE]), a client that
# hangs up cancels the upstream (record.status 499). Headers are sent first, from response_headers().
# A stream that reported no usage (llama.cpp's) gets it counted by Iros (record.usage_counted), sent as
# the usage chunk a client asked for with stream_options.include_usage, and kept with the cached answer.
# Its cost (gateway/costs.py) goes out just before [DONE] as the SSE comment ": x-iros-cost-usd 0.0001".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from time import perf_counter_ns
from typing import Any

import orjson
from starlette.types import Receive, Send

from iros.core.errors import UpstreamError
from iros.core.record import NOTABLE_CHUNK, RequestRecord, note_chunk
from iros.core.tokens import count_completion_tokens, count_input_tokens
from iros.gateway.costs import cost, cost_header
from iros.routing.router import Deployment
from iros.routing.selection import Selector

log = logging.getLogger("iros.gateway")

JSON = (b"content-type", b"application/json")
SSE = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
DONE = b"data: [DONE]\n\n"


def response_headers(
    record: RequestRecord, model: str, base: list[tuple[bytes, bytes]], priced: bool = True
) -> list[tuple[bytes, bytes]]:
    """`base` and Iros's own: request id, the model that answered, the cache outcome, the overhead so far,
    and (`priced`: the answer is known) its cost; a relayed stream's cost comes at its end."""
    overhead = record.spans.overhead_ns(time.perf_counter_ns()) / 1e6
    headers = [
        *base,
        (b"x-iros-request-id", record.request_id.encode()),
        (b"x-iros-model", model.encode()),
        (b"x-iros-cache", record.cache.encode()),
        (b"x-iros-overhead-ms", b"%.3f" % overhead),
    ]
    if priced:
        headers.append((b"x-iros-cost-usd", cost_header(record)))
    return headers


async def relay(
    chunks: AsyncIterator[bytes],
    first: bytes | None,
    deployment: Deployment,
    record: RequestRecord,
    receive: Receive,
    send: Send,
    keep: list[bytes] | None = None,
    *,
    stall_ns: int,
    selector: Selector,
    payload: dict[str, Any] | None = None,
    include_usage: bool = False,
) -> bool:
    """Relay the stream; True when it ended with [DONE]. `keep` collects the chunks for the cache."""
    spans = record.spans
    record.status = 200
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": response_headers(record, deployment.name, SSE, priced=False),
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
    answer: list[bytes] = []  # every chunk, for counting usage when the server reports none
    try:
        if first is not None:
            answer.append(first)
            record.chunks = 1
            note_chunk(record, first)
            log_chunks = record.chunk_log
            if log_chunks is not None:
                log_chunks.append(first)
            max_gap, stalls, size = 0, 0, len(first)
            await send({"type": "http.response.body", "body": b"data: " + first + b"\n\n", "more_body": True})
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
                    answer.append(data)
                    if log_chunks is not None:
                        log_chunks.append(data)
                    if keep is not None:
                        keep.append(data)
                    if NOTABLE_CHUNK.search(data):
                        note_chunk(record, data)
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
        counted = None
        pricing = deployment.settings.pricing
        if answer and not record.usage and (include_usage or pricing is not None):
            counted = _count_usage(record, answer, payload or {})
            if include_usage:
                await send(
                    {"type": "http.response.body", "body": b"data: %s\n\n" % counted, "more_body": True}
                )
        record.cost_usd = cost(pricing, record.usage)
        # The headers left before the answer was known: the cost goes last, as an SSE comment clients skip.
        await send(
            {
                "type": "http.response.body",
                "body": b": x-iros-cost-usd %s\n\n%s" % (cost_header(record), DONE),
            }
        )
        if counted is None and answer and not record.usage:
            # For the metrics and the cached answer, once the client has all of it.
            counted = _count_usage(record, answer, payload or {})
        if counted is not None and keep is not None:
            keep.append(counted)
        return True
    except UpstreamError as exc:
        spans.lap("stream")
        state["finished"] = True
        error = exc.to_client(deployment.name)
        deployment.breaker.failure()
        selector.failure(deployment.name)
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
        if record.cost_usd is None and answer and deployment.settings.pricing is not None:
            # Cut short by the client or the upstream: what was generated is billed all the same, and a
            # client must not dodge its budget by hanging up before [DONE].
            if not record.usage:
                _count_usage(record, answer, payload or {})
            record.cost_usd = cost(deployment.settings.pricing, record.usage)
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    return False


def _count_usage(record: RequestRecord, answer: list[bytes], payload: dict[str, Any]) -> bytes:
    """Usage for a stream whose server reported none, counted here and marked so (never zero), as the
    usage chunk OpenAI's servers end a stream with."""
    chunks = []
    for raw in answer:
        try:
            chunk = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(chunk, dict):
            chunks.append(chunk)
    prompt = count_input_tokens(payload)
    completion = count_completion_tokens(chunks)
    record.usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    record.usage_counted = True
    last = chunks[-1] if chunks else {}
    usage_chunk = {
        k: last[k] for k in ("id", "object", "created", "model", "system_fingerprint") if k in last
    }
    return orjson.dumps({**usage_chunk, "choices": [], "usage": record.usage})
