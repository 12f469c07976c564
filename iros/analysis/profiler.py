"""The request profiler: one query through the real pipeline, its stage timeline and a CPU profile.

The query goes through the same Gateway as any client's (auth, parse, cache, route, queue, call,
respond), with pyinstrument sampling the task that runs it, so the profile shows Iros's own work
and the time it spends awaiting the model.

profiler = RequestProfiler(gateway)
session = await profiler.run("what is a cache?", model="fast", authorization=b"Bearer sk-...")
profiler.results(session)      # {"stages": [...], "total_ms": ..., "profile": {"top_frames": [...]}}
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from time import perf_counter_ns
from typing import Any

import orjson
from pyinstrument import Profiler
from pyinstrument.frame import Frame

from iros.core.errors import IrosError
from iros.core.record import RequestRecord
from iros.core.spans import UPSTREAM_STAGES
from iros.gateway.pipeline import Gateway

MAX_SESSIONS = 100  # finished sessions kept in memory, oldest dropped first
MAX_QUERY_CHARS = 32_000
TOP_FRAMES = 15
# Seconds between pyinstrument samples: finer shows more of a short request but costs CPU of its own,
# which lands in the stage times of the profiled request.
SAMPLE_INTERVAL = 0.0002
_GATEWAY_CALL = Gateway.__call__.__code__  # the request's own call: the root of its Iros frames


class RequestProfiler:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.sessions: OrderedDict[str, dict[str, Any]] = OrderedDict()
        # One profile at a time: two samplers on one event loop would each see the other's request.
        self._lock = asyncio.Lock()

    async def run(
        self,
        query: str,
        authorization: bytes,
        model: str | None = None,
        stream: bool = False,
        enable_profiling: bool = True,
    ) -> str:
        """Profile one request; returns the session id its results are kept under."""
        if not isinstance(query, str) or not query.strip():
            raise IrosError(400, "query must be a non-empty string", param="query", code="invalid_parameter")
        if len(query) > MAX_QUERY_CHARS:
            raise IrosError(
                400, f"query is over {MAX_QUERY_CHARS} characters", param="query", code="invalid_parameter"
            )
        model = model or self.gateway.router.names[0]
        self.gateway.router.resolve(model)  # a model, a group or auto; else the router's own 404
        body = orjson.dumps(
            {"model": model, "stream": stream, "messages": [{"role": "user", "content": query}]}
        )
        async with self._lock:
            captured: list[RequestRecord] = []
            self.gateway.observers.append(captured.append)
            response: dict[str, Any] = {"status": 0, "headers": {}, "body": bytearray()}
            profiler = Profiler(interval=SAMPLE_INTERVAL, async_mode="enabled") if enable_profiling else None
            cpu0 = time.thread_time()
            try:
                if profiler is not None:
                    profiler.start()
                began = perf_counter_ns()
                await self.gateway(_scope(body, authorization), _receiver(body), _sender(response))
                wall_ns = perf_counter_ns() - began
                cpu_ms = (time.thread_time() - cpu0) * 1000
            finally:
                if profiler is not None and profiler.is_running:
                    profiler.stop()
                self.gateway.observers.remove(captured.append)
        request_id = response["headers"].get("x-iros-request-id")
        record = next((r for r in captured if r.request_id == request_id), None)
        if record is None:
            raise IrosError(500, "the profiled request left no record", code="profile_failed")
        session_id = uuid.uuid4().hex
        self.sessions[session_id] = _result(
            session_id, query, model, record, response, wall_ns, cpu_ms, profiler
        )
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        return session_id

    def results(self, session_id: str) -> dict[str, Any]:
        result = self.sessions.get(session_id)
        if result is None:
            raise IrosError(
                404,
                f"no profiling session {session_id!r} (the last {MAX_SESSIONS} are kept)",
                param="session_id",
                code="session_not_found",
            )
        return result


def _scope(body: bytes, authorization: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [
            (b"authorization", authorization),
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
        ],
    }


def _receiver(body: bytes) -> Any:
    sent = False
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never.wait()  # a stream's disconnect watcher: this client never hangs up
        return {"type": "http.disconnect"}

    return receive


def _sender(response: dict[str, Any]) -> Any:
    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            response["status"] = message["status"]
            response["headers"] = {k.decode(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            response["body"] += message.get("body", b"")

    return send


def _result(
    session_id: str,
    query: str,
    model: str,
    record: RequestRecord,
    response: dict[str, Any],
    wall_ns: int,
    cpu_ms: float,
    profiler: Profiler | None,
) -> dict[str, Any]:
    spans = record.spans
    total_ns = spans.total_ns
    # Laps in the order they happened (queue comes after route); a retried stage keeps its first place.
    order = list(spans.durations)
    # What no lap claimed (sending stream headers, an error reply) is shown, so the stages add up.
    unattributed = total_ns - sum(spans.durations.values())
    stages, offset = [], 0
    for name, ns in [*((s, spans.durations[s]) for s in order), ("unattributed", unattributed)]:
        stages.append(
            {
                "stage": name,
                "start_ms": round(offset / 1e6, 6),
                "duration_ms": round(ns / 1e6, 6),
                "share": round(ns / total_ns, 6) if total_ns else None,
            }
        )
        offset += ns
    upstream = sum(spans.durations.get(s, 0) for s in UPSTREAM_STAGES)
    out: dict[str, Any] = {
        "session_id": session_id,
        "created_at": time.time(),
        "query": query[:200],
        "model": model,
        "request_id": record.request_id,
        "status": record.status,
        "cache": record.cache,
        "deployment": record.deployment,
        "error": record.error,
        "usage": record.usage,
        # total: request received to last byte sent (spans); wall: the whole call, observers included.
        "total_ms": round(total_ns / 1e6, 6),
        "wall_ms": round(wall_ns / 1e6, 6),
        "overhead_ms": round(spans.overhead_ns() / 1e6, 6),
        "upstream_ms": round(upstream / 1e6, 6),
        "stages": stages,
        "findings": _findings(stages, total_ns, upstream),
        "profile": None,
    }
    if profiler is not None and profiler.last_session is not None:
        out["profile"] = _profile(profiler, cpu_ms)
    return out


def _findings(stages: list[dict[str, Any]], total_ns: int, upstream_ns: int) -> list[str]:
    if not total_ns:
        return []
    ranked = sorted(stages, key=lambda s: -s["duration_ms"])
    top = ranked[0]
    out = [
        f"the longest stage is {top['stage']}: {top['duration_ms']:.3f} ms, {top['share']:.0%} of the total"
    ]
    out.append(
        f"the model server took {upstream_ns / total_ns:.0%} of the request; "
        f"Iros's own stages {(total_ns - upstream_ns) / 1e6:.3f} ms"
    )
    return out


def _profile(profiler: Profiler, cpu_ms: float) -> dict[str, Any]:
    session = profiler.last_session
    assert session is not None
    root = session.root_frame()
    self_time: dict[tuple[str, str, int], float] = {}
    iros_total: dict[tuple[str, str, int], float] = {}
    awaited = [0.0]
    if root is not None:
        _walk(root, self_time, iros_total, awaited, set(), False)
    own = self_time

    def frames(table: dict[tuple[str, str, int], float], key: str) -> list[dict[str, Any]]:
        ranked = sorted(table.items(), key=lambda kv: -kv[1])[:TOP_FRAMES]
        return [{"function": f, "file": p, "line": n, key: round(t * 1000, 3)} for (f, p, n), t in ranked]

    return {
        "engine": "pyinstrument",
        "interval_ms": SAMPLE_INTERVAL * 1000,
        "duration_ms": round(session.duration * 1000, 3),
        "samples": session.sample_count,
        # The event loop thread's CPU while the request ran (other tasks in the loop included).
        "loop_cpu_ms": round(cpu_ms, 3),
        # Sampled while the request's task waited (the model server, the queue, I/O): not CPU.
        "awaiting_ms": round(awaited[0] * 1000, 3),
        # Self time of every frame sampled, the loop's other tasks (metrics ingest, ...) included.
        "top_frames": frames(own, "self_ms"),
        # Iros's frames inside the request's own call (the gateway and what it called), by total time:
        # the other tasks sampled meanwhile are the loop's work, not this request's.
        "iros_frames": frames(iros_total, "total_ms"),
    }


def _walk(
    frame: Frame,
    self_time: dict[tuple[str, str, int], float],
    iros_total: dict[tuple[str, str, int], float],
    awaited: list[float],
    stack: set[tuple[str, str, int]],
    inside: bool,
) -> None:
    # pyinstrument's synthetic leaves: [self] is the parent's own time, [await] time spent waiting.
    key = (frame.function or "?", frame.file_path_short or "", frame.line_no or 0)
    inside = inside or (
        frame.function == _GATEWAY_CALL.co_name and frame.file_path == _GATEWAY_CALL.co_filename
    )
    own = frame.time
    for child in frame.children:
        if child.function != "[self]":
            own -= child.time
        if child.function == "[await]":
            awaited[0] += child.time
    if frame.parent is None:
        # The root's own samples are the event loop idling outside the request's task: waiting too.
        awaited[0] += max(own, 0.0)
    else:
        self_time[key] = self_time.get(key, 0.0) + max(own, 0.0)
    counted = key in stack  # recursion: a function's time counts once per branch
    if inside and "/iros/" in (frame.file_path or "") and not counted:
        iros_total[key] = iros_total.get(key, 0.0) + frame.time
    stack.add(key)
    for child in frame.children:
        if not child.is_synthetic:
            _walk(child, self_time, iros_total, awaited, stack, inside)
    if not counted:
        stack.discard(key)
