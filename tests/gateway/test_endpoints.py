"""/v1/completions and /v1/embeddings through the one pipeline: validated, cached exactly, routed, failed
over and metered like chat; in-process with the simulated backend, and end to end with the openai SDK."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from iros.app import IrosApp, create_app
from iros.backends.endpoints import EMBEDDING_DIM, embed
from iros.config import load_settings
from iros.core.record import RequestRecord
from iros.testing.iros import IrosProcess
from tests.conftest import CLIENT_KEY

PROMPT = {"model": "m", "prompt": "Say something.", "max_tokens": 40, "stop": "."}
INPUT = {"model": "m", "input": ["first text", "second text"]}


@pytest.fixture
async def app(tmp_path: Any) -> AsyncIterator[tuple[IrosApp, list[RequestRecord]]]:
    settings = load_settings(
        None,
        {
            "server": {"data_dir": str(tmp_path)},
            "models": [
                {"name": "m", "backend": "simulated", "profile": "instant"},
                # The first deployment of "e" always fails: its answers come from the second.
                {"name": "e", "backend": "simulated", "profile": "error-500"},
                {"name": "e", "backend": "simulated", "profile": "instant"},
            ],
            "optimization": {"model_optimization": {"load_balancing": False}},
            "cache": {"semantic": False},
            "metrics_collection": {"enabled": False},
        },
    )
    app = create_app(settings)
    seen: list[RequestRecord] = []
    app.gateway.observers.append(seen.append)
    async with app.routes.router.lifespan_context(app.routes):
        yield app, seen


async def _post(app: IrosApp, path: str, body: dict[str, Any], method: str = "POST") -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
        return await http.request(method, path, json=body)


async def _until_cached(app: IrosApp, path: str, body: dict[str, Any]) -> httpx.Response:
    # Answers are written to the cache in the background: ask again until one is served from it.
    for _ in range(50):
        resp = await _post(app, path, body)
        if resp.headers["x-iros-cache"] == "hit":
            return resp
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} was never served from the cache")


class TestEmbeddings:
    async def test_an_identical_request_is_served_exactly_from_the_cache(
        self, app: tuple[IrosApp, list[RequestRecord]]
    ) -> None:
        """The second identical embeddings request is an exact hit with the same vectors."""
        gateway, seen = app
        first = await _post(gateway, "/v1/embeddings", INPUT)
        assert first.status_code == 200 and first.headers["x-iros-cache"] == "miss"
        hit = await _until_cached(gateway, "/v1/embeddings", INPUT)
        assert hit.json()["data"] == first.json()["data"]
        assert seen[0].operation == "embeddings" and seen[0].usage["prompt_tokens"] == 4

    async def test_another_input_or_another_endpoint_never_shares_an_entry(
        self, app: tuple[IrosApp, list[RequestRecord]]
    ) -> None:
        """A different input misses; the cache key names the endpoint."""
        gateway, _ = app
        await _until_cached(gateway, "/v1/embeddings", INPUT)
        other = await _post(gateway, "/v1/embeddings", {**INPUT, "input": ["first text"]})
        assert other.headers["x-iros-cache"] == "miss"

    async def test_a_failing_deployment_is_failed_over(
        self, app: tuple[IrosApp, list[RequestRecord]]
    ) -> None:
        """A deployment that answers 500 is passed for the model's next one, as for chat."""
        gateway, seen = app
        resp = await _post(gateway, "/v1/embeddings", {"model": "e", "input": "x", "iros": {"cache": False}})
        assert resp.status_code == 200 and len(resp.json()["data"]) == 1
        assert seen[-1].attempts == 2 and seen[-1].deployment == "e#1"

    @pytest.mark.parametrize(
        ("body", "param"),
        [
            ({"model": "m", "input": []}, "input"),
            ({"model": "m"}, "input"),
            ({"model": "m", "input": "x", "encoding_format": "hex"}, "encoding_format"),
            ({"model": "m", "input": "x", "dimensions": 0}, "dimensions"),
        ],
    )
    async def test_bad_requests_are_400s_naming_the_field(
        self, app: tuple[IrosApp, list[RequestRecord]], body: dict[str, Any], param: str
    ) -> None:
        """A malformed embeddings request is refused with a 400 naming the field, before any call."""
        gateway, seen = app
        resp = await _post(gateway, "/v1/embeddings", body)
        assert resp.status_code == 400
        assert resp.json()["error"]["param"] == param
        assert seen[-1].attempts == 0

    async def test_other_methods_are_a_405_naming_the_path(
        self, app: tuple[IrosApp, list[RequestRecord]]
    ) -> None:
        """GET on the endpoint is a 405 in the OpenAI shape that names it."""
        gateway, _ = app
        resp = await _post(gateway, "/v1/embeddings", {}, method="GET")
        assert resp.status_code == 405 and "/v1/embeddings" in resp.json()["error"]["message"]


