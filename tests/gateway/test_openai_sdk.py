"""The official openai SDK, sync and async, against `iros serve` in front of `iros mock-upstream`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import openai
import pytest

from iros.testing.iros import IrosProcess
from tests.conftest import CLIENT_KEY, UPSTREAM_KEY, RecordingUpstream

pytestmark = pytest.mark.e2e

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is a gateway?"},
]


@pytest.fixture
def client(iros: IrosProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{iros.url}/v1", api_key=CLIENT_KEY, max_retries=0) as client:
        yield client


@pytest.fixture
async def aclient(iros: IrosProcess) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{iros.url}/v1", api_key=CLIENT_KEY, max_retries=0) as client:
        yield client


class TestNonStreaming:
    def test_completion_has_content_and_honest_usage(self, client: openai.OpenAI) -> None:
        """A completion arrives with content, and usage adds up."""
        reply = client.chat.completions.create(model="fast", messages=MESSAGES)  # type: ignore[arg-type]
        assert reply.choices[0].message.content
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage is not None
        assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    def test_iros_headers_name_request_model_cache_and_overhead(self, client: openai.OpenAI) -> None:
        """Every answer says which request it was, which model answered, the cache result and Iros's time."""
        raw = client.chat.completions.with_raw_response.create(model="fast", messages=MESSAGES)  # type: ignore[arg-type]
        again = client.chat.completions.with_raw_response.create(model="fast", messages=MESSAGES)  # type: ignore[arg-type]
        assert raw.headers["x-iros-model"] == "fast"
        assert raw.headers["x-iros-cache"] in ("hit", "miss", "bypass")
        assert float(raw.headers["x-iros-overhead-ms"]) >= 0
        assert len(raw.headers["x-iros-request-id"]) >= 16
        assert raw.headers["x-iros-request-id"] != again.headers["x-iros-request-id"]

    def test_same_prompt_and_seed_give_the_same_text(self, client: openai.OpenAI) -> None:
        """The simulated model is deterministic for a prompt and seed, and varies with the seed."""
        texts = [
            client.chat.completions.create(model="fast", messages=MESSAGES, seed=s).choices[0].message.content  # type: ignore[arg-type]
            for s in (7, 7, 8)
        ]
        assert texts[0] == texts[1]
        assert texts[0] != texts[2]

    def test_max_tokens_caps_the_answer(self, client: openai.OpenAI) -> None:
        """max_tokens reaches the model: the answer stops at it with finish_reason length."""
        reply = client.chat.completions.create(model="light", messages=MESSAGES, max_tokens=3)  # type: ignore[arg-type]
        assert reply.usage is not None and reply.usage.completion_tokens <= 3
        assert reply.choices[0].finish_reason == "length"

    def test_tools_reach_the_model_and_tool_calls_come_back(self, client: openai.OpenAI) -> None:
        """A forced tool call comes back as tool_calls."""
        tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
        reply = client.chat.completions.create(
            model="fast",
            messages=MESSAGES,
            tools=tools,
            tool_choice="required",  # type: ignore[arg-type]
        )
        calls = reply.choices[0].message.tool_calls
        assert calls and calls[0].function.name == "lookup"  # type: ignore[union-attr]
        assert reply.choices[0].finish_reason == "tool_calls"

    def test_in_process_simulated_backend_answers(self, client: openai.OpenAI) -> None:
        """A model served by the built-in simulated backend answers like any other."""
        raw = client.chat.completions.with_raw_response.create(model="local", messages=MESSAGES)  # type: ignore[arg-type]
        assert raw.headers["x-iros-model"] == "local"
        assert raw.parse().choices[0].message.content

    def test_unknown_fields_and_all_messages_pass_through_unchanged(
        self, client: openai.OpenAI, recorder: RecordingUpstream
    ) -> None:
        """What Iros does not know it forwards as sent; only the model becomes the upstream's name."""
        messages = [
            *MESSAGES,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "42"},
        ]
        client.chat.completions.create(
            model="recorded",
            messages=messages,
            temperature=0.2,
            top_p=0.9,
            stop=["\n\n"],
            seed=3,  # type: ignore[arg-type]
            user="u-1",
            response_format={"type": "json_object"},
            extra_body={"guided_choice": ["a", "b"], "repetition_penalty": 1.1},
        )
        sent = recorder.requests[-1]["body"]
        assert sent["model"] == "rec-model"
        assert sent["guided_choice"] == ["a", "b"] and sent["repetition_penalty"] == 1.1
        assert sent["messages"] == messages
        assert (sent["temperature"], sent["top_p"], sent["stop"], sent["seed"], sent["user"]) == (
            0.2,
            0.9,
            ["\n\n"],
            3,
            "u-1",
        )
        # The client's key is Iros's business; it is never forwarded upstream.
        assert CLIENT_KEY not in str(recorder.requests[-1]["headers"])

    def test_upstream_key_comes_from_the_environment(self, client: openai.OpenAI) -> None:
        """api_key_env sends the upstream's key; without it that upstream refuses and Iros says so."""
        assert client.chat.completions.create(model="keyed", messages=MESSAGES).choices[0].message.content  # type: ignore[arg-type]
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="keyless", messages=MESSAGES)  # type: ignore[arg-type]
        assert info.value.status_code == 502
        assert UPSTREAM_KEY not in info.value.message

    def test_models_list_names_every_model(self, client: openai.OpenAI) -> None:
        """GET /v1/models lists each configured model once, deployments folded together."""
        ids = [m.id for m in client.models.list()]
        assert "fast" in ids and "local" in ids
        assert ids.count("failover") == 1
        assert client.models.retrieve("fast").id == "fast"


