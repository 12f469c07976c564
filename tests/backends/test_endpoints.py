"""The simulated model's legacy text completions and embeddings: deterministic, honestly counted, and
served by the in-process backend as by the mock server (tests/backends/test_mock_server.py)."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest

from iros.backends.endpoints import (
    EMBEDDING_DIM,
    embed,
    embedding_body,
    embedding_plan,
    text_chunk_bodies,
    text_completion_body,
    text_plan,
)
from iros.backends.simulated import SimulatedBackend
from iros.backends.simulation import PROFILES, InvalidRequest
from iros.core.errors import UpstreamError
from iros.core.spans import Spans
from iros.core.tokens import count_tokens

INSTANT = PROFILES["instant"]


class TestTextCompletions:
    def test_same_prompt_and_seed_give_the_same_text_and_usage_counts_the_prompt(self) -> None:
        """The answer is a function of the prompt and seed; prompt_tokens are the prompt's own tokens."""
        payload = {"model": "m", "prompt": "Once upon a time, there was", "seed": 3}
        a, b = text_plan(payload, INSTANT), text_plan(payload, INSTANT)
        assert a.content == b.content and a.content
        assert a.prompt_tokens == count_tokens("Once upon a time, there was")
        body = text_completion_body(a, "m", "cmpl-1")
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"] == a.content
        assert body["usage"]["total_tokens"] == a.prompt_tokens + a.completion_tokens

    def test_stream_chunks_join_to_the_whole_answer(self) -> None:
        """The chunks' texts join to the text, the last choice says why it ended, the usage comes last."""
        p = text_plan({"model": "m", "prompt": "Tell me", "max_tokens": 6}, INSTANT)
        chunks = list(text_chunk_bodies(p, "m", "cmpl-1", include_usage=True))
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        assert text == p.content
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == p.usage

    def test_a_prompt_that_is_not_text_or_tokens_is_refused_by_name(self) -> None:
        """A prompt of another shape is an InvalidRequest naming `prompt`."""
        with pytest.raises(InvalidRequest) as caught:
            text_plan({"model": "m", "prompt": {"text": "hi"}}, INSTANT)
        assert caught.value.param == "prompt"


class TestEmbeddings:
    def test_vectors_are_unit_length_deterministic_and_closer_for_shared_words(self) -> None:
        """The same text gives the same unit vector; texts sharing words are nearer than unrelated ones."""
        a, again = embed("m", "the river runs", 64), embed("m", "the river runs", 64)
        near, far = embed("m", "the river flows", 64), embed("m", "quantum ledger", 64)
        assert np.array_equal(a, again)
        assert abs(float(np.linalg.norm(a)) - 1) < 1e-5
        assert float(a @ near) > float(a @ far)

    def test_body_has_one_vector_per_input_in_order_with_input_usage(self) -> None:
        """A list of inputs gives one embedding each, indexed in order, and usage counts only input."""
        payload = {"model": "m", "input": ["one fish", "two fish", "red"]}
        body = embedding_body(payload, "m")
        assert [d["index"] for d in body["data"]] == [0, 1, 2]
        assert all(len(d["embedding"]) == EMBEDDING_DIM for d in body["data"])
        assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}

    def test_base64_and_dimensions_are_honoured(self) -> None:
        """encoding_format base64 carries little-endian float32; dimensions sets the vector size."""
        payload = {"model": "m", "input": "hi there", "encoding_format": "base64", "dimensions": 8}
        raw = embedding_body(payload, "m")["data"][0]["embedding"]
        vector = np.frombuffer(base64.b64decode(raw), dtype="<f4")
        assert vector.shape == (8,)
        assert np.allclose(vector, embed("m", "hi there", 8))

    def test_bad_dimensions_are_refused_by_name(self) -> None:
        """A dimensions value out of range names the parameter."""
        with pytest.raises(InvalidRequest) as caught:
            embedding_plan({"model": "m", "input": "x", "dimensions": 0}, INSTANT)
        assert caught.value.param == "dimensions"


class TestSimulatedBackend:
    async def test_each_operation_answers_in_its_endpoints_shape(self) -> None:
        """complete() answers chat, text_completion and embeddings each in the OpenAI shape."""
        backend = SimulatedBackend(INSTANT, "sim")
        text = await backend.complete({"model": "sim", "prompt": "hi"}, Spans(), "text_completion")
        vectors = await backend.complete({"model": "sim", "input": ["a", "b"]}, Spans(), "embeddings")
        assert text.data["object"] == "text_completion" and text.data["id"].startswith("cmpl-")
        assert orjson.loads(vectors.body) == vectors.data
        assert vectors.data["object"] == "list" and len(vectors.data["data"]) == 2

    async def test_text_stream_is_paced_chunks_of_text(self) -> None:
        """stream() of a text completion yields text_completion chunks that join to the answer."""
        backend = SimulatedBackend(INSTANT, "sim")
        payload = {"model": "sim", "prompt": "hi", "seed": 2}
        chunks = [orjson.loads(c) async for c in backend.stream(payload, Spans(), "text_completion")]
        whole = await backend.complete(payload, Spans(), "text_completion")
        assert {c["object"] for c in chunks} == {"text_completion"}
        assert "".join(c["choices"][0]["text"] for c in chunks) == whole.data["choices"][0]["text"]

    async def test_faults_apply_to_embeddings_too(self) -> None:
        """An error-500 profile fails an embeddings call as it fails a chat call."""
        backend = SimulatedBackend(PROFILES["error-500"], "sim")
        with pytest.raises(UpstreamError) as caught:
            await backend.complete({"model": "sim", "input": "x"}, Spans(), "embeddings")
        assert caught.value.status == 500
