"""Serving lifecycle: graceful shutdown lets in-flight streams finish; health and status answer."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from iros.testing.iros import IrosProcess

pytestmark = pytest.mark.e2e


def test_sigterm_lets_a_stream_in_flight_finish_and_refuses_new_work(upstream: IrosProcess) -> None:
    """On SIGTERM Iros stops accepting, finishes the stream in flight, then exits cleanly."""
    config = {
        "auth": {"open": True},
        "server": {"shutdown_timeout_seconds": 20},
        "models": [{"name": "slow", "base_url": f"{upstream.url}/v1", "upstream_model": "large"}],
    }
    proc = IrosProcess.serve(config).start()
    try:
        body = {
            "model": "slow",
            "messages": [{"role": "user", "content": "tell me"}],
            "stream": True,
            "max_tokens": 40,
        }
        with httpx.stream("POST", f"{proc.url}/v1/chat/completions", json=body, timeout=30) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.TransportError):
                httpx.get(f"{proc.url}/health", timeout=2)
            rest = [line for line in lines if line.startswith("data: ")]
        assert first and rest[-1] == "data: [DONE]"
        assert len(rest) > 10
        # uvicorn re-raises the signal once drained, so the exit reads as "terminated by SIGTERM".
        assert proc.proc is not None and proc.proc.wait(15) in (0, -signal.SIGTERM)
    finally:
        proc.stop()


def test_health_and_status(iros: IrosProcess) -> None:
    """/health is open and cheap; /api/system/status reports the admission state."""
    from tests.conftest import CLIENT_KEY

    assert httpx.get(f"{iros.url}/health").json()["status"] == "ok"
    status = httpx.get(
        f"{iros.url}/api/system/status", headers={"authorization": f"Bearer {CLIENT_KEY}"}
    ).json()
    assert status["active_requests"] >= 0 and status["max_concurrency"] >= 1
    assert "fast" in status["models"]
