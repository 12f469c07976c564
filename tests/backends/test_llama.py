"""Iros in front of a real model server nobody here wrote: llama.cpp's OpenAI-compatible server
(llama-cpp-python) serving SmolLM2-135M-Instruct, driven with the official openai SDK."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from iros.bench.pairs import DEFAULT_PAIRS, read_pairs
from iros.testing.iros import IrosProcess, wait_until
from iros.testing.llama import LlamaServer, gpu_offload, llama_venv

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (llama_venv() / ".installed").is_file(), reason="no local model: scripts/install --local-model"
    ),
]

MODEL = "smollm2"
# A stop sequence ends the answer at its first sentence: finish_reason "stop", so it may be cached.
SENTENCE: dict[str, Any] = {"temperature": 0, "max_tokens": 48, "stop": ["."]}
FAST_METRICS = {"live_interval_seconds": 0.2, "collection_interval_seconds": 0.5}


def gateway(llama: LlamaServer, **extra: Any) -> IrosProcess:
    return IrosProcess.serve(
        {
            "auth": {"open": True},
            "models": [llama.model_settings()],
            "cache": {"enabled": True, "semantic": False},
            "metrics_collection": FAST_METRICS,
            **extra,
        }
    )


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaServer]:
    # Loaded for embeddings too, so the one server answers chat, completions and embeddings.
    with LlamaServer(embedding=True) as server:
        yield server


@pytest.fixture(scope="module")
def iros(llama: LlamaServer) -> Iterator[IrosProcess]:
    with gateway(llama) as server:
        yield server


@pytest.fixture
def client(iros: IrosProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{iros.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
def direct(llama: LlamaServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=llama.base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture
async def aclient(iros: IrosProcess) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{iros.url}/v1", api_key="unused", max_retries=0, timeout=300
    ) as c:
        yield c


class TestAnswers:
    def test_whole_answer_then_its_repeat_is_a_cache_hit(self, client: openai.OpenAI) -> None:
        """A real answer comes through whole; asking again is served from the cache, word for word."""
        messages = ask("What is the capital of France?")
        first = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, **SENTENCE)  # type: ignore[arg-type]
        again = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, **SENTENCE)  # type: ignore[arg-type]
        answer, cached = first.parse(), again.parse()
        assert first.headers["x-iros-cache"] == "miss"
        assert answer.choices[0].finish_reason == "stop"
        assert answer.choices[0].message.content
        assert answer.usage is not None and answer.usage.completion_tokens > 0
        assert again.headers["x-iros-cache"] == "hit"
        assert cached.choices[0].message.content == answer.choices[0].message.content

    async def test_stream_gets_a_counted_usage_chunk_and_replays_as_a_stream(
        self, aclient: openai.AsyncOpenAI, iros: IrosProcess
    ) -> None:
        """llama.cpp sends no usage in a stream: Iros counts it for the client that asked, never zero,
        and the metrics say the count is Iros's; the repeat is replayed as a stream with the same usage."""

        async def streamed() -> tuple[str, list[Any], str]:
            raw = await aclient.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=ask("Name a primary colour."),  # type: ignore[arg-type]
                stream=True,
                stream_options={"include_usage": True},
                **SENTENCE,
            )
            chunks = [chunk async for chunk in raw.parse()]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return text, chunks, raw.headers["x-iros-cache"]

        text, chunks, cache = await streamed()
        assert cache == "miss" and text
        usage = chunks[-1].usage
        assert usage is not None and chunks[-1].choices == []
        assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert sum(c.usage is not None for c in chunks) == 1

        replayed, again, cache = await streamed()
        assert cache == "hit" and replayed == text
        assert again[-1].usage is not None and again[-1].usage.completion_tokens == usage.completion_tokens

        counted = f'iros_tokens_total{{model="{MODEL}",type="output",usage="counted"}}'
        wait_until(lambda: counted in httpx.get(f"{iros.url}/metrics").text, "counted tokens in /metrics")

    def test_cut_short_answer_passes_through_and_is_never_cached(self, client: openai.OpenAI) -> None:
        """finish_reason "length" reaches the client as the server said it, and the repeat asks again."""
        messages = ask("Write a long story about a lighthouse keeper.")
        replies = [
            client.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=6,
                temperature=0,
            )
            for _ in range(2)
        ]
        assert [r.parse().choices[0].finish_reason for r in replies] == ["length", "length"]
        assert [r.headers["x-iros-cache"] for r in replies] == ["miss", "miss"]

    @pytest.mark.parametrize(
        "params",
        [
            pytest.param({"response_format": {"type": "json_object"}, "max_tokens": 24}, id="json-mode"),
            pytest.param(
                {
                    "tools": [
                        {
                            "type": "function",
                            "function": {
                                "name": "get_weather",
                                "parameters": {
                                    "type": "object",
                                    "properties": {"city": {"type": "string"}},
                                    "required": ["city"],
                                },
                            },
                        }
                    ],
                    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                    "max_tokens": 32,
                },
                id="forced-tool-call",
            ),
            pytest.param({"logprobs": True, "top_logprobs": 2, "max_tokens": 6}, id="logprobs"),
        ],
    )
    def test_features_pass_through_unchanged(
        self, client: openai.OpenAI, direct: openai.OpenAI, params: dict[str, Any]
    ) -> None:
        """JSON mode, a forced tool call and logprobs come back through Iros as the server answers them."""
        messages = ask("What is the weather in Paris? Answer in JSON.")
        via = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **params)  # type: ignore[arg-type]
        straight = direct.chat.completions.create(model=MODEL, messages=messages, temperature=0, **params)  # type: ignore[arg-type]
        # Tool call ids are the server's random ones: the same answer has another id each time.
        ids = {"message": {"tool_calls": {"__all__": {"id"}}}}
        assert via.choices[0].model_dump(exclude=ids) == straight.choices[0].model_dump(exclude=ids)
        if "tools" in params:
            call = via.choices[0].message.tool_calls
            assert call and call[0].function.name == "get_weather"
        if "logprobs" in params:
            assert via.choices[0].logprobs is not None and via.choices[0].logprobs.content


