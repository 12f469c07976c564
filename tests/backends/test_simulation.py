"""The simulated model: deterministic text, honest usage, OpenAI-shaped bodies, and the in-process backend."""

from __future__ import annotations

import asyncio
import math
import random
import time
from typing import Any, ClassVar

import orjson
import pytest

from iros.backends.base import Readiness
from iros.backends.simulated import SimulatedBackend
from iros.backends.simulation import (
    CUT_AFTER_CHUNKS,
    PROFILES,
    InvalidRequest,
    chunk_bodies,
    completion_body,
    plan,
)
from iros.core.errors import UpstreamError
from iros.core.spans import Spans
from iros.core.tokens import count_prompt_tokens, count_tokens

INSTANT = PROFILES["instant"]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What does a gateway do?"},
]


def payload(**extra: Any) -> dict[str, Any]:
    return {"model": "sim", "messages": MESSAGES, **extra}


def content_chunks(chunks: list[dict[str, Any]]) -> list[str]:
    """The content pieces of a chunk stream, the role chunk's empty content left out."""
    return [
        c["choices"][0]["delta"]["content"]
        for c in chunks
        if c["choices"] and "content" in c["choices"][0]["delta"] and "role" not in c["choices"][0]["delta"]
    ]


class TestDeterminism:
    def test_same_prompt_and_seed_give_the_same_text_whatever_the_latency(self) -> None:
        a = plan(payload(seed=7), INSTANT, random.Random(1))
        b = plan(payload(seed=7), PROFILES["instant"], random.Random(2))
        assert a.content == b.content and a.completion_tokens == b.completion_tokens

    def test_another_seed_gives_another_text(self) -> None:
        texts = {plan(payload(seed=s), INSTANT).content for s in range(5)}
        assert len(texts) == 5

    def test_another_model_or_prompt_gives_another_text(self) -> None:
        base = plan(payload(seed=1), INSTANT).content
        assert plan({**payload(seed=1), "model": "other"}, INSTANT).content != base
        other = [{"role": "user", "content": "Something else entirely"}]
        assert plan({**payload(seed=1), "messages": other}, INSTANT).content != base

    def test_text_is_english_like_sentences(self) -> None:
        text = plan(payload(seed=3), PROFILES["large"]).content
        assert text is not None and text[0].isupper() and text.endswith((".", "?"))
        assert len(text.split()) > 20


class TestUsage:
    def test_completion_tokens_equal_content_chunks_and_the_tokenizer(self) -> None:
        for seed in range(10):
            p = plan(payload(seed=seed), PROFILES["lightweight"])
            chunks = list(chunk_bodies(p, "sim", "chatcmpl-1", include_usage=True))
            assert p.content is not None
            assert len(content_chunks(chunks)) == p.completion_tokens == count_tokens(p.content)
            assert "".join(content_chunks(chunks)) == p.content
            assert chunks[-1]["usage"] == {
                "prompt_tokens": count_prompt_tokens(MESSAGES),
                "completion_tokens": p.completion_tokens,
                "total_tokens": count_prompt_tokens(MESSAGES) + p.completion_tokens,
            }

    def test_completion_body_is_an_openai_chat_completion(self) -> None:
        p = plan(payload(seed=1), INSTANT)
        body = completion_body(p, "sim", "chatcmpl-xyz")
        assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-xyz" and body["model"] == "sim"
        choice = body["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": p.content, "refusal": None}
        assert choice["finish_reason"] == "stop"
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0

    def test_output_length_follows_the_profile_mean(self) -> None:
        def mean(name: str) -> float:
            lengths = [plan(payload(seed=s), PROFILES[name]).completion_tokens for s in range(200)]
            return sum(lengths) / len(lengths)

        assert 90 < mean("large") < 160
        assert 45 < mean("lightweight") < 85
        assert mean("instant") < 30


