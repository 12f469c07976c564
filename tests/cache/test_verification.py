"""Verification on live traffic, end to end: a real `iros serve` whose semantic hits are re-asked of an
upstream that answers by meaning, judged, counted, calibrated and shown; the operator's δ; and one
calibration for several Iros on one shared state (a data directory, or a redis-server)."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from iros.testing.iros import IrosProcess, free_port, wait_until
from iros.testing.redis import RedisServer
from tests.conftest import ADMIN_KEY, CLIENT_KEY, completion, serve_in_thread

pytestmark = pytest.mark.e2e

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
CLIENT = {"authorization": f"Bearer {CLIENT_KEY}"}
GREEN_TEA = "What are the health benefits of drinking green tea?"
# Questions that mean the same get one answer; any other question is answered with its own text.
MEANING = {
    GREEN_TEA: "Green tea has antioxidants.",
    "What are some health benefits of drinking green tea?": "Green tea has antioxidants.",
    "Which health benefits does drinking green tea have?": "Green tea has antioxidants.",
}


class MeaningUpstream:
    """An OpenAI-shaped server that answers by meaning (MEANING), counting the questions it is asked."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.asked: list[str] = []
        self.streamed: list[bool] = []  # whether each question asked for a stream

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        text = body["messages"][-1]["content"]
        self.asked.append(text)
        self.streamed.append(bool(body.get("stream")))
        data = completion(MEANING.get(text, f"About: {text}"))
        return web.Response(body=orjson.dumps(data), content_type="application/json")

    def start(self) -> MeaningUpstream:
        serve_in_thread(self.port, [web.post("/v1/chat/completions", self._chat)])
        return self


def config(
    upstream: MeaningUpstream, data_dir: Path, delta: float = 0.05, **verification: Any
) -> dict[str, Any]:
    return {
        "server": {"data_dir": str(data_dir)},
        "auth": {
            "api_keys": [{"name": "team-a", "key": CLIENT_KEY}],
            "admin_keys": [{"name": "ops", "key_env": "TEST_ADMIN_KEY"}],
        },
        "retry": {"attempts": 1},
        "models": [{"name": "chat", "base_url": upstream.url, "upstream_model": "m"}],
        "cache": {
            "enabled": True,
            "semantic": True,
            "max_false_hit_rate": delta,
            "verification": {"judge": "exact", **verification},
        },
    }


def ask(proc: IrosProcess, text: str) -> httpx.Response:
    body = {"model": "chat", "messages": [{"role": "user", "content": text}], "temperature": 0}
    return httpx.post(f"{proc.url}/v1/chat/completions", json=body, headers=CLIENT, timeout=60)


def semantic_ready(proc: IrosProcess) -> bool:
    return bool(httpx.get(f"{proc.url}/api/optimization/cache", headers=ADMIN).json()["semantic_ready"])


@pytest.fixture(scope="module")
def meaning() -> MeaningUpstream:
    return MeaningUpstream().start()


@pytest.fixture(scope="module")
def verifying(meaning: MeaningUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IrosProcess]:
    # max_share 1: every would-be hit is re-asked while the cut is uncertain, so the test is not a draw;
    # δ 0.3 (cut 0.7): the prior alone would serve the paraphrase.
    # overlap queue: the lookup decides before this instant upstream could answer, so a hit is a hit.
    cfg = config(meaning, tmp_path_factory.mktemp("verify"), delta=0.3, max_share=1.0)
    cfg["cache"]["overlap"] = "queue"
    with IrosProcess.serve(cfg, env={"TEST_ADMIN_KEY": ADMIN_KEY}) as proc:
        wait_until(lambda: semantic_ready(proc), "the semantic cache", timeout=180)
        yield proc