class TestOtherEndpoints:
    def test_text_completion_whole_and_streamed_with_counted_usage(
        self, client: openai.OpenAI, direct: openai.OpenAI
    ) -> None:
        """The legacy completions API through Iros answers as the server does, whole and streamed; the
        stream's usage, which llama.cpp does not send, is counted by Iros."""
        params: dict[str, Any] = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8}
        via = client.completions.create(temperature=0, **params)
        straight = direct.completions.create(temperature=0, **params)
        assert via.choices[0].text and via.choices[0].text == straight.choices[0].text
        chunks = list(
            client.completions.create(
                temperature=0, stream=True, stream_options={"include_usage": True}, **params
            )
        )
        assert "".join(c.choices[0].text for c in chunks if c.choices) == via.choices[0].text
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens > 0 and usage.prompt_tokens > 0

    def test_embeddings_come_through_and_repeat_from_the_cache(self, client: openai.OpenAI) -> None:
        """llama.cpp's embeddings reach the client as it sent them; the same request again is an exact hit."""
        texts = ["a lighthouse on the coast", "a road through the hills"]
        first = client.embeddings.with_raw_response.create(model=MODEL, input=texts, encoding_format="float")
        again = client.embeddings.with_raw_response.create(model=MODEL, input=texts, encoding_format="float")
        answer = first.parse()
        assert first.headers["x-iros-cache"] == "miss" and first.headers["x-iros-model"] == MODEL
        assert [d.index for d in answer.data] == [0, 1] and all(d.embedding for d in answer.data)
        assert again.headers["x-iros-cache"] == "hit"
        assert [d.embedding for d in again.parse().data] == [d.embedding for d in answer.data]


