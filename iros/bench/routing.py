"""`iros bench routing`: Iros's model selection against always-large, always-small and round-robin.

A mixed workload over two simulated models, in one process and one run: `large` (accurate, slow,
accuracy 0.92) and `lightweight` (fast, cheap, accuracy 0.80). Each request needs some accuracy: most
are easy (0.75), a share are hard (0.90) and say so with `{"iros": {"min_accuracy": 0.9}}`. An answer's
quality is 1 when the answering model's accuracy meets the request's need and 0 when it does not, so
`quality` is the share of requests answered at the accuracy they need; `mean_accuracy` is the mean
accuracy of the models that answered. Every
strategy sends the same requests; only `model` differs: "large", "lightweight", alternating, or the
group "chat" (Iros's selection).

    result = run_routing(requests=200, concurrency=16, hard_share=0.2, seed=7)   # JSON-able dict

Cost is reported two ways: model-seconds (time the model spent on the answers, what a self-hosted
model costs) and token cost at the per-1k-token prices given (printed with the result).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx

from iros.app import IrosApp, create_app
from iros.config import load_settings

TARGET = {"quality_vs_large_min": 0.95, "latency_vs_large_max": 0.5}
EASY, HARD = 0.75, 0.90
ACCURACY = {"large": 0.92, "lightweight": 0.80}
STRATEGIES = ("iros", "always_large", "always_small", "round_robin")

Progress = Callable[[str, int, int], None]


def _settings() -> Any:
    return load_settings(
        None,
        {
            "models": [
                {
                    "name": "large",
                    "backend": "simulated",
                    "profile": "large",
                    "group": "chat",
                    "accuracy": 0.92,
                },
                {
                    "name": "lightweight",
                    "backend": "simulated",
                    "profile": "lightweight",
                    "group": "chat",
                    "accuracy": 0.80,
                    "tags": ["lightweight"],
                },
            ],
            "server": {"max_concurrency": 1024},
            "cache": {"enabled": False},  # every strategy's answers come from the models
            "metrics_collection": {"enabled": False},
        },
    )


def _workload(n: int, hard_share: float, seed: int) -> list[tuple[str, float]]:
    rng = random.Random(seed)
    return [
        (f"question {i} #{rng.randrange(10**9)}", HARD if rng.random() < hard_share else EASY)
        for i in range(n)
    ]


def _model_for(strategy: str, i: int) -> str:
    return {
        "iros": "chat",
        "always_large": "large",
        "always_small": "lightweight",
        "round_robin": ("large", "lightweight")[i % 2],
    }[strategy]


async def _run_strategy(
    app: IrosApp,
    strategy: str,
    workload: list[tuple[str, float]],
    concurrency: int,
    max_tokens: int,
    prices: dict[str, float],
    progress: Progress | None,
) -> dict[str, Any]:
    limit = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    qualities: list[float] = []
    accuracies: list[float] = []
    served: dict[str, int] = {}
    model_ms = 0.0
    tokens_cost = 0.0
    errors = 0
    done = 0

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost", timeout=120
    ) as http:

        async def one(i: int, prompt: str, need: float) -> None:
            nonlocal model_ms, tokens_cost, errors, done
            body: dict[str, Any] = {
                "model": _model_for(strategy, i),
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
            }
            if need > EASY:
                body["iros"] = {"min_accuracy": need}  # a fixed model ignores it; a group honours it
            async with limit:
                began = time.perf_counter()
                response = await http.post("/v1/chat/completions", json=body)
                elapsed = (time.perf_counter() - began) * 1000
            done += 1
            if progress is not None:
                progress(strategy, done, len(workload))
            if response.status_code != 200:
                errors += 1
                return
            model = response.headers["x-iros-model"]
            served[model] = served.get(model, 0) + 1
            latencies.append(elapsed)
            accuracy = ACCURACY[model]
            qualities.append(1.0 if accuracy >= need else 0.0)
            accuracies.append(accuracy)
            model_ms += elapsed - float(response.headers.get("x-iros-overhead-ms", 0))
            usage = response.json().get("usage") or {}
            tokens_cost += usage.get("total_tokens", 0) / 1000 * prices[model]

        await asyncio.gather(*(one(i, p, need) for i, (p, need) in enumerate(workload)))
    ordered = sorted(latencies)
    return {
        "requests": len(workload),
        "errors": errors,
        "mean_latency_ms": round(statistics.fmean(ordered), 1) if ordered else None,
        "p95_latency_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1)
        if ordered
        else None,
        "quality": round(statistics.fmean(qualities), 4) if qualities else None,
        "mean_accuracy": round(statistics.fmean(accuracies), 4) if accuracies else None,
        "model_seconds": round(model_ms / 1000, 2),
        "token_cost": round(tokens_cost, 6),
        "served_by": served,
    }


async def _run(
    requests: int,
    concurrency: int,
    hard_share: float,
    seed: int,
    max_tokens: int,
    prices: dict[str, float],
    progress: Progress | None,
) -> dict[str, Any]:
    workload = _workload(requests, hard_share, seed)
    results = {}
    for strategy in STRATEGIES:
        app = create_app(_settings())  # a fresh Iros per strategy: no measurements carried over
        try:
            results[strategy] = await _run_strategy(
                app, strategy, workload, concurrency, max_tokens, prices, progress
            )
        finally:
            await app.router.aclose()
    return results


def run_routing(
    requests: int = 200,
    concurrency: int = 16,
    hard_share: float = 0.2,
    seed: int = 7,
    max_tokens: int = 16,
    large_price: float = 0.01,
    small_price: float = 0.001,
    progress: Progress | None = None,
) -> dict[str, Any]:
    prices = {"large": large_price, "lightweight": small_price}
    results = asyncio.run(_run(requests, concurrency, hard_share, seed, max_tokens, prices, progress))
    iros, large = results["iros"], results["always_large"]
    quality_ratio = iros["quality"] / large["quality"] if iros["quality"] and large["quality"] else None
    latency_ratio = (
        iros["mean_latency_ms"] / large["mean_latency_ms"]
        if iros["mean_latency_ms"] and large["mean_latency_ms"]
        else None
    )
    return {
        "workload": {
            "requests": requests,
            "concurrency": concurrency,
            "hard_share": hard_share,
            "accuracy_needed": {"easy": EASY, "hard": HARD},
            "max_tokens": max_tokens,
            "seed": seed,
            "price_per_1k_tokens": prices,
            "models": ACCURACY,
        },
        "strategies": results,
        "iros_vs_always_large": {
            "quality_ratio": None if quality_ratio is None else round(quality_ratio, 4),
            "mean_latency_ratio": None if latency_ratio is None else round(latency_ratio, 4),
        },
        "target": TARGET,
        "target_met": bool(
            quality_ratio is not None
            and latency_ratio is not None
            and quality_ratio >= TARGET["quality_vs_large_min"]
            and latency_ratio < TARGET["latency_vs_large_max"]
        ),
    }


def chart(result: dict[str, Any], path: str) -> None:
    """Mean and P95 latency and quality per strategy, as one plotly HTML page."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(result["strategies"])
    rows = [result["strategies"][n] for n in names]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("latency (ms)", "quality (need met)"))
    fig.add_trace(go.Bar(name="mean", x=names, y=[r["mean_latency_ms"] for r in rows]), row=1, col=1)
    fig.add_trace(go.Bar(name="P95", x=names, y=[r["p95_latency_ms"] for r in rows]), row=1, col=1)
    fig.add_trace(go.Bar(name="quality", x=names, y=[r["quality"] for r in rows]), row=1, col=2)
    fig.update_layout(title="iros bench routing", barmode="group")
    fig.write_html(path, include_plotlyjs=True)
