"""The mock upstream on a real socket: the openai SDK talks to it, keys are checked, faults really break."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
import openai
import orjson
import pytest
import uvicorn

from iros.backends.mock_server import build_app
from iros.backends.simulation import CUT_AFTER_CHUNKS, PROFILES, plan
from iros.core.tokens import count_prompt_tokens

KEY = "sk-mock-test"
MESSAGES: list[Any] = [{"role": "user", "content": "Name three rivers."}]


class ThreadServer:
    """uvicorn serving the mock app from a background thread, on a socket bound before it starts."""

    def __init__(self, api_key: str | None) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(
            build_app("instant", api_key),
            loop="uvloop",
            http="httptools",
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "mock upstream did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadServer]:
    with ThreadServer(api_key=KEY) as srv:
        yield srv


@pytest.fixture
def client(server: ThreadServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as c:
        yield c


class TestOpenAISDK:
    def test_non_streaming_answer_is_the_simulated_plan(self, client: openai.OpenAI) -> None:
        reply = client.chat.completions.create(model="instant", messages=MESSAGES, seed=3)
        expected = plan({"model": "instant", "messages": MESSAGES, "seed": 3}, PROFILES["instant"])
        assert reply.choices[0].message.content == expected.content
        assert reply.choices[0].finish_reason == "stop"
        assert reply.model == "instant"
        assert reply.usage is not None
        assert reply.usage.prompt_tokens == count_prompt_tokens(MESSAGES)
        assert reply.usage.completion_tokens == expected.completion_tokens

    def test_streaming_chunks_add_up_to_the_usage(self, client: openai.OpenAI) -> None:
        stream = client.chat.completions.create(
            model="instant",
            messages=MESSAGES,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        usage = chunks[-1].usage
        assert usage is not None and not chunks[-1].choices
        assert len(pieces) == usage.completion_tokens
        assert (
            "".join(pieces)
            == plan({"model": "instant", "messages": MESSAGES, "seed": 3}, PROFILES["instant"]).content
        )
        assert finish == ["stop"]

    def test_unknown_model_uses_the_default_profile_and_echoes_the_name(self, client: openai.OpenAI) -> None:
        reply = client.chat.completions.create(model="my-llm", messages=MESSAGES, max_tokens=2)
        assert reply.model == "my-llm"
        assert reply.choices[0].finish_reason == "length" and reply.usage is not None
        assert reply.usage.completion_tokens == 2

    def test_error_500_profile_answers_http_500(self, client: openai.OpenAI) -> None:
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="error-500", messages=MESSAGES)
        assert info.value.status_code == 500

    def test_models_lists_every_profile(self, client: openai.OpenAI) -> None:
        assert {m.id for m in client.models.list()} == set(PROFILES)


class TestHTTP:
    def test_wrong_or_missing_key_is_a_401_in_the_openai_shape(self, server: ThreadServer) -> None:
        with (
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0) as bad,
            pytest.raises(openai.AuthenticationError) as info,
        ):
            bad.chat.completions.create(model="instant", messages=MESSAGES)
        assert info.value.status_code == 401
        body = {"model": "instant", "messages": MESSAGES}
        resp = httpx.post(f"{server.url}/v1/chat/completions", json=body)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"

    def test_bad_json_is_a_400_in_the_openai_shape(self, server: ThreadServer) -> None:
        resp = httpx.post(
            f"{server.url}/v1/chat/completions",
            content=b"{not json",
            headers={"authorization": f"Bearer {KEY}"},
        )
        assert resp.status_code == 400
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}

    def test_invalid_request_names_the_parameter(self, server: ThreadServer) -> None:
        resp = httpx.post(
            f"{server.url}/v1/chat/completions",
            headers={"authorization": f"Bearer {KEY}"},
            json={"model": "instant", "messages": MESSAGES, "max_tokens": -1},
        )
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "max_tokens"

    def test_health_needs_no_key_and_unknown_paths_are_openai_404s(self, server: ThreadServer) -> None:
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 200 and health.json() == {"status": "ok", "profile": "instant"}
        missing = httpx.get(f"{server.url}/v1/nothing")
        assert missing.status_code == 404 and "message" in missing.json()["error"]

    def test_stream_is_server_sent_events_ending_in_done(self, server: ThreadServer) -> None:
        body = {"model": "instant", "messages": MESSAGES, "stream": True}
        with httpx.stream(
            "POST", f"{server.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}
        ) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            raw = resp.read()
        events = raw.split(b"\n\n")
        assert events[-2:] == [b"data: [DONE]", b""]
        assert all(e.startswith(b"data: {") for e in events[:-2])
        assert orjson.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


class TestFaults:
    def test_cut_stream_breaks_the_stream_before_done(
        self, server: ThreadServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A cut stream stops after a few chunks without [DONE]; the cut is not logged as an error."""
        caplog.set_level(logging.ERROR, logger="uvicorn.error")
        body = {"model": "cut-stream", "messages": MESSAGES, "stream": True}
        events: list[str] = []
        with (
            pytest.raises(httpx.RemoteProtocolError),
            httpx.stream(
                "POST",
                f"{server.url}/v1/chat/completions",
                json=body,
                headers={"authorization": f"Bearer {KEY}"},
            ) as resp,
        ):
            assert resp.status_code == 200
            events.extend(line for line in resp.iter_lines() if line)
        assert len(events) == CUT_AFTER_CHUNKS
        assert "data: [DONE]" not in events
        assert not [r for r in caplog.records if r.name == "uvicorn.error"]

    def test_cut_stream_breaks_the_sdk_stream(self, client: openai.OpenAI) -> None:
        stream = client.chat.completions.create(model="cut-stream", messages=MESSAGES, stream=True)
        received = []
        with pytest.raises(openai.APIConnectionError) as info:
            for chunk in stream:
                received.append(chunk)
        # The SDK's own HTTP stack reports the connection closed mid-body.
        assert "incomplete" in str(info.value.__cause__)
        assert len(received) == CUT_AFTER_CHUNKS

    async def test_cut_non_streaming_body_is_short_of_its_content_length(self, server: ThreadServer) -> None:
        body = {"model": "cut-stream", "messages": MESSAGES}
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{server.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}
            ) as resp,
        ):
            assert resp.status == 200 and resp.content_length
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()

    async def test_hang_never_answers(self, server: ThreadServer) -> None:
        body = {"model": "hang", "messages": MESSAGES}
        timeout = aiohttp.ClientTimeout(total=0.3)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            start = time.perf_counter()
            with pytest.raises(TimeoutError):
                await session.post(
                    f"{server.url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}
                )
            assert time.perf_counter() - start >= 0.29