def test_a_sampled_would_be_hit_is_asked_upstream_judged_and_shown(
    verifying: IrosProcess, meaning: MeaningUpstream
) -> None:
    """The paraphrase's would-be hit is served from the cache and asked upstream beside it: the judge
    finds the fresh answer the same as the cached one, and the outcome appears in the efficiency report
    and /metrics."""
    assert ask(verifying, GREEN_TEA).headers["x-iros-cache"] == "miss"
    before = len(meaning.asked)
    paraphrase = ask(verifying, "What are some health benefits of drinking green tea?")
    assert paraphrase.status_code == 200
    assert paraphrase.headers["x-iros-cache"] == "semantic_hit"
    assert paraphrase.json()["choices"][0]["message"]["content"] == "Green tea has antioxidants."
    # Served and verified: the model was asked the paraphrase too, after the client had its answer.
    wait_until(lambda: len(meaning.asked) == before + 1, "the verification call", timeout=30)
    assert meaning.asked[-1] == "What are some health benefits of drinking green tea?"

    def verified() -> dict[str, Any] | None:
        report = httpx.get(f"{verifying.url}/api/analysis/cache/efficiency", headers=ADMIN).json()
        found: dict[str, Any] = report["verification"]
        return found if found["judged_right"] >= 1 else None

    report = wait_until(verified, "the judgement", timeout=30)
    assert report["verification_calls"] == 1 and report["verification_tokens"] == 18
    assert report["max_false_hit_rate"] == 0.3 and report["judged_wrong"] == 0
    (scope,) = report["scopes"]
    assert scope["namespace"] == "team-a" and scope["model"] == "chat"
    assert scope["verified"] == 1 and scope["cut"] is not None
    assert report["interval"] is not None and report["interval"][0] <= report["false_hit_rate"] <= 1
    metrics = httpx.get(f"{verifying.url}/metrics", headers=ADMIN).text
    assert "iros_cache_verification_calls_total 1.0" in metrics
    assert 'iros_cache_false_hit_rate{bound="upper"}' in metrics
    assert 'iros_cache_semantic_cut{calibrated="false",model="chat",namespace="team-a"}' in metrics