class TestRefusals:
    def test_prompt_over_the_context_gets_the_upstreams_400(
        self, client: openai.OpenAI, llama: LlamaServer
    ) -> None:
        """The server's own refusal, with its message, not a 502."""
        words = " ".join(["lighthouse"] * (llama.context + 200))
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=ask(words), max_tokens=4)  # type: ignore[arg-type]
        assert caught.value.status_code == 400
        assert "context" in caught.value.message.lower()

    def test_more_than_one_choice_is_refused_before_the_server(self, client: openai.OpenAI) -> None:
        """llama.cpp would answer one choice for n=2 and say nothing: Iros refuses it up front."""
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=ask("hi"), n=2, max_tokens=4)  # type: ignore[arg-type]
        assert caught.value.status_code == 400
        assert caught.value.param == "n" or "n" in caught.value.message


async def test_concurrent_requests_queue_in_iros_and_time_the_real_stream(
    aclient: openai.AsyncOpenAI, iros: IrosProcess
) -> None:
    """16 at once on a server that decodes one at a time: all answered whole (a second request reaching
    llama.cpp would interrupt the first), and TTFT and TPOT come from its token stream."""

    async def one(i: int) -> tuple[str | None, int]:
        stream = await aclient.chat.completions.create(
            model=MODEL,
            messages=ask(f"Count from {i} to {i + 5}."),  # type: ignore[arg-type]
            max_tokens=8,
            temperature=0,
            stream=True,
        )
        finish, pieces = None, 0
        async for chunk in stream:
            for choice in chunk.choices:
                pieces += bool(choice.delta.content)
                finish = choice.finish_reason or finish
        return finish, pieces

    results = await asyncio.gather(*(one(i) for i in range(16)))
    assert all(finish in ("stop", "length") and pieces > 0 for finish, pieces in results), results

    await asyncio.to_thread(check_real_stream_timings, iros.url)


def check_real_stream_timings(url: str) -> None:
    def model_metrics() -> dict[str, Any] | None:
        body: dict[str, Any] = httpx.get(f"{url}/api/metrics/models/{MODEL}").json()
        return body if body.get("tpot_avg_ms") and body.get("successful", 0) >= 16 else None

    metrics = wait_until(model_metrics, "TPOT in the per-model metrics", timeout=15)
    assert metrics["ttft_avg_ms"] > 0
    # A token at a time from a 135M model on a CPU: milliseconds apart, not the microseconds of a buffer.
    assert metrics["tpot_avg_ms"] > 1.0
    # The wait for the one connection is timed as the model's (upstream_queue), not as Iros's.
    exposition = httpx.get(f"{url}/metrics").text
    assert 'stage="upstream_queue"' in exposition


def test_server_killed_mid_stream(tmp_path: Any) -> None:
    """The client's stream ends with an error event and no [DONE]; nothing is cached; the next request
    gets a clean 502/503; once the server is back, the breaker lets traffic through again."""
    llama = LlamaServer().start()
    try:
        breaker = {"failure_threshold": 2, "window_seconds": 30, "open_seconds": 1}
        with gateway(
            llama, optimization={"circuit_breaker": breaker}, retry={"attempts": 2, "backoff_ms": 10}
        ) as iros:
            body = {
                "model": MODEL,
                "messages": ask("Write a long story about a lighthouse keeper."),
                "max_tokens": 120,
                "temperature": 0,
                "stream": True,
            }
            events: list[bytes] = []
            with httpx.stream("POST", f"{iros.url}/v1/chat/completions", json=body, timeout=60) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        events.append(line[5:].strip().encode())
                        if len(events) == 3:
                            llama.signal(signal.SIGKILL)
            assert b"[DONE]" not in events
            error = orjson.loads(events[-1])
            assert "error" in error and error["error"]["message"]

            whole = {**body, "stream": False}
            after = httpx.post(f"{iros.url}/v1/chat/completions", json=whole, timeout=60)
            assert after.status_code in (502, 503)
            assert after.json()["error"]["message"]

            llama.stop()
            llama.start()
            time.sleep(1.2)  # the breaker's open_seconds

            def answered() -> httpx.Response | None:
                reply = httpx.post(f"{iros.url}/v1/chat/completions", json=whole, timeout=60)
                return reply if reply.status_code == 200 else None

            back = wait_until(answered, "an answer once the server is back", timeout=30, interval=0.5)
            assert back.headers["x-iros-cache"] == "miss"  # the cut stream was never cached
            assert back.json()["choices"][0]["message"]["content"]
    finally:
        llama.stop()


