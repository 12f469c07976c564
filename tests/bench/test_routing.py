"""`iros bench routing` and the per-request accuracy hint it relies on."""

from __future__ import annotations

import httpx

from iros.app import create_app
from iros.bench.routing import STRATEGIES, run_routing
from iros.config import load_settings


def test_bench_compares_every_strategy_in_one_run() -> None:
    """The bench reports latency, quality and cost for all four strategies; Iros meets every request's
    accuracy need, always-small misses the hard ones."""
    result = run_routing(requests=20, concurrency=8, hard_share=0.3, seed=3)
    strategies = result["strategies"]
    assert set(strategies) == set(STRATEGIES)
    for row in strategies.values():
        assert row["errors"] == 0 and row["mean_latency_ms"] > 0 and row["p95_latency_ms"] >= 0
        assert row["token_cost"] > 0 and row["model_seconds"] > 0
    assert strategies["iros"]["quality"] == 1.0
    assert strategies["always_small"]["quality"] < 1.0
    assert set(result["iros_vs_always_large"]) == {"quality_ratio", "mean_latency_ratio"}


async def test_min_accuracy_hint_routes_and_bad_values_get_a_400() -> None:
    """`iros.min_accuracy` keeps a group request off models below it; a value outside 0..1 is a 400."""
    settings = load_settings(
        None,
        {
            "models": [
                {
                    "name": "big",
                    "backend": "simulated",
                    "profile": "instant",
                    "group": "chat",
                    "accuracy": 0.95,
                },
                {
                    "name": "small",
                    "backend": "simulated",
                    "profile": "instant",
                    "group": "chat",
                    "accuracy": 0.7,
                },
            ],
            "cache": {"enabled": False},
            "metrics_collection": {"enabled": False},
        },
    )
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as http:

        async def ask(iros: object) -> httpx.Response:
            body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "iros": iros}
            return await http.post("/v1/chat/completions", json=body)

        served = {(await ask({"min_accuracy": 0.9})).headers["x-iros-model"] for _ in range(10)}
        assert served == {"big"}
        bad = await ask({"min_accuracy": 2})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "iros.min_accuracy"
