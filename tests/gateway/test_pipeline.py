"""The pipeline in-process: spans, observers, admission and auth, with the simulated backend."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest

from iros.app import create_app
from iros.config import AuthSettings, load_settings
from iros.core.admission import Admission
from iros.core.errors import IrosError
from iros.core.record import RequestRecord
from iros.core.spans import Spans
from iros.gateway.auth import KeyRing, Role

BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}


# These apps run without their lifespan: nothing that needs starting (cache, metrics store) is built.
NO_STATE: dict[str, Any] = {"cache": {"enabled": False}, "metrics_collection": {"enabled": False}}


def _app() -> tuple[object, list[RequestRecord]]:
    settings = load_settings(
        None, {"models": [{"name": "m", "backend": "simulated", "profile": "instant"}], **NO_STATE}
    )
    app = create_app(settings)
    seen: list[RequestRecord] = []
    app.gateway.observers.append(seen.append)
    return app, seen


async def _post(app: object, body: dict[str, object]) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
        return await http.post("/v1/chat/completions", json=body)


class TestSpans:
    async def test_every_stage_is_timed_in_one_record(self) -> None:
        """A request's record carries each stage's time; the stages add up to no more than the total."""
        app, seen = _app()
        resp = await _post(app, BODY)
        assert resp.status_code == 200
        record = seen[-1]
        ms = record.spans.ms()
        for stage in (
            "auth",
            "parse",
            "cache",
            "route",
            "queue",
            "upstream_connect",
            "upstream_ttft",
            "respond",
        ):
            assert stage in ms, stage
        stages = sum(v for k, v in ms.items() if k not in ("total", "overhead"))
        assert stages <= ms["total"] + 1e-6
        assert 0 <= ms["overhead"] <= ms["total"]
        assert record.status == 200 and record.model == "m" and record.deployment == "m#0"
        assert record.usage["completion_tokens"] > 0

    async def test_streamed_request_records_chunks_and_usage(self) -> None:
        """A stream's record counts its chunks and its finish reason, and times the stream stage."""
        app, seen = _app()
        resp = await _post(app, {**BODY, "stream": True, "stream_options": {"include_usage": True}})
        assert resp.text.endswith("data: [DONE]\n\n")
        record = seen[-1]
        assert record.chunks >= 3 and record.finish_reason in ("stop", "length")
        assert record.usage["completion_tokens"] >= 1
        assert "stream" in record.spans.ms()

    async def test_failed_request_is_recorded_with_its_status(self) -> None:
        """Errors are recorded too, so error rates can be counted."""
        app, seen = _app()
        resp = await _post(app, {**BODY, "model": "unknown"})
        assert resp.status_code == 404
        assert seen[-1].status == 404 and seen[-1].error == "model_not_found"

    async def test_client_hangup_stops_the_upstream_stream(self) -> None:
        """A client that hangs up mid-stream ends the upstream generation; no [DONE] is sent."""
        settings = load_settings(
            None, {"models": [{"name": "m", "backend": "simulated", "profile": "large"}], **NO_STATE}
        )
        app = create_app(settings)
        seen: list[RequestRecord] = []
        app.gateway.observers.append(seen.append)
        body = orjson.dumps({**BODY, "stream": True, "max_tokens": 400})
        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
        sent: list[dict[str, Any]] = []
        gone = asyncio.Event()
        requests = iter([{"type": "http.request", "body": body, "more_body": False}])

        async def receive() -> dict[str, Any]:
            for message in requests:
                return message
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if sum(m["type"] == "http.response.body" for m in sent) == 3:
                gone.set()

        await asyncio.wait_for(app(scope, receive, send), 30)
        record = seen[-1]
        assert record.client_gone and record.status == 499
        assert record.chunks < 10
        assert not any(b"[DONE]" in m.get("body", b"") for m in sent)

    async def test_in_process_hang_times_out_as_504(self) -> None:
        """The simulated backend honours the deployment's read timeout, like a real connection."""
        model = {"name": "m", "backend": "simulated", "profile": "hang", "timeouts": {"read_seconds": 0.05}}
        app = create_app(load_settings(None, {"models": [model], "retry": {"attempts": 1}, **NO_STATE}))
        resp = await _post(app, BODY)
        assert resp.status_code == 504
        assert resp.json()["error"]["code"] == "upstream_timeout"

    def test_overhead_excludes_upstream_time(self) -> None:
        """Upstream stages are not counted as Iros's overhead."""
        spans = Spans()
        spans.durations = {"auth": 1_000, "upstream_ttft": 50_000_000}
        spans.start, spans.end = 0, 50_002_000
        assert spans.overhead_ns() == 2_000


class TestAdmission:
    async def test_queue_hands_slots_over_in_order(self) -> None:
        """Waiters get slots first come, first served, and the count stays within the limit."""
        admission = Admission(max_concurrency=1, max_queue=2, queue_timeout=5)
        await admission.acquire()
        order: list[int] = []

        async def wait(i: int) -> None:
            await admission.acquire()
            order.append(i)

        tasks = [asyncio.create_task(wait(i)) for i in range(2)]
        await asyncio.sleep(0.01)
        assert admission.queued == 2
        with pytest.raises(IrosError) as info:
            await admission.acquire()
        assert info.value.status == 429
        admission.release()
        await asyncio.sleep(0.01)
        admission.release()
        await asyncio.gather(*tasks)
        assert order == [0, 1]
        assert admission.active == 1

    async def test_queue_timeout_is_a_429(self) -> None:
        """A request that waits past queue_timeout_seconds is told to retry."""
        admission = Admission(max_concurrency=1, max_queue=1, queue_timeout=0.05)
        await admission.acquire()
        with pytest.raises(IrosError) as info:
            await admission.acquire()
        assert (info.value.status, info.value.code) == (429, "queue_timeout")
        assert admission.queued == 0

    async def test_cancelled_waiter_gives_its_place_back(self) -> None:
        """A client that leaves while queued frees its place."""
        admission = Admission(max_concurrency=1, max_queue=1, queue_timeout=5)
        await admission.acquire()
        task = asyncio.create_task(admission.acquire())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        admission.release()
        assert admission.active == 0 and admission.queued == 0


class TestKeys:
    def test_roles_and_key_sources(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Keys come inline, from the environment or as hashes; admin outranks client."""
        import hashlib

        monkeypatch.setenv("OPS_KEY", "sk-ops")
        ring = KeyRing(
            AuthSettings.model_validate(
                {
                    "api_keys": [
                        "sk-a",
                        {"name": "hashed", "key_sha256": hashlib.sha256(b"sk-h").hexdigest()},
                    ],
                    "admin_keys": [{"name": "ops", "key_env": "OPS_KEY"}],
                }
            )
        )
        assert ring.authenticate(b"Bearer sk-a").role == Role.CLIENT
        assert ring.authenticate("Bearer sk-h").name == "hashed"
        assert ring.authenticate("bearer sk-ops", Role.ADMIN).name == "ops"
        with pytest.raises(IrosError) as info:
            ring.authenticate("Bearer sk-a", Role.ADMIN)
        assert info.value.status == 403

    def test_missing_key_env_is_a_config_error(self) -> None:
        """A key_env that is not set stops the start with a clear message."""
        from iros.config import ConfigError

        with pytest.raises(ConfigError, match="NOPE_NOT_SET"):
            KeyRing(AuthSettings.model_validate({"api_keys": [{"key_env": "NOPE_NOT_SET"}]}))