class TestCompletions:
    async def test_whole_answer_is_cached_and_replayed_as_a_stream(
        self, app: tuple[IrosApp, list[RequestRecord]]
    ) -> None:
        """A cached text completion is replayed whole or as text_completion chunks with the same text."""
        gateway, seen = app
        first = await _post(gateway, "/v1/completions", PROMPT)
        text = first.json()["choices"][0]["text"]
        assert first.json()["object"] == "text_completion" and text
        await _until_cached(gateway, "/v1/completions", PROMPT)
        stream = await _post(gateway, "/v1/completions", {**PROMPT, "stream": True})
        assert stream.headers["x-iros-cache"] == "hit"
        events = [line[6:] for line in stream.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [orjson.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == text
        assert seen[0].operation == "text_completion"

    async def test_a_streamed_answer_is_put_back_together_for_the_cache(
        self, app: tuple[IrosApp, list[RequestRecord]]
    ) -> None:
        """A text stream that reached [DONE] is cached; the next whole request is a hit with its text."""
        gateway, seen = app
        streamed = await _post(gateway, "/v1/completions", {**PROMPT, "seed": 9, "stream": True})
        assert streamed.headers["x-iros-cache"] == "miss"
        pieces = [
            orjson.loads(line[6:])["choices"][0]["text"]
            for line in streamed.text.splitlines()
            if line.startswith("data: {")
        ]
        hit = await _until_cached(gateway, "/v1/completions", {**PROMPT, "seed": 9})
        assert hit.json()["choices"][0]["text"] == "".join(pieces)
        assert seen[0].usage["completion_tokens"] > 0

    async def test_several_prompts_at_once_are_refused(
        self, app: tuple[IrosApp, list[RequestRecord]]
    ) -> None:
        """One prompt per request (n is 1): a list of two prompts is a 400 naming prompt."""
        gateway, _ = app
        resp = await _post(gateway, "/v1/completions", {"model": "m", "prompt": ["a", "b"]})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt"


@pytest.mark.e2e
class TestOpenAISDK:
    """`iros serve` in front of `iros mock-upstream`, through the official SDK."""

    @pytest.fixture
    def client(self, iros: IrosProcess) -> Iterator[openai.OpenAI]:
        with openai.OpenAI(base_url=f"{iros.url}/v1", api_key=CLIENT_KEY, max_retries=0) as client:
            yield client

    def test_completions_whole_and_streamed(self, client: openai.OpenAI) -> None:
        """The legacy API answers whole and streamed with the same text for the same prompt and seed."""
        whole = client.completions.create(model="fast", prompt="Once upon a time", seed=11, max_tokens=10)
        chunks = list(
            client.completions.create(
                model="fast",
                prompt="Once upon a time",
                seed=11,
                max_tokens=10,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"iros": {"cache": "no-cache"}},
            )
        )
        assert whole.choices[0].text
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        assert (
            chunks[-1].usage is not None
            and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        )  # type: ignore[union-attr]

    def test_embeddings_are_failed_over_and_the_same_as_the_upstreams(self, client: openai.OpenAI) -> None:
        """Embeddings through Iros: a vector per input, a dead deployment skipped, the upstream's vectors."""
        raw = client.embeddings.with_raw_response.create(model="failover", input=["a river", "a road"])
        reply = raw.parse()
        assert len(reply.data) == 2 and reply.usage.prompt_tokens == 4
        assert raw.headers["x-iros-model"] == "failover"
        # The mock upstream's vectors are the simulated model's, named by its upstream model.
        expected = embed("instant", "a river", EMBEDDING_DIM)
        assert reply.data[0].embedding == pytest.approx(expected.tolist(), abs=1e-6)

    def test_bad_embeddings_request_is_a_400_the_sdk_raises(self, client: openai.OpenAI) -> None:
        """An empty input list is refused as a BadRequestError naming input."""
        with pytest.raises(openai.BadRequestError) as caught:
            client.embeddings.create(model="fast", input=[])
        assert caught.value.body["param"] == "input"  # type: ignore[index]
