"""The response cache end to end: real Iros processes in front of real upstreams, exact and semantic
hits, replay as JSON and as SSE, the request's own cache controls, tenants, what is never cached,
restart, control and analysis endpoints."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from iros.testing.iros import IrosProcess, wait_until
from tests.conftest import ADMIN_KEY, CLIENT_KEY, RecordingUpstream

pytestmark = pytest.mark.e2e

OTHER_KEY = "sk-client-other"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def cache_config(
    upstream: IrosProcess, recorder: RecordingUpstream, data_dir: Path, **cache: Any
) -> dict[str, Any]:
    up = f"{upstream.url}/v1"
    return {
        "server": {"data_dir": str(data_dir)},
        "auth": {
            "api_keys": [{"name": "team-a", "key": CLIENT_KEY}, {"name": "team-b", "key": OTHER_KEY}],
            "admin_keys": [{"name": "ops", "key_env": "TEST_ADMIN_KEY"}],
        },
        "retry": {"attempts": 1},
        "models": [
            {"name": "recorded", "base_url": recorder.url, "upstream_model": "rec-model"},
            {"name": "fast", "base_url": up, "upstream_model": "instant"},
            {"name": "broken", "base_url": up, "upstream_model": "error-500"},
            {"name": "cutting", "base_url": up, "upstream_model": "cut-stream"},
        ],
        "cache": {"enabled": True, "semantic": False, **cache},
    }


@pytest.fixture(scope="module")
def cached(
    upstream: IrosProcess, recorder: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[IrosProcess]:
    config = cache_config(upstream, recorder, tmp_path_factory.mktemp("cache-data"))
    with IrosProcess.serve(config, env={"TEST_ADMIN_KEY": ADMIN_KEY}) as proc:
        yield proc


def ask(proc: IrosProcess, body: dict[str, Any], key: str = CLIENT_KEY, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{proc.url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}", **headers},
        timeout=30,
    )


def warm(proc: IrosProcess, body: dict[str, Any]) -> dict[str, Any]:
    """Start a cache warm and wait for the background job to finish; its final progress."""
    started = httpx.post(f"{proc.url}/api/optimization/cache/warm", headers=ADMIN, json=body, timeout=30)
    assert started.status_code == 202, started.text

    def finished() -> dict[str, Any] | None:
        job: dict[str, Any] = httpx.get(f"{proc.url}{started.json()['progress']}", headers=ADMIN).json()
        return job if job["state"] == "done" else None

    return wait_until(finished, "the cache warm to finish", timeout=30)


def question(text: str, model: str = "recorded", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0, **extra}


def sse(resp: httpx.Response) -> list[str]:
    return [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]


class TestExact:
    def test_second_identical_request_is_served_from_the_cache(
        self, cached: IrosProcess, recorder: RecordingUpstream
    ) -> None:
        body = question("exact one")
        before = len(recorder.requests)
        first, second = ask(cached, body), ask(cached, body)
        assert first.headers["x-iros-cache"] == "miss" and second.headers["x-iros-cache"] == "hit"
        assert len(recorder.requests) == before + 1
        a, b = first.json(), second.json()
        assert b["choices"] == a["choices"] and b["usage"] == a["usage"]
        assert b["id"] != a["id"]  # a replay is a new response
        assert second.headers["x-iros-model"] == "recorded"

    def test_a_cached_answer_replays_as_sse_with_usage(self, cached: IrosProcess) -> None:
        body = question("replay me")
        whole = ask(cached, body).json()
        stream = ask(cached, {**body, "stream": True, "stream_options": {"include_usage": True}})
        assert stream.headers["x-iros-cache"] == "hit"
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = sse(stream)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text == whole["choices"][0]["message"]["content"]
        assert chunks[-1]["usage"] == whole["usage"] and chunks[-1]["choices"] == []
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        assert finish[-1] == "stop"

    def test_the_openai_sdk_reads_a_replayed_stream(self, cached: IrosProcess) -> None:
        client = OpenAI(base_url=f"{cached.url}/v1", api_key=CLIENT_KEY)
        body = question("sdk replay", model="fast", max_tokens=64)
        first = client.chat.completions.create(**body)
        assert first.choices[0].finish_reason == "stop"
        raw = client.chat.completions.with_raw_response.create(**body, stream=True)
        assert raw.headers["x-iros-cache"] == "hit"
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        assert text == first.choices[0].message.content

    def test_a_streamed_answer_is_cached_and_served_whole(self, cached: IrosProcess) -> None:
        body = question("stream first", model="fast", max_tokens=64)
        streamed = ask(cached, {**body, "stream": True})
        assert streamed.headers["x-iros-cache"] == "miss"
        text = "".join(
            json.loads(e)["choices"][0]["delta"].get("content") or ""
            for e in sse(streamed)[:-1]
            if json.loads(e)["choices"]
        )
        whole = ask(cached, body)
        assert whole.headers["x-iros-cache"] == "hit"
        assert whole.json()["choices"][0]["message"]["content"] == text

    def test_parameters_are_part_of_the_key(self, cached: IrosProcess) -> None:
        ask(cached, question("params", max_tokens=10))
        assert ask(cached, question("params", max_tokens=11)).headers["x-iros-cache"] == "miss"
        assert ask(cached, question("params", max_tokens=10, seed=3)).headers["x-iros-cache"] == "miss"
        system = {"role": "system", "content": "be brief"}
        longer = question("params", max_tokens=10)
        longer["messages"] = [system, *longer["messages"]]
        assert ask(cached, longer).headers["x-iros-cache"] == "miss"

    def test_tenants_never_read_each_others_answers(self, cached: IrosProcess) -> None:
        body = question("tenant secret")
        ask(cached, body)
        assert ask(cached, body).headers["x-iros-cache"] == "hit"
        assert ask(cached, body, key=OTHER_KEY).headers["x-iros-cache"] == "miss"


class TestControls:
    def test_cache_control_no_cache_goes_upstream_and_no_store_is_not_kept(
        self, cached: IrosProcess, recorder: RecordingUpstream
    ) -> None:
        body = question("controls")
        ask(cached, body)
        before = len(recorder.requests)
        assert ask(cached, body, **{"cache-control": "no-cache"}).headers["x-iros-cache"] == "miss"
        assert len(recorder.requests) == before + 1
        fresh = question("never kept")
        ask(cached, fresh, **{"cache-control": "no-store"})
        assert ask(cached, fresh).headers["x-iros-cache"] == "miss"

    def test_max_age_refuses_older_answers(self, cached: IrosProcess) -> None:
        body = question("aged")
        ask(cached, body)
        assert ask(cached, body, **{"cache-control": "max-age=0"}).headers["x-iros-cache"] == "miss"
        assert ask(cached, body, **{"cache-control": "max-age=600"}).headers["x-iros-cache"] == "hit"

    def test_the_iros_extension_switches_caching_off_and_never_goes_upstream(
        self, cached: IrosProcess, recorder: RecordingUpstream
    ) -> None:
        body = question("extension", iros={"cache": False})
        assert ask(cached, body).headers["x-iros-cache"] == "bypass"
        assert ask(cached, body).headers["x-iros-cache"] == "bypass"
        assert "iros" not in recorder.requests[-1]["body"]

    @pytest.mark.parametrize("bad", [{"cache": "sometimes"}, {"ttl": -1}, "yes", {"colour": 1}])
    def test_a_bad_extension_is_a_clear_400(self, cached: IrosProcess, bad: Any) -> None:
        resp = ask(cached, question("bad ext", iros=bad))
        assert resp.status_code == 400
        assert resp.json()["error"]["param"].startswith("iros")

    def test_hot_sampling_is_not_cached(self, cached: IrosProcess) -> None:
        body = question("creative", temperature=1.2)
        ask(cached, body)
        assert ask(cached, body).headers["x-iros-cache"] == "bypass"


class TestNeverCached:
    def test_errors_are_not_cached(self, cached: IrosProcess) -> None:
        body = question("fail", model="broken")
        assert ask(cached, body).status_code == 502
        second = ask(cached, body)
        assert second.status_code == 502 and second.headers.get("x-iros-cache") is None

    def test_a_cut_stream_is_not_cached(self, cached: IrosProcess) -> None:
        body = question("cut", model="cutting", stream=True, max_tokens=40)
        ask(cached, body)
        again = ask(cached, body)
        assert again.headers["x-iros-cache"] == "miss"
        assert sse(again)[-1] != "[DONE]"

    def test_an_answer_cut_by_max_tokens_is_not_cached(self, cached: IrosProcess) -> None:
        body = question("write a long story", model="fast", max_tokens=2)
        assert ask(cached, body).json()["choices"][0]["finish_reason"] == "length"
        assert ask(cached, body).headers["x-iros-cache"] == "miss"


class TestControlApi:
    def test_status_counts_hits_and_misses(self, cached: IrosProcess) -> None:
        body = question("counted")
        ask(cached, body)
        ask(cached, body)
        stats = httpx.get(f"{cached.url}/api/optimization/cache", headers=ADMIN).json()
        assert stats["exact_hits"] >= 1 and stats["misses"] >= 1
        assert stats["store"]["entries"] >= 1

    def test_tune_changes_limits_and_the_threshold(self, cached: IrosProcess) -> None:
        resp = httpx.put(
            f"{cached.url}/api/optimization/cache/tune",
            headers=ADMIN,
            json={"similarity_threshold": 0.9, "max_memory_mb": 64, "ttl": 3600},
        )
        assert resp.status_code == 200, resp.text
        applied = resp.json()["applied"]
        assert applied == {"similarity_threshold": 0.9, "max_memory_mb": 64.0, "ttl": 3600.0}
        bad = httpx.put(f"{cached.url}/api/optimization/cache/tune", headers=ADMIN, json={"ttl": -5})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "ttl"
        client = httpx.put(
            f"{cached.url}/api/optimization/cache/tune",
            headers={"authorization": f"Bearer {CLIENT_KEY}"},
            json={"ttl": 60},
        )
        assert client.status_code == 403

    def test_warming_fills_the_shared_namespace_every_tenant_reads(self, cached: IrosProcess) -> None:
        job = warm(
            cached, {"model": "recorded", "prompts": ["warm one", "warm two"], "params": {"temperature": 0}}
        )
        assert job["warmed"] == {"cached": 2}
        for key in (CLIENT_KEY, OTHER_KEY):
            assert ask(cached, question("warm one"), key=key).headers["x-iros-cache"] == "hit"

    def test_warming_from_misses_takes_the_most_frequent(self, cached: IrosProcess) -> None:
        for _ in range(8):  # more often than any other prompt this module sends
            ask(cached, question("popular miss"), **{"cache-control": "no-store"})
        assert warm(cached, {"from_misses": 1})["results"][0]["prompt"] == "popular miss"

    def test_analysis_reports_efficiency_and_patterns(self, cached: IrosProcess) -> None:
        body = question("analysed")
        ask(cached, body)
        ask(cached, body)
        efficiency = httpx.get(f"{cached.url}/api/analysis/cache/efficiency", headers=ADMIN).json()
        assert efficiency["hits"] >= 1 and efficiency["tokens_saved"] >= 4
        assert efficiency["bytes_per_entry"] > 0
        patterns = httpx.get(f"{cached.url}/api/analysis/cache/hit-patterns", headers=ADMIN).json()
        assert patterns["by_kind"]["exact"] >= 1 and patterns["top_entries"]
        assert sum(patterns["by_hour"][max(patterns["by_hour"])].values()) >= 1
        perf = httpx.get(f"{cached.url}/api/analysis/performance/cache", headers=ADMIN).json()
        assert perf["hit_rate"] is not None and perf["target"]["target"] == 0.7


def test_the_cache_survives_a_restart(
    upstream: IrosProcess, recorder: RecordingUpstream, tmp_path: Path
) -> None:
    config = cache_config(upstream, recorder, tmp_path)
    body = question("kept across restarts")
    with IrosProcess.serve(config, env={"TEST_ADMIN_KEY": ADMIN_KEY}) as proc:
        ask(proc, body)
    with IrosProcess.serve(config, env={"TEST_ADMIN_KEY": ADMIN_KEY}) as proc:
        assert ask(proc, body).headers["x-iros-cache"] == "hit"


def wait_semantic(proc: IrosProcess, timeout: float = 120) -> None:
    """The embedding model loads after start; exact caching works meanwhile."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{proc.url}/api/optimization/cache", headers=ADMIN).json()["semantic_ready"]:
            return
        time.sleep(0.2)
    raise AssertionError("the semantic cache did not become ready")


