"""The simulated model in-process: no sockets, the latency of a real model, and its faults on request.

backend = SimulatedBackend(PROFILES["lightweight"], "lightweight")
completion = await backend.complete(payload, spans)        # sleeps ttft + tokens / tokens_per_second
async for data in backend.stream(payload, spans): ...      # the JSON of each chunk, paced like a model
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import orjson

from iros.backends.base import Completion, Readiness
from iros.backends.endpoints import (
    embedding_body,
    embedding_plan,
    text_chunk_bodies,
    text_completion_body,
    text_plan,
)
from iros.backends.simulation import (
    CUT_AFTER_CHUNKS,
    InvalidRequest,
    Plan,
    Profile,
    chunk_bodies,
    completion_body,
    new_request_id,
    plan,
)
from iros.core.errors import UpstreamError
from iros.core.schema import Operation
from iros.core.spans import Spans

HANG_SECONDS = 3600.0


PLANS = {"chat": plan, "text_completion": text_plan, "embeddings": embedding_plan}


async def paced_chunks(
    p: Plan, model: str, request_id: str, include_usage: bool, operation: Operation = "chat"
) -> AsyncIterator[dict[str, Any]]:
    """The plan's chunks in real time: the first after ttft, then one piece per token interval."""
    if p.ttft_s > 0:
        await asyncio.sleep(p.ttft_s)
    pieces_sent = 0
    bodies = text_chunk_bodies if operation == "text_completion" else chunk_bodies
    for chunk in bodies(p, model, request_id, include_usage):
        choice = chunk["choices"][0] if chunk["choices"] else {}
        delta = choice.get("delta", {"content": choice.get("text")} if choice.get("text") else {})
        if "content" in delta and "role" not in delta:
            # The first piece comes at ttft; each later one a token interval after the previous.
            if pieces_sent and p.token_interval_s > 0:
                await asyncio.sleep(p.token_interval_s)
            pieces_sent += 1
        yield chunk


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


SERVER_ERROR_BODY = error_body("the simulated model failed (a simulated fault)", "server_error", "simulated")


def answer_body(p: Plan, payload: dict[str, Any], model: str, operation: Operation) -> dict[str, Any]:
    """The whole answer of a plan, in the shape of its operation's endpoint."""
    if operation == "embeddings":
        return embedding_body(payload, model)
    if operation == "text_completion":
        return text_completion_body(p, model, request_id_for(operation))
    return completion_body(p, model, request_id_for(operation))


def request_id_for(operation: Operation) -> str:
    request_id = new_request_id()
    return "cmpl-" + request_id.removeprefix("chatcmpl-") if operation == "text_completion" else request_id


class SimulatedBackend:
    """A Backend (backends/base.py) answering from simulation.py; see PROFILES for the fault profiles."""

    def __init__(
        self,
        profile: Profile,
        model_name: str,
        rng: random.Random | None = None,
        read_timeout: float = HANG_SECONDS,
    ) -> None:
        self.profile = profile
        self.model_name = model_name
        self._rng = rng or random.Random()
        # The deployment's read timeout, applied as a real client's socket timeout would be.
        self.read_timeout = read_timeout

    def _plan(self, payload: dict[str, Any], operation: Operation = "chat") -> Plan:
        if payload.get("model") != self.model_name:
            # As a real server would: the text depends on the model that answers, not the name asked for.
            payload = {**payload, "model": self.model_name}
        try:
            return PLANS[operation](payload, self.profile, self._rng)
        except InvalidRequest as exc:
            body = error_body(str(exc), "invalid_request_error", None, exc.param)
            raise UpstreamError(
                f"simulated model rejected the request: {exc}", kind="status", status=400, body=body
            ) from None

    async def _headers(self, p: Plan, spans: Spans) -> None:
        """The moment a real server's response headers arrive: at once, or never for a hung server."""
        if p.fault == "hang":
            await asyncio.sleep(self.read_timeout)
            raise UpstreamError(f"simulated model sent nothing in {self.read_timeout:g}s", kind="timeout")
        spans.lap("upstream_connect")
        if p.fault == "error-500":
            raise UpstreamError(
                "simulated model answered 500", kind="status", status=500, body=SERVER_ERROR_BODY
            )

    async def complete(
        self, payload: dict[str, Any], spans: Spans, operation: Operation = "chat"
    ) -> Completion:
        p = self._plan(payload, operation)
        await self._headers(p, spans)
        delay = p.ttft_s + len(p.pieces) * p.token_interval_s
        if delay > 0:
            await asyncio.sleep(delay)
        if p.fault == "cut-stream":
            raise UpstreamError("simulated model cut the answer short", kind="truncated")
        spans.lap("upstream_ttft")
        data = answer_body(p, payload, self.model_name, operation)
        return Completion(body=orjson.dumps(data), data=data)

    async def stream(
        self, payload: dict[str, Any], spans: Spans, operation: Operation = "chat"
    ) -> AsyncIterator[bytes]:
        p = self._plan(payload, operation)
        await self._headers(p, spans)
        options = payload.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        sent = 0
        async for chunk in paced_chunks(
            p, self.model_name, request_id_for(operation), include_usage, operation
        ):
            if p.fault == "cut-stream" and sent >= CUT_AFTER_CHUNKS:
                raise UpstreamError("simulated model cut the stream", kind="truncated")
            yield orjson.dumps(chunk)
            sent += 1
        if p.fault == "cut-stream":
            # A plan too short to cut mid-way still never reaches [DONE].
            raise UpstreamError("simulated model cut the stream", kind="truncated")

    async def ready(self) -> Readiness:
        return Readiness(True, "simulated")

    async def aclose(self) -> None:
        return None