def test_a_streamed_would_be_hit_is_replayed_and_verified_as_one_answer(
    verifying: IrosProcess, meaning: MeaningUpstream
) -> None:
    """A client that streams gets the cached answer as a stream at once; the verification asks the
    same question upstream as one whole answer, and its judgement counts."""
    ask(verifying, GREEN_TEA)
    before = len(meaning.asked)
    body = {
        "model": "chat",
        "messages": [{"role": "user", "content": "Which health benefits does drinking green tea have?"}],
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{verifying.url}/v1/chat/completions", json=body, headers=CLIENT, timeout=60
    ) as resp:
        assert resp.headers["x-iros-cache"] == "semantic_hit"
        text = "".join(resp.iter_text())
    assert text.rstrip().endswith("data: [DONE]")
    chunks = [orjson.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    said = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert said == "Green tea has antioxidants."
    wait_until(lambda: len(meaning.asked) == before + 1, "the verification call", timeout=30)
    assert meaning.asked[-1] == body["messages"][0]["content"] and meaning.streamed[-1] is False


def test_classification_prompts_never_share_answers(verifying: IrosProcess) -> None:
    """One instruction, different inputs: each review gets its own answer, never another's."""
    first = ask(verifying, "Is this review friendly? The food was wonderful and the staff were kind.")
    assert first.headers["x-iros-cache"] == "miss"
    second = ask(verifying, "Is this review friendly? The food was cold and the staff were rude.")
    assert second.headers["x-iros-cache"] == "miss"
    assert second.json()["choices"][0]["message"]["content"].endswith("cold and the staff were rude.")


def test_max_false_hit_rate_is_tuned_live_and_checked(verifying: IrosProcess) -> None:
    """PUT /api/optimization/cache/tune takes δ: the floor tightens with it; out of range is a 400."""
    url = f"{verifying.url}/api/optimization/cache/tune"
    resp = httpx.put(url, headers=ADMIN, json={"max_false_hit_rate": 0.02})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["applied"] == {"max_false_hit_rate": 0.02}
    assert body["max_false_hit_rate"] == 0.02 and body["precision_floor"] == 0.98
    stats = httpx.get(f"{verifying.url}/api/optimization/cache", headers=ADMIN).json()
    assert stats["max_false_hit_rate"] == 0.02
    bad = httpx.put(url, headers=ADMIN, json={"max_false_hit_rate": 0.9})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_false_hit_rate"
    # A hit-rate target cannot loosen the similarity threshold below the floor δ implies.
    target = httpx.put(url, headers=ADMIN, json={"target_hit_rate": 0.99}).json()
    assert target["similarity_threshold"] >= target["floor_threshold"]
    httpx.put(url, headers=ADMIN, json={"max_false_hit_rate": 0.3})


def test_a_judge_model_must_be_configured(meaning: MeaningUpstream, tmp_path: Path) -> None:
    """judge: model naming no configured model is refused at start with a line naming the field."""
    cfg = config(meaning, tmp_path, judge="model", judge_model="nowhere")
    proc = IrosProcess.serve(cfg, env={"TEST_ADMIN_KEY": ADMIN_KEY})
    with pytest.raises(Exception, match="judge_model"):
        proc.start(timeout=30)
    proc.stop()


def test_a_near_miss_is_judged_without_an_extra_call(meaning: MeaningUpstream, tmp_path: Path) -> None:
    """At the default δ the prior's cut (0.95) leaves the paraphrase just under it: a miss, asked
    upstream once as any miss, and its answer judged against the near candidate's at no extra call."""
    with IrosProcess.serve(config(meaning, tmp_path), env={"TEST_ADMIN_KEY": ADMIN_KEY}) as proc:
        wait_until(lambda: semantic_ready(proc), "the semantic cache", timeout=180)
        ask(proc, "Which health benefits does drinking green tea have?")
        assert ask(proc, GREEN_TEA).headers["x-iros-cache"] == "miss"

        def judged() -> dict[str, Any] | None:
            found: dict[str, Any] = httpx.get(f"{proc.url}/api/optimization/cache", headers=ADMIN).json()
            return found["verification"] if found["verification"]["judged_right"] else None

        report = wait_until(judged, "the near-miss judgement", timeout=30)
        assert report["near_misses_checked"] == 1 and report["verification_calls"] == 0
        assert report["prior_cut"] == 0.95


def scope_report(proc: IrosProcess) -> dict[str, Any] | None:
    """The one scope's calibration as this Iros reports it, once it has one."""
    report = httpx.get(f"{proc.url}/api/analysis/cache/efficiency", headers=ADMIN).json()
    scopes: list[dict[str, Any]] = report["verification"]["scopes"]
    return scopes[0] if scopes else None


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_an_outcome_judged_on_one_iros_calibrates_every_iros_on_the_state(
    backend: str, meaning: MeaningUpstream, tmp_path: Path
) -> None:
    """Two Iros on one shared state: the outcome judged on the first counts once on the second, with the
    same cut and interval, and never twice on the first; an Iros started afterwards (a restart, a new
    replica) begins from it."""
    with contextlib.ExitStack() as stack:
        if backend == "redis":
            redis = stack.enter_context(RedisServer())
            state = {"backend": "redis", "url": redis.url, "prefix": f"iros:test:{secrets.token_hex(4)}"}
            dirs = [tmp_path / name for name in ("one", "two", "late")]
        else:
            state = {"backend": "local"}  # one host's workers: the same data directory
            dirs = [tmp_path] * 3

        def serve(data_dir: Path) -> IrosProcess:
            cfg = {**config(meaning, data_dir, delta=0.3, max_share=1.0), "state": state}
            proc = stack.enter_context(IrosProcess.serve(cfg, env={"TEST_ADMIN_KEY": ADMIN_KEY}))
            wait_until(lambda: semantic_ready(proc), "the semantic cache", timeout=180)
            return proc

        one, two = serve(dirs[0]), serve(dirs[1])
        assert scope_report(two) is None
        assert ask(one, GREEN_TEA).headers["x-iros-cache"] == "miss"
        ask(one, "What are some health benefits of drinking green tea?")  # verified, judged on `one`
        judged = wait_until(lambda: scope_report(one), "the judgement", timeout=30)
        assert judged["verified"] == 1 and judged["verified_hits"] == 1
        assert wait_until(lambda: scope_report(two), "the outcome on the other Iros", timeout=30) == judged
        time.sleep(1.0)  # five polls of the shared state: nothing counts twice
        assert scope_report(one) == scope_report(two) == judged
        late = serve(dirs[2])
        assert wait_until(lambda: scope_report(late), "the replayed outcome", timeout=30) == judged