@pytest.mark.e2e
def test_run_serves_with_uvloop_and_httptools_in_a_subprocess() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"from iros.backends.mock_server import run; run('127.0.0.1', {port}, 'instant', None)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
                    assert orjson.loads(resp.read()) == {"status": "ok", "profile": "instant"}
                    break
            except OSError:
                assert proc.poll() is None, proc.communicate()[0].decode()
                assert time.monotonic() < deadline, "mock upstream did not start"
                time.sleep(0.05)
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "lightweight", "messages": MESSAGES, "max_tokens": 3},
        )
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


class TestOtherEndpoints:
    def test_sdk_text_completion_streamed_and_not_tell_the_same_text(self, client: openai.OpenAI) -> None:
        """The legacy completions API answers whole and streamed: the same text for one prompt and seed."""
        whole = client.completions.create(model="instant", prompt="Once upon a time", seed=5, max_tokens=12)
        stream = client.completions.create(
            model="instant",
            prompt="Once upon a time",
            seed=5,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert whole.object == "text_completion" and whole.choices[0].text
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        assert chunks[-1].usage is not None and chunks[-1].usage == whole.usage

    def test_sdk_embeddings_decode_to_unit_vectors(self, client: openai.OpenAI) -> None:
        """The SDK's embeddings (base64 on the wire by default) decode to one unit vector per input."""
        reply = client.embeddings.create(model="instant", input=["a river", "a road"])
        assert [d.index for d in reply.data] == [0, 1]
        for item in reply.data:
            assert abs(sum(x * x for x in item.embedding) - 1) < 1e-4
        assert reply.usage.prompt_tokens == 4

    def test_embeddings_of_a_failing_profile_are_a_500(self, client: openai.OpenAI) -> None:
        """The error-500 profile fails embeddings with HTTP 500 too."""
        with pytest.raises(openai.InternalServerError):
            client.embeddings.create(model="error-500", input="x")