class TestLimits:
    def test_max_tokens_caps_the_answer_with_finish_reason_length(self) -> None:
        p = plan(payload(seed=1, max_tokens=3), PROFILES["large"])
        assert p.completion_tokens == len(p.pieces) == 3 and p.finish_reason == "length"
        uncapped = plan(payload(seed=1), PROFILES["large"])
        assert uncapped.content is not None and uncapped.content.startswith(p.content or "-")

    def test_max_completion_tokens_wins_over_max_tokens(self) -> None:
        p = plan(payload(seed=1, max_tokens=50, max_completion_tokens=2), PROFILES["large"])
        assert p.completion_tokens == 2 and p.finish_reason == "length"

    def test_a_cap_above_the_answer_length_changes_nothing(self) -> None:
        p = plan(payload(seed=1, max_tokens=10_000), INSTANT)
        assert p.finish_reason == "stop" and p.content == plan(payload(seed=1), INSTANT).content

    def test_stop_string_truncates_before_it(self) -> None:
        full = plan(payload(seed=2), PROFILES["large"]).content
        assert full is not None
        stop = full.split()[5]
        p = plan(payload(seed=2, stop=stop), PROFILES["large"])
        assert p.finish_reason == "stop"
        assert p.content == full[: full.index(stop)]
        assert p.completion_tokens == count_tokens(p.content) == len(p.pieces)

    def test_the_earliest_of_several_stop_strings_wins(self) -> None:
        full = plan(payload(seed=2), PROFILES["large"]).content
        assert full is not None
        late, early = full.split()[12], full.split()[4]
        p = plan(payload(seed=2, stop=[late, early]), PROFILES["large"])
        assert p.content == full[: min(full.index(early), full.index(late))]

    @pytest.mark.parametrize(
        ("extra", "param"),
        [({"max_tokens": 0}, "max_tokens"), ({"stop": 5}, "stop"), ({"messages": []}, "messages")],
    )
    def test_invalid_requests_name_the_bad_parameter(self, extra: dict[str, Any], param: str) -> None:
        with pytest.raises(InvalidRequest) as info:
            plan({**payload(), **extra}, INSTANT)
        assert info.value.param == param


class TestFormats:
    def test_json_object_mode_returns_a_parsable_object(self) -> None:
        p = plan(payload(seed=4, response_format={"type": "json_object"}), PROFILES["lightweight"])
        assert p.content is not None
        data = orjson.loads(p.content)
        assert isinstance(data["answer"], str) and data["answer"]
        assert p.completion_tokens == count_tokens(p.content)

    def test_json_schema_mode_fills_the_schema_properties(self) -> None:
        schema = {
            "type": "object",
            "properties": {
                "title": {"type": "string"},
                "score": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "mood": {"enum": ["happy", "sad"]},
                "ok": {"type": "boolean"},
                "where": {"$ref": "#/$defs/Place"},
            },
            "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}}},
        }
        fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}
        p = plan(payload(seed=4, response_format=fmt), INSTANT)
        data = orjson.loads(p.content or "")
        assert isinstance(data["title"], str) and isinstance(data["score"], int)
        assert data["tags"] and all(isinstance(t, str) for t in data["tags"])
        assert data["mood"] in ("happy", "sad") and isinstance(data["ok"], bool)
        assert isinstance(data["where"]["city"], str)

    TOOLS: ClassVar[list[dict[str, Any]]] = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
    ]

    def test_required_tool_choice_returns_a_tool_call(self) -> None:
        p = plan(payload(seed=1, tools=self.TOOLS, tool_choice="required"), INSTANT)
        assert p.finish_reason == "tool_calls" and p.content is None and len(p.tool_calls) == 1
        call = p.tool_calls[0]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] in ("get_weather", "get_time")
        assert call["function"]["arguments"] == "{}"
        assert p.completion_tokens > 0

    def test_named_tool_choice_calls_that_function(self) -> None:
        choice = {"type": "function", "function": {"name": "get_time"}}
        p = plan(payload(seed=1, tools=self.TOOLS, tool_choice=choice), INSTANT)
        assert p.tool_calls[0]["function"]["name"] == "get_time"
        body = completion_body(p, "sim", "chatcmpl-t")
        assert body["choices"][0]["message"]["tool_calls"] == p.tool_calls
        assert body["choices"][0]["finish_reason"] == "tool_calls"

    def test_auto_tool_choice_answers_in_text(self) -> None:
        p = plan(payload(seed=1, tools=self.TOOLS, tool_choice="auto"), INSTANT)
        assert not p.tool_calls and p.content

    def test_tool_calls_stream_as_deltas(self) -> None:
        p = plan(payload(seed=1, tools=self.TOOLS, tool_choice="required"), INSTANT)
        chunks = list(chunk_bodies(p, "sim", "chatcmpl-t", include_usage=False))
        deltas = [c["choices"][0]["delta"] for c in chunks]
        calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
        assert calls[0]["id"] == p.tool_calls[0]["id"]
        assert calls[0]["function"]["name"] == p.tool_calls[0]["function"]["name"]
        assert "".join(c["function"]["arguments"] for c in calls) == "{}"
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


