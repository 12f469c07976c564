"""The request profiler: a query through the real pipeline, its stage timeline and CPU profile."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from iros.testing.iros import IrosProcess

pytestmark = pytest.mark.e2e

ADMIN = {"authorization": "Bearer sk-admin-p"}
CLIENT = {"authorization": "Bearer sk-client-p"}
# Modules whose work runs in the loop's other tasks, never in a request's own call.
BACKGROUND = {"iros/core/periodic.py", "iros/metrics/collector.py"}


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with IrosProcess.mock_upstream("lightweight") as upstream:
        config = {
            "server": {"host": "127.0.0.1"},
            "auth": {"api_keys": ["sk-client-p"], "admin_keys": ["sk-admin-p"]},
            "models": [
                {"name": "light", "base_url": f"{upstream.url}/v1", "upstream_model": "lightweight"},
                {"name": "local", "backend": "simulated", "profile": "instant"},
            ],
        }
        with IrosProcess.serve(config) as iros, httpx.Client(base_url=iros.url, timeout=60) as c:
            yield c


def profile(client: httpx.Client, **body: Any) -> dict[str, Any]:
    started = client.post("/api/analysis/profile", json={"query": "what is a cache?", **body}, headers=ADMIN)
    assert started.status_code == 200, started.text
    session = started.json()["session_id"]
    result = client.get(f"/api/analysis/profile/results/{session}", headers=ADMIN)
    assert result.status_code == 200
    return dict(result.json())


class TestTimeline:
    @pytest.mark.parametrize("stream", [False, True])
    def test_stage_times_add_up_to_the_measured_total(self, client: httpx.Client, stream: bool) -> None:
        """The stages, time between laps included, sum to the request's measured total."""
        out = profile(client, model="light", stream=stream, enable_profiling=True)
        assert out["status"] == 200
        stages = out["stages"]
        assert all(s["duration_ms"] >= 0 for s in stages)
        assert sum(s["duration_ms"] for s in stages) == pytest.approx(out["total_ms"], abs=1e-3)
        assert sum(s["share"] for s in stages) == pytest.approx(1.0, abs=1e-4)
        # The stages follow one another: each starts where the previous ended.
        for before, after in itertools.pairwise(stages):
            assert after["start_ms"] == pytest.approx(before["start_ms"] + before["duration_ms"], abs=1e-5)
        # Around the call the profiler measures a little more (the observers run after the last byte).
        assert out["total_ms"] <= out["wall_ms"]
        names = {s["stage"] for s in stages}
        assert {"auth", "parse", "route", "queue", "upstream_connect", "upstream_ttft"} <= names
        assert ("stream" in names) == stream
        assert out["upstream_ms"] + out["overhead_ms"] == pytest.approx(out["total_ms"], abs=1e-3)
        longest = max(stages, key=lambda s: s["duration_ms"])
        assert f"the longest stage is {longest['stage']}" in out["findings"][0]

    def test_the_cpu_profile_names_iros_frames(self, client: httpx.Client) -> None:
        """pyinstrument samples the request: its top frames carry time, and Iros's frames are the
        request's own call, the gateway first, not the loop's other tasks sampled meanwhile."""
        out = profile(client, model="light")
        prof = out["profile"]
        assert prof["engine"] == "pyinstrument" and prof["samples"] > 0
        assert prof["top_frames"] and all(f["self_ms"] > 0 for f in prof["top_frames"])
        first = prof["iros_frames"][0]
        assert (first["file"], first["function"]) == ("iros/gateway/pipeline.py", "__call__")
        assert not any(f["file"] in BACKGROUND for f in prof["iros_frames"])
        # The model server's time is waiting, not Iros's CPU.
        assert prof["awaiting_ms"] > sum(f["self_ms"] for f in prof["top_frames"][:3])

    def test_profiling_off_keeps_the_timeline(self, client: httpx.Client) -> None:
        """Without profiling the stages are still measured and the profile is absent."""
        out = profile(client, model="local", enable_profiling=False)
        assert out["profile"] is None
        assert out["model"] == "local" and out["stages"]


class TestBadInput:
    @pytest.mark.parametrize(
        ("body", "status", "param"),
        [
            ({}, 400, "query"),
            ({"query": ""}, 400, "query"),
            ({"query": "x", "enable_profiling": "yes"}, 400, "enable_profiling"),
            ({"query": "x", "colour": "red"}, 400, "colour"),
            ({"query": "x", "model": "nope"}, 404, "model"),
            ({"query": "x", "model": 7}, 400, "model"),
        ],
    )
    def test_bad_bodies_get_clear_errors(
        self, client: httpx.Client, body: dict[str, Any], status: int, param: str
    ) -> None:
        """Each bad field is refused with a status and names the field."""
        r = client.post("/api/analysis/profile", json=body, headers=ADMIN)
        assert r.status_code == status
        assert r.json()["error"]["param"] == param

    def test_not_json_and_unknown_sessions_are_refused(self, client: httpx.Client) -> None:
        """A body that is not JSON is a 400; an unknown session is a 404."""
        r = client.post("/api/analysis/profile", content=b"{not json", headers=ADMIN)
        assert r.status_code == 400
        r = client.get("/api/analysis/profile/results/nope", headers=ADMIN)
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"

    def test_profiling_needs_the_admin_key(self, client: httpx.Client) -> None:
        """A client key is forbidden and no key is unauthorised."""
        assert client.post("/api/analysis/profile", json={"query": "x"}, headers=CLIENT).status_code == 403
        assert client.post("/api/analysis/profile", json={"query": "x"}).status_code == 401


class TestConcurrency:
    def test_simultaneous_profiles_each_get_their_own_request(self, client: httpx.Client) -> None:
        """Profiles asked for at once run one after another, each with its own request and timeline."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda _: profile(client, model="local"), range(3)))
        assert len({r["request_id"] for r in results}) == 3
        for r in results:
            assert r["status"] == 200 and r["profile"] is not None
            assert sum(s["duration_ms"] for s in r["stages"]) == pytest.approx(r["total_ms"], abs=1e-3)
