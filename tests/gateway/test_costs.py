"""What answers cost: the x-iros-cost-usd header (a stream's last SSE comment), what the cache saved,
and iros_cost_usd_total / iros_cost_saved_usd_total by model and key in /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from iros.app import IrosApp, create_app
from iros.config import Pricing, load_settings
from iros.core.record import RequestRecord
from iros.gateway.costs import cost

KEY, OTHER, ADMIN = "sk-team-a", "sk-team-b", "sk-ops"
PRICING = {"input_per_million": 2.0, "output_per_million": 8.0, "cached_input_per_million": 0.5}
ASK = {"model": "priced", "messages": [{"role": "user", "content": "What is a river?"}], "seed": 1}


def priced_settings(tmp_path: Any, budget: dict[str, Any] | None = None, **extra: Any) -> Any:
    return load_settings(
        None,
        {
            "server": {"data_dir": str(tmp_path)},
            "auth": {
                "open": False,
                "api_keys": [
                    {"name": "team-a", "key": KEY, "budget": budget},
                    {"name": "team-b", "key": OTHER},
                ],
                "admin_keys": [{"name": "ops", "key": ADMIN}],
            },
            "models": [
                {"name": "priced", "backend": "simulated", "profile": "instant", "pricing": PRICING},
                {"name": "free", "backend": "simulated", "profile": "instant"},
                {"name": "cut", "backend": "simulated", "profile": "cut-stream", "pricing": PRICING},
            ],
            "cache": {"semantic": False},
            "metrics_collection": {"live_interval_seconds": 0.2},
            **extra,
        },
    )


@pytest.fixture
async def app(tmp_path: Any) -> AsyncIterator[tuple[IrosApp, list[RequestRecord]]]:
    gateway = create_app(priced_settings(tmp_path))
    seen: list[RequestRecord] = []
    gateway.gateway.observers.append(seen.append)
    async with gateway.routes.router.lifespan_context(gateway.routes):
        yield gateway, seen


async def call(
    app: IrosApp, path: str, body: dict[str, Any] | None = None, key: str = KEY, method: str = "POST"
) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
        return await http.request(method, path, json=body, headers={"authorization": f"Bearer {key}"})


class TestPrice:
    def test_input_output_and_upstream_cached_tokens_have_their_prices(self) -> None:
        """Prompt tokens the upstream cached are charged at the cached price, the rest at input and output."""
        pricing = Pricing(**PRICING)
        usage = {"prompt_tokens": 1000, "completion_tokens": 500, "cached_tokens": 400}
        assert cost(pricing, usage) == pytest.approx((600 * 2 + 400 * 0.5 + 500 * 8) / 1e6)
        assert cost(Pricing(input_per_million=2, output_per_million=8), usage) == pytest.approx(6000 / 1e6)
        assert cost(None, usage) is None


class TestHeader:
    async def test_a_whole_answer_says_what_it_cost(self, app: tuple[IrosApp, list[RequestRecord]]) -> None:
        """x-iros-cost-usd is the usage priced at the answering deployment's pricing."""
        gateway, seen = app
        resp = await call(gateway, "/v1/chat/completions", {**ASK, "iros": {"cache": False}})
        usage = resp.json()["usage"]
        expected = (usage["prompt_tokens"] * 2 + usage["completion_tokens"] * 8) / 1e6
        assert float(resp.headers["x-iros-cost-usd"]) == pytest.approx(expected, abs=1e-8)
        assert seen[-1].cost_usd == pytest.approx(expected)

    async def test_a_stream_ends_with_its_cost_as_a_comment(
        self, app: tuple[IrosApp, list[RequestRecord]]
    ) -> None:
        """A relayed stream's cost (usage counted by Iros) comes as the SSE comment just before [DONE]."""
        gateway, seen = app
        resp = await call(gateway, "/v1/chat/completions", {**ASK, "stream": True})
        lines = [line for line in resp.text.splitlines() if line]
        comment = next(line for line in lines if line.startswith(": x-iros-cost-usd "))
        assert lines[-1] == "data: [DONE]" and lines[-2] == comment
        assert float(comment.split()[-1]) == pytest.approx(seen[-1].cost_usd, abs=1e-8) and seen[-1].cost_usd

    async def test_a_stream_cut_short_still_costs_what_was_generated(
        self, app: tuple[IrosApp, list[RequestRecord]]
    ) -> None:
        """A stream the upstream cut after a few chunks never says [DONE], yet its tokens are priced."""
        gateway, seen = app
        resp = await call(gateway, "/v1/chat/completions", {**ASK, "model": "cut", "stream": True})
        assert "[DONE]" not in resp.text and '"error"' in resp.text
        record = seen[-1]
        assert record.usage["completion_tokens"] >= 1
        assert record.cost_usd == pytest.approx(
            (record.usage["prompt_tokens"] * 2 + record.usage["completion_tokens"] * 8) / 1e6
        )

    async def test_a_cache_hit_costs_nothing_and_counts_what_it_saved(
        self, app: tuple[IrosApp, list[RequestRecord]]
    ) -> None:
        """An answer from the cache carries cost 0; what it would have cost is recorded as saved."""
        gateway, seen = app
        first = await call(gateway, "/v1/chat/completions", ASK)
        for _ in range(50):
            hit = await call(gateway, "/v1/chat/completions", ASK)
            if hit.headers["x-iros-cache"] == "hit":
                break
            await asyncio.sleep(0.02)
        assert hit.headers["x-iros-cache"] == "hit"
        assert float(hit.headers["x-iros-cost-usd"]) == 0
        assert seen[-1].saved_usd == pytest.approx(float(first.headers["x-iros-cost-usd"]), abs=1e-8)

    async def test_a_model_without_pricing_costs_zero_and_embeddings_cost_input(
        self, app: tuple[IrosApp, list[RequestRecord]]
    ) -> None:
        """An unpriced model's answers say 0; an embeddings answer is priced by its input tokens."""
        gateway, _ = app
        free = await call(gateway, "/v1/chat/completions", {**ASK, "model": "free"})
        vectors = await call(gateway, "/v1/embeddings", {"model": "priced", "input": "one two three"})
        assert float(free.headers["x-iros-cost-usd"]) == 0
        assert float(vectors.headers["x-iros-cost-usd"]) == pytest.approx(3 * 2 / 1e6)


class TestMetrics:
    async def test_metrics_count_cost_and_savings_by_model_and_key(
        self, app: tuple[IrosApp, list[RequestRecord]]
    ) -> None:
        """/metrics has iros_cost_usd_total and iros_cost_saved_usd_total labelled by model and key name."""
        gateway, seen = app
        for _ in range(3):
            await call(gateway, "/v1/chat/completions", ASK)
            await asyncio.sleep(0.05)
        assert gateway.monitor is not None
        await gateway.monitor.collector.tick()
        text = (await call(gateway, "/metrics", key=ADMIN, method="GET")).text
        spent = sum(r.cost_usd or 0 for r in seen)
        saved = sum(r.saved_usd for r in seen)
        assert saved > 0
        values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("iros_cost"))
        labels = '{key="team-a",model="priced"}'
        assert float(values[f"iros_cost_usd_total{labels}"]) == pytest.approx(spent)
        assert float(values[f"iros_cost_saved_usd_total{labels}"]) == pytest.approx(saved)