@pytest.fixture(scope="module")
def model_like() -> RecordingUpstream:
    """An upstream that takes a small model's time to answer (0.3 s): the semantic lookup, which runs
    beside the upstream call (cache.overlap), decides first, as it does against a real model."""
    return RecordingUpstream(delay=0.3).start()


@pytest.fixture(scope="module")
def semantic(
    upstream: IrosProcess, model_like: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[IrosProcess]:
    # A loose bound (cut 0.7): the prior alone serves a plain paraphrase; the default 0.05 waits for
    # verification to show where this traffic's cut may go (tests/cache/test_verification.py).
    config = cache_config(
        upstream, model_like, tmp_path_factory.mktemp("semantic-data"), semantic=True, max_false_hit_rate=0.3
    )
    with IrosProcess.serve(config, env={"TEST_ADMIN_KEY": ADMIN_KEY}) as proc:
        wait_semantic(proc)
        yield proc


class TestSemantic:
    def test_a_paraphrase_is_a_semantic_hit(self, semantic: IrosProcess) -> None:
        ask(semantic, question("What are the health benefits of drinking green tea?"))
        hit = ask(semantic, question("What are some health benefits of drinking green tea?"))
        assert hit.headers["x-iros-cache"] == "semantic_hit"

    def test_a_different_question_on_the_same_topic_is_a_miss(self, semantic: IrosProcess) -> None:
        ask(semantic, question("How many people live in Canada?"))
        assert ask(semantic, question("How many people live in Australia?")).headers["x-iros-cache"] == "miss"

    def test_another_conversation_never_matches(self, semantic: IrosProcess) -> None:
        """Only the last user turn is matched by meaning; the rest must be identical."""
        turn = {"role": "user", "content": "What does it cost?"}
        first = question("ignored")
        first["messages"] = [
            {"role": "user", "content": "Tell me about the iPhone 15"},
            {"role": "assistant", "content": "It is a phone."},
            turn,
        ]
        ask(semantic, first)
        other = question("ignored")
        other["messages"] = [
            {"role": "user", "content": "Tell me about a Tesla Model 3"},
            {"role": "assistant", "content": "It is a car."},
            {"role": "user", "content": "What does it cost?"},
        ]
        assert ask(semantic, other).headers["x-iros-cache"] == "miss"
        assert ask(semantic, first).headers["x-iros-cache"] == "hit"


def test_two_replicas_share_one_redis_cache(
    upstream: IrosProcess, model_like: RecordingUpstream, tmp_path: Path
) -> None:
    """An answer cached by one replica is an exact and a semantic hit on the other; with Redis gone,
    both keep serving from the model."""
    from iros.testing.redis import RedisServer

    with RedisServer() as redis:
        store = {"backend": "redis", "url": f"redis://127.0.0.1:{redis.port}/0"}
        configs = [
            # δ 0.3: the prior alone serves the paraphrase (as in the `semantic` fixture).
            cache_config(
                upstream, model_like, tmp_path / name, semantic=True, store=store, max_false_hit_rate=0.3
            )
            for name in ("a", "b")
        ]
        env = {"TEST_ADMIN_KEY": ADMIN_KEY}
        with IrosProcess.serve(configs[0], env=env) as one, IrosProcess.serve(configs[1], env=env) as two:
            wait_semantic(one)
            wait_semantic(two)
            body = question("What are the health benefits of drinking green tea?")
            assert ask(one, body).headers["x-iros-cache"] == "miss"
            assert ask(two, body).headers["x-iros-cache"] == "hit"
            # The second replica's vector index heard of the entry through the Redis stream.
            paraphrase = question("What are some health benefits of drinking green tea?")
            assert ask(two, paraphrase).headers["x-iros-cache"] == "semantic_hit"
            redis.stop()
            down = ask(one, question("Redis is down now"))
            assert down.status_code == 200 and down.headers["x-iros-cache"] == "miss"
