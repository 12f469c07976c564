"""What an answer costs, in US dollars, from its usage and the answering deployment's `pricing`.

prices = Prices(settings.models)
cost(deployment.settings.pricing, record.usage)          # 0.000123, or None: no pricing configured
prices.of_model("gpt-test")                              # the model's first priced deployment's pricing
cost_header(record)                                      # b"0.000123" for x-iros-cost-usd

Prompt tokens the upstream served from its own prompt cache (`usage.prompt_tokens_details.cached_tokens`,
kept by core.record as `cached_tokens`) are charged at `cached_input_per_million` where one is set. An
answer from Iros's cache, or shared with an identical request in flight, costs nothing: what it would have
cost is what the cache saved (`record.saved_usd`).
"""

from __future__ import annotations

from collections.abc import Iterable

from iros.config import ModelSettings, Pricing
from iros.core.record import RequestRecord


def cost(pricing: Pricing | None, usage: dict[str, int]) -> float | None:
    """The price of one answer's usage; None when the deployment has no pricing."""
    if pricing is None:
        return None
    prompt = usage.get("prompt_tokens", 0)
    cached = min(usage.get("cached_tokens", 0), prompt)
    cached_price = pricing.cached_input_per_million
    if cached_price is None:
        cached_price = pricing.input_per_million
    total = (
        (prompt - cached) * pricing.input_per_million
        + cached * cached_price
        + usage.get("completion_tokens", 0) * pricing.output_per_million
    )
    return total / 1e6


class Prices:
    """The pricing of each model by name, for answers that no deployment gave (cache hits)."""

    def __init__(self, models: Iterable[ModelSettings]) -> None:
        self._by_model: dict[str, Pricing] = {}
        for model in models:
            if model.pricing is not None:
                self._by_model.setdefault(model.name, model.pricing)

    def of_model(self, name: str) -> Pricing | None:
        return self._by_model.get(name)


def cost_header(record: RequestRecord) -> bytes:
    """The x-iros-cost-usd value: the answer's cost, 0 when it cost nothing or has no pricing."""
    return b"%.8f" % (record.cost_usd or 0.0)