class TestChunks:
    def test_stream_shape_role_first_then_pieces_then_finish_then_usage(self) -> None:
        p = plan(payload(seed=5, max_tokens=4), PROFILES["large"])
        chunks = list(chunk_bodies(p, "sim", "chatcmpl-s", include_usage=True))
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert [c["choices"][0]["delta"] for c in chunks[1:5]] == [{"content": x} for x in p.pieces]
        finish = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
        assert chunks[5]["choices"][0] == finish
        assert chunks[6]["choices"] == [] and chunks[6]["usage"]["completion_tokens"] == 4
        assert len(chunks) == 7
        assert {c["id"] for c in chunks} == {"chatcmpl-s"} and len({c["created"] for c in chunks}) == 1
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)

    def test_no_usage_chunk_unless_asked(self) -> None:
        p = plan(payload(seed=5), INSTANT)
        chunks = list(chunk_bodies(p, "sim", "chatcmpl-s", include_usage=False))
        assert all(c["choices"] and "usage" not in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


class TestProfiles:
    def test_large_is_slower_and_more_accurate_than_lightweight(self) -> None:
        large, light = PROFILES["large"], PROFILES["lightweight"]
        assert large.ttft_ms > light.ttft_ms and large.tokens_per_second < light.tokens_per_second
        assert large.accuracy == 0.92 and light.accuracy == 0.80

    def test_instant_has_no_latency(self) -> None:
        p = plan(payload(seed=1), INSTANT)
        assert p.ttft_s == 0 and p.token_interval_s == 0 and p.fault is None

    def test_latency_comes_from_the_latency_rng(self) -> None:
        a = plan(payload(seed=1), PROFILES["large"], random.Random(3))
        b = plan(payload(seed=1), PROFILES["large"], random.Random(3))
        c = plan(payload(seed=1), PROFILES["large"], random.Random(4))
        assert a.ttft_s == b.ttft_s != c.ttft_s
        assert 0.1 < a.ttft_s < 1.5 and math.isclose(a.token_interval_s, 1 / 35, rel_tol=0.5)

    def test_flaky_fails_about_half_the_time(self) -> None:
        rng = random.Random(0)
        faults = [plan(payload(seed=1), PROFILES["flaky"], rng).fault for _ in range(1000)]
        assert set(faults) == {None, "error-500"}
        assert 400 < faults.count("error-500") < 600


class TestSimulatedBackend:
    async def test_complete_returns_the_body_bytes_and_their_parse(self) -> None:
        backend = SimulatedBackend(INSTANT, "sim-model")
        spans = Spans()
        completion = await backend.complete(payload(seed=1), spans)
        assert orjson.loads(completion.body) == completion.data
        assert completion.data["model"] == "sim-model"
        expected = plan({**payload(seed=1), "model": "sim-model"}, INSTANT)
        assert completion.data["choices"][0]["message"]["content"] == expected.content
        assert "upstream_connect" in spans.durations
        assert await backend.ready() == Readiness(True, "simulated")
        await backend.aclose()

    async def test_complete_takes_the_planned_time(self) -> None:
        profile = PROFILES["lightweight"]
        backend = SimulatedBackend(profile, "light", rng=random.Random(9))
        expected = plan({**payload(seed=1, max_tokens=5), "model": "light"}, profile, random.Random(9))
        start = time.perf_counter()
        await backend.complete(payload(seed=1, max_tokens=5), Spans())
        assert time.perf_counter() - start >= expected.ttft_s + 5 * expected.token_interval_s - 0.005

    async def test_stream_yields_every_chunk_paced_and_ends_after_usage(self) -> None:
        profile = PROFILES["lightweight"]
        backend = SimulatedBackend(profile, "light", rng=random.Random(9))
        body = payload(seed=1, max_tokens=6, stream=True, stream_options={"include_usage": True})
        expected = plan({**body, "model": "light"}, profile, random.Random(9))
        start = time.perf_counter()
        chunks = [orjson.loads(data) async for data in backend.stream(body, Spans())]
        assert time.perf_counter() - start >= expected.duration_s - 0.005
        assert "".join(content_chunks(chunks)) == expected.content
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
        assert len(chunks) == 1 + 6 + 1 + 1

    async def test_stream_sends_nothing_until_iterated(self) -> None:
        spans = Spans()
        stream = SimulatedBackend(INSTANT, "sim").stream(payload(), spans)
        assert "upstream_connect" not in spans.durations
        first = await anext(aiter(stream))
        assert orjson.loads(first)["choices"][0]["delta"]["role"] == "assistant"
        assert "upstream_connect" in spans.durations
        await stream.aclose()  # type: ignore[attr-defined]

    async def test_error_500_raises_a_retryable_status_error_with_an_openai_body(self) -> None:
        backend = SimulatedBackend(PROFILES["error-500"], "broken")
        with pytest.raises(UpstreamError) as info:
            await backend.complete(payload(), Spans())
        assert info.value.kind == "status" and info.value.status == 500 and info.value.retryable
        assert orjson.loads(info.value.body or b"")["error"]["type"] == "server_error"
        with pytest.raises(UpstreamError) as info:
            _ = [c async for c in backend.stream(payload(), Spans())]
        assert info.value.kind == "status" and info.value.status == 500

    async def test_hang_never_answers_so_the_callers_timeout_applies(self) -> None:
        backend = SimulatedBackend(PROFILES["hang"], "hung")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(backend.complete(payload(), Spans()), 0.05)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(aiter(backend.stream(payload(), Spans()))), 0.05)

    async def test_cut_stream_delivers_a_few_chunks_then_raises_truncated(self) -> None:
        backend = SimulatedBackend(PROFILES["cut-stream"], "cut")
        received: list[bytes] = []
        with pytest.raises(UpstreamError) as info:
            async for data in backend.stream(payload(seed=1), Spans()):
                received.append(data)
        assert info.value.kind == "truncated" and info.value.retryable
        assert len(received) == CUT_AFTER_CHUNKS
        with pytest.raises(UpstreamError) as info:
            await backend.complete(payload(seed=1), Spans())
        assert info.value.kind == "truncated"

    async def test_invalid_payload_is_a_non_retryable_400(self) -> None:
        with pytest.raises(UpstreamError) as info:
            await SimulatedBackend(INSTANT, "sim").complete({"model": "sim", "messages": "hi"}, Spans())
        assert info.value.status == 400 and not info.value.retryable
        assert orjson.loads(info.value.body or b"")["error"]["param"] == "messages"