class TestStreaming:
    def test_stream_delivers_chunks_then_ends(self, client: openai.OpenAI) -> None:
        """A stream arrives chunk by chunk and the text matches the non-streamed answer."""
        stream = client.chat.completions.create(model="fast", messages=MESSAGES, stream=True, seed=1)  # type: ignore[arg-type]
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        whole = client.chat.completions.create(model="fast", messages=MESSAGES, seed=1)  # type: ignore[arg-type]
        assert len(chunks) > 2
        assert text == whole.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    def test_include_usage_adds_a_usage_chunk(self, client: openai.OpenAI) -> None:
        """stream_options.include_usage ends the stream with usage that counts the content chunks."""
        chunks = list(
            client.chat.completions.create(
                model="fast",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},  # type: ignore[arg-type]
            )
        )
        content = [c for c in chunks if c.choices and c.choices[0].delta.content]
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == len(content)

    def test_stream_headers_come_with_the_first_chunk(self, client: openai.OpenAI) -> None:
        """Streams carry the same x-iros headers, with a server-sent events content type."""
        with client.chat.completions.with_streaming_response.create(
            model="fast",
            messages=MESSAGES,
            stream=True,  # type: ignore[arg-type]
        ) as raw:
            assert raw.headers["content-type"].startswith("text/event-stream")
            assert raw.headers["x-iros-model"] == "fast"
            lines = [line for line in raw.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"


class TestAsync:
    async def test_async_completion(self, aclient: openai.AsyncOpenAI) -> None:
        """The async client gets the same answer shape."""
        reply = await aclient.chat.completions.create(model="fast", messages=MESSAGES)  # type: ignore[arg-type]
        assert reply.choices[0].message.content

    async def test_async_stream_and_concurrency(self, aclient: openai.AsyncOpenAI) -> None:
        """Concurrent async streams each get their whole, separate answer."""
        import asyncio

        async def one(seed: int) -> str:
            stream = await aclient.chat.completions.create(
                model="light",
                messages=MESSAGES,
                stream=True,
                seed=seed,
                max_tokens=12,  # type: ignore[arg-type]
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        texts = await asyncio.gather(*(one(s) for s in range(8)))
        assert all(texts)
        assert len(set(texts)) > 1
