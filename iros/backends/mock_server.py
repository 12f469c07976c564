"""The simulated model as a standalone OpenAI-compatible HTTP server, faults included, on a real socket.

    run("127.0.0.1", 9000, "lightweight", api_key=None)      # or: iros mock-upstream --port 9000
    client = openai.OpenAI(base_url="http://127.0.0.1:9000/v1", api_key="x")
    client.chat.completions.create(model="large", messages=[...])   # a model named like a profile picks it
client.completions.create(model="large", prompt="...")          # the legacy text API, streamed or not
client.embeddings.create(model="instant", input=["a", "b"])     # deterministic vectors (endpoints.py)

Faults: model "error-500" answers HTTP 500; "hang" never answers; "cut-stream" drops the connection
after 3 chunks of a stream, or mid-body (short of its Content-Length) when not streaming; "flaky" fails half
of the time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import secrets
import time
from collections.abc import AsyncIterator

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from iros.backends.simulated import (
    HANG_SECONDS,
    PLANS,
    SERVER_ERROR_BODY,
    answer_body,
    error_body,
    paced_chunks,
)
from iros.backends.simulation import CUT_AFTER_CHUNKS, PROFILES, InvalidRequest, Plan
from iros.core.schema import Operation

_JSON = "application/json"


class SimulatedCut(Exception):
    """Raised mid-response on purpose: uvicorn then closes the connection without finishing the body."""


class _CutLogFilter(logging.Filter):
    # A cut is the point of the cut-stream profile, not a server bug: keep its traceback out of the log.
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, SimulatedCut)


def _quiet_cuts() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _CutLogFilter) for f in logger.filters):
        logger.addFilter(_CutLogFilter())


def _error(
    status: int, message: str, type: str, code: str | None = None, param: str | None = None
) -> Response:
    return Response(error_body(message, type, code, param), status_code=status, media_type=_JSON)


class _CutBody(Response):
    """Promises more bytes in Content-Length than it sends, then drops the connection."""

    def __init__(self, body: bytes) -> None:
        super().__init__(body, media_type=_JSON)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # raw_headers already carry the whole body's content-length.
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        half = self.body[: len(self.body) // 2]
        await send({"type": "http.response.body", "body": half, "more_body": True})
        raise SimulatedCut("cut-stream: body cut short")


async def _hang(request: Request) -> Response:
    """Never answer, but give up once the client has (so abandoned requests do not pile up)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(disconnected(), HANG_SECONDS)
    return _error(504, "the simulated model hung", "server_error", "simulated_hang")


def build_app(profile: str = "lightweight", api_key: str | None = None) -> Starlette:
    """The mock model server. `profile` answers requests whose model names no profile."""
    if profile not in PROFILES:
        raise ValueError(f"unknown simulated profile {profile!r}; known: {', '.join(PROFILES)}")
    default = PROFILES[profile]
    expected = f"Bearer {api_key}".encode() if api_key else None
    _quiet_cuts()

    def unauthorized(request: Request) -> Response | None:
        if expected is None:
            return None
        given = request.headers.get("authorization", "").encode()
        if secrets.compare_digest(given, expected):
            return None
        return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")

    async def answer(request: Request, operation: Operation) -> Response:
        if (denied := unauthorized(request)) is not None:
            return denied
        try:
            payload = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            return _error(400, f"the request body is not valid JSON: {exc}", "invalid_request_error")
        if not isinstance(payload, dict):
            return _error(400, "the request body must be a JSON object", "invalid_request_error")
        requested = payload.get("model")
        model = requested if isinstance(requested, str) and requested else default.name
        prof = PROFILES.get(model, default)
        try:
            p = PLANS[operation](payload, prof)
        except InvalidRequest as exc:
            return _error(400, str(exc), "invalid_request_error", param=exc.param)
        if p.fault == "hang":
            return await _hang(request)
        if p.fault == "error-500":
            return Response(SERVER_ERROR_BODY, status_code=500, media_type=_JSON)
        if payload.get("stream") and operation != "embeddings":
            options = payload.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            request_id = ("cmpl-" if operation == "text_completion" else "chatcmpl-") + secrets.token_hex(12)
            return StreamingResponse(
                _sse(p, model, request_id, include_usage, operation),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-request-id": request_id},
            )
        delay = p.ttft_s + len(p.pieces) * p.token_interval_s
        if delay > 0:
            await asyncio.sleep(delay)
        data = answer_body(p, payload, model, operation)
        body = orjson.dumps(data)
        if p.fault == "cut-stream":
            return _CutBody(body)
        headers = {"x-request-id": data["id"]} if "id" in data else None
        return Response(body, media_type=_JSON, headers=headers)

    async def chat_completions(request: Request) -> Response:
        return await answer(request, "chat")

    async def completions(request: Request) -> Response:
        return await answer(request, "text_completion")

    async def embeddings(request: Request) -> Response:
        return await answer(request, "embeddings")

    async def models(request: Request) -> Response:
        if (denied := unauthorized(request)) is not None:
            return denied
        created = int(time.time())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "iros-simulated"}
            for name in PROFILES
        ]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type=_JSON)

    async def health(request: Request) -> Response:
        return Response(orjson.dumps({"status": "ok", "profile": default.name}), media_type=_JSON)

    async def http_error(request: Request, exc: Exception) -> Response:
        # 404s and 405s in the OpenAI error shape too, so every client parses every answer.
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
        return _error(status, str(detail), "invalid_request_error")

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
    )


async def _sse(
    p: Plan, model: str, request_id: str, include_usage: bool, operation: Operation
) -> AsyncIterator[bytes]:
    sent = 0
    async for chunk in paced_chunks(p, model, request_id, include_usage, operation):
        if p.fault == "cut-stream" and sent >= CUT_AFTER_CHUNKS:
            break
        yield b"data: " + orjson.dumps(chunk) + b"\n\n"
        sent += 1
    else:
        if p.fault != "cut-stream":
            yield b"data: [DONE]\n\n"
            return
    # Raising (rather than returning) makes uvicorn drop the connection without the final empty chunk,
    # so the client sees a broken stream, as from a model server that died mid-answer.
    raise SimulatedCut("cut-stream: stream cut short")


def run(host: str, port: int, profile: str, api_key: str | None) -> None:
    """Serve the mock model until interrupted."""
    import uvicorn

    app = build_app(profile, api_key)
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    uvicorn.run(
        app,
        host=host,
        port=port,
        loop=loop,
        http="httptools",
        access_log=False,
        log_level="warning",
        # A hung request would otherwise hold shutdown for an hour.
        timeout_graceful_shutdown=2,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m iros.backends.mock_server", description="A simulated OpenAI-compatible model server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--profile", default="lightweight", choices=sorted(PROFILES))
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args(argv)
    run(args.host, args.port, args.profile, args.api_key)


if __name__ == "__main__":
    main()