@pytest.mark.skipif(not DEFAULT_PAIRS.exists(), reason=f"{DEFAULT_PAIRS} is not here")
@pytest.mark.timeout(300)  # two `iros serve` runs over the same stream, one answer at a time upstream
def test_workload_bench_against_the_real_server(llama: LlamaServer) -> None:
    """`iros bench workload --upstream`: the same stream through Iros with the cache on and off, streamed
    from the real model, with time to first token and tokens per second from its answers."""
    from iros.bench.workload import run_workload

    result = run_workload(
        read_pairs(DEFAULT_PAIRS, 300), requests=20, concurrency=4, upstream=llama.base_url, max_tokens=32
    )
    assert result["errors"] == {"cache_on": 0, "cache_off": 0}
    assert result["hits"]["exact"] > 0 and result["hits"]["miss"] > 0
    on, off = result["cache_on"], result["cache_off"]
    for timing in (on, off):
        assert 0 < timing["ttft_mean_ms"] <= timing["mean_ms"]
        assert timing["completion_tokens"] > 0 and timing["tokens_per_second"] > 0
    assert on["completion_tokens"] == pytest.approx(off["completion_tokens"], rel=0.25)
    for timing in (on, off):  # Iros's own time on the answers that went upstream, from its header
        assert 0 < timing["iros_overhead_ms"]["p50"] < timing["p50_ms"]


def nvidia_gpu() -> bool:
    return (
        shutil.which("nvidia-smi") is not None
        and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    )


@pytest.mark.skipif(
    not nvidia_gpu(), reason="no NVIDIA GPU here: the CUDA path is checked where there is one"
)
def test_on_a_gpu_the_model_decodes_there_and_its_load_shows_in_the_gpu_metrics(
    llama: LlamaServer, iros: IrosProcess
) -> None:
    """llama.cpp built with CUDA serves the same model on the GPU, and under real inference Iros's NVML
    path reports it: utilisation and memory series per GPU, the /metrics gauges, and each response's
    GPU figure."""
    assert gpu_offload(), (
        "llama.cpp was built without CUDA on a GPU machine: rerun scripts/install --local-model"
    )
    assert llama.proc is not None
    apps = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"], capture_output=True, text=True
    )
    assert str(llama.proc.pid) in apps.stdout.split(), "the model server holds no GPU memory"

    busy = True

    def load() -> None:
        with openai.OpenAI(base_url=f"{iros.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
            n = 0
            while busy:  # new questions, so no cache hit spares the GPU
                n += 1
                c.chat.completions.create(
                    model=MODEL, messages=ask(f"Count from {n} to {n + 40} in words."), max_tokens=64
                )

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:

        def gpu_busy() -> dict[str, Any] | None:
            current = httpx.get(f"{iros.url}/api/metrics/current").json()
            system = current["system"]
            return current if (system.get("gpu_utilization") or 0) > 0 else None

        current = wait_until(gpu_busy, "GPU utilisation above 0 under inference", timeout=60)
    finally:
        busy = False
        worker.join(timeout=120)
    gpus = current["system"]["gpus"]
    assert gpus and gpus[0]["memory_percent"] > 0
    assert any(r["gpu_usage"] is not None for r in current["recent_responses"])
    metrics = httpx.get(f"{iros.url}/metrics").text
    assert 'iros_gpu_utilization_percent{gpu="0"}' in metrics
    assert 'iros_gpu_memory_percent{gpu="0"}' in metrics
