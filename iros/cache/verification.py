"""Verification on live traffic: which semantic lookups are re-asked upstream, how the fresh answer is
judged against the cached one, and what the cache reports of it.

verification = Verification(settings)                    # cache.verification: ResponseCache builds it
if verification.sample(plan, scope, key, score, prior, served=True): ...   # plan.verify: judge it
verification.spent(pending, completion)                  # a re-asked would-be hit's tokens, counted
await verification.judge(pending, completion, cached, embedder)   # the outcome, to the calibration
verification.report(prior)                               # /api/analysis/cache/efficiency's figures

A sampled would-be hit is served all the same and asked upstream beside it (ResponseCache.verify_served:
the client never waits for a verification it did not need), and a sampled near-miss (upstream anyway) is
judged too; once the answer is in, the judge (judge.py) compares it with
the cached one and the outcome, weighted by 1 / its sampling chance, calibrates the cut
(calibration.py), here and, through `share_outcome`, on every other worker.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from iros.cache.base import Embedder
from iros.cache.calibration import Calibration, Outcome, Pending, Scope
from iros.cache.judge import Ask, answer_text, judge
from iros.cache.plan import Plan
from iros.config import CacheSettings

__all__ = ["Verification"]

log = logging.getLogger("iros.cache")


class Verification:
    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings  # the cache's: live changes (δ, verification) are read from it
        self.calibration = Calibration(settings.max_false_hit_rate, settings.verification.max_share)
        self.ask: Ask | None = None  # the judge model (judge: model), set once the gateway is built
        # Each outcome judged here, to the other workers (app.py: shared_calibration.py), so they all
        # calibrate on every worker's outcomes.
        self.share_outcome: Callable[[Outcome], Awaitable[object]] | None = None
        self.tokens = 0  # tokens spent on verification calls (would-be hits re-asked)
        self.counts: Counter[str] = Counter()

    def would_be_hit(self) -> None:
        self.counts["would_be_hit"] += 1

    def sample(self, plan: Plan, scope: Scope, key: str, score: float, prior: float, served: bool) -> bool:
        """Whether this lookup is verified (then plan.verify is set): drawn at the scope's share; a
        would-be hit only while the verification calls stay within max_share of the would-be hits."""
        settings = self.settings.verification
        if not settings.enabled:
            return False
        share = scope.share(prior)
        if not served and settings.judge != "model" and share >= settings.max_share:
            # A near-miss goes upstream anyway: judging it costs no call (only a model judge would),
            # so while the scope is uncertain every one is judged.
            share = 1.0
        counts = self.counts
        if served and counts["verification_call"] + 1 > settings.max_share * counts["would_be_hit"]:
            return False
        if share <= 0 or not self.calibration.draw(share):
            return False
        plan.verify = Pending(plan.namespace, plan.model, key, score, served, 1.0 / share, scope.guarded)
        counts["verification_call" if served else "near_miss_checked"] += 1
        return True

    def spent(self, pending: Pending, completion: dict[str, Any]) -> None:
        """Count a re-asked would-be hit's tokens (a near-miss went upstream anyway: no extra call)."""
        usage = completion.get("usage")
        if pending.served and isinstance(usage, dict):
            self.tokens += int(usage.get("total_tokens") or 0)

    async def judge(
        self,
        pending: Pending,
        completion: dict[str, Any],
        cached: dict[str, Any] | None,
        embedder: Embedder | None,
    ) -> None:
        """Judge a fresh answer against the cached one (None: the entry went meanwhile) and record the
        outcome in its scope."""
        fresh = answer_text(completion)
        old = answer_text(cached) if cached is not None else None
        if fresh is None or old is None:
            self.counts["verification_lost"] += 1  # no text to compare
            return
        try:
            same = await judge(self.settings.verification.judge, fresh, old, embedder, self.ask)
        except Exception as exc:  # the embedder behind, the judge model failing: no outcome, no harm
            self.counts["verification_lost"] += 1
            log.debug("verification not judged: %s", exc)
            return
        outcome = self.calibration.record(pending, same)
        self.counts["verified_right" if same else "verified_wrong"] += 1
        if self.share_outcome is not None:
            await self.share_outcome(outcome)

    def report(self, prior: float | None) -> dict[str, Any]:
        """Verification and calibration at a glance: the pooled estimate with its interval, the calls
        and their tokens, and each namespace and model's cut. `prior`: the verifier's cut at δ (None
        without a verifier: nothing is served by meaning, so nothing is verified)."""
        calibration = self.calibration
        scopes = []
        if prior is not None:
            for (namespace, model, _), scope in calibration.scopes.items():
                scopes.append({"namespace": namespace, "model": model, **scope.report(prior)})
        none = {
            "false_hit_rate": None,
            "interval": None,
            "verified": 0,
            "trusted": False,
            "above_bound": False,
        }
        pooled = calibration.pooled(prior) if prior is not None else none
        settings = self.settings.verification
        counts = self.counts
        return {
            "enabled": settings.enabled,
            "judge": settings.judge,
            "max_share": settings.max_share,
            "max_false_hit_rate": calibration.delta,
            "prior_cut": round(prior, 4) if prior is not None else None,
            **pooled,
            "would_be_hits": counts["would_be_hit"],
            "verification_calls": counts["verification_call"],
            "verification_tokens": self.tokens,
            "near_misses_checked": counts["near_miss_checked"],
            "judged_right": counts["verified_right"],
            "judged_wrong": counts["verified_wrong"],
            "lost": counts["verification_lost"],
            "scopes": scopes,
        }
