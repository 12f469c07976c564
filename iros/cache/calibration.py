"""The semantic cache's own error rate, measured on the traffic it serves, and the cut that keeps it
under the operator's bound δ (`cache.max_false_hit_rate`).

calibration = Calibration(delta=0.05, max_share=0.2)
scope = calibration.scope(namespace, model)
cut = scope.cut(prior_cut)                     # the prior's cut until the scope's outcomes say otherwise
if scope.sample(score, cut): ...               # ask upstream too, judge the fresh answer against the cached
scope.record(score, correct, weight)           # a judged outcome (weight: 1 / the chance it was sampled)
scope.report()                                 # estimate, Wilson interval, verified count, the cut
outcome = calibration.record(pending, correct) # judged here: into its scope, and what to tell the others
calibration.add(outcomes)                      # judged by another worker: into its scope only

Why a confidence bound: an error rate measured on 30 verified hits says little. The cut is the lowest
score whose verified hits above it keep the Wilson interval's upper end at or under δ; until some cut
does, the prior decides, unless the outcomes already show the prior's cut is wrong here (the interval's
lower end above δ), and then the cut rises to where the measured rate is under δ. Outcomes are weighted
by the inverse of their sampling chance, so a region sampled densely does not outweigh one sampled
sparsely. Sampling is dense (max_share) while the bound is not yet under δ, sparse once it is well under.

Every worker holds every worker's outcomes (shared_calibration.py carries them), so all compute the same
cut; this module only counts, it never waits on another worker.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Calibration", "Outcome", "Pending", "Scope", "wilson"]

Z = 1.96  # two-sided 95%
MIN_VERIFIED = 20  # effective outcomes a cut needs before its bound is trusted
MAX_OUTCOMES = 4000  # per scope, the most recent; older outcomes describe traffic that has moved on
MAX_SCOPES = 1000  # (namespace, model) pairs tracked; namespaces are API keys, so this is generous
SPARSE_SHARE = 0.02  # sampling share once confident (the bound well under δ)


def wilson(errors: float, n: float, z: float = Z) -> tuple[float, float]:
    """The Wilson score interval for an error rate of errors/n (n may be an effective, weighted count)."""
    if n <= 0:
        return 0.0, 1.0
    p = min(max(errors / n, 0.0), 1.0)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(slots=True)
class _Tail:
    """Weighted outcomes at or above one score: counts for the bound."""

    weight: float = 0.0
    errors: float = 0.0
    square: float = 0.0  # sum of squared weights, for the effective count

    @property
    def effective(self) -> float:
        return self.weight * self.weight / self.square if self.square else 0.0

    def interval(self) -> tuple[float, float]:
        n = self.effective
        return wilson(self.errors / self.weight * n if self.weight else 0.0, n)


@dataclass(slots=True)
class Scope:
    """One (namespace, model): its verified outcomes and the cut they support. A `guarded` scope holds the
    candidates the shared-instruction rule flags (verifier.rules.shared_instruction), calibrated apart:
    never served on the prior (its prior cut is infinite), only where their own outcomes keep the bound
    under δ, so a deployment whose traffic quotes and rewords the rest ('"It works," Halla said' /
    '"It works," said Brian Halla') learns to serve them while classification prompts stay refused,
    however rare they are among the rest of the traffic."""

    delta: float
    max_share: float
    guarded: bool = False
    outcomes: deque[tuple[float, bool, float]] = field(default_factory=lambda: deque(maxlen=MAX_OUTCOMES))
    verified: int = 0  # outcomes ever recorded (hits and near-misses)
    verified_hits: int = 0  # of which the cache would have served
    wrong_hits: int = 0
    _memo: tuple[float, int, float, _Tail] | None = None  # (prior, verified) -> cut, its tail

    def record(self, score: float, correct: bool, weight: float, served: bool) -> None:
        self.outcomes.append((score, correct, max(weight, 1.0)))
        self.verified += 1
        if served:
            self.verified_hits += 1
            self.wrong_hits += not correct
        self._memo = None

    def _tail(self, cut: float) -> _Tail:
        tail = _Tail()
        for score, correct, weight in self.outcomes:
            if score >= cut:
                tail.weight += weight
                tail.square += weight * weight
                tail.errors += weight * (not correct)
        return tail

    def cut(self, prior: float) -> float:
        """The lowest cut the outcomes support at δ; the prior's while they support none."""
        return self._state(prior)[0]

    def _own(self, prior: float) -> float:
        """The prior's cut as it stands for this scope: none (infinite) for a guarded one."""
        return math.inf if self.guarded else prior

    def _state(self, prior: float) -> tuple[float, _Tail]:
        prior = self._own(prior)
        memo = self._memo
        if memo is not None and memo[0] == prior and memo[1] == self.verified:
            return memo[2], memo[3]
        cut = self._calibrate(prior)
        state = (cut, self._tail(cut))
        self._memo = (prior, self.verified, *state)
        return state

    def _calibrate(self, prior: float) -> float:
        if not self.outcomes:
            return prior
        # Walk the scores from the top down, keeping running weighted counts.
        ranked = sorted(self.outcomes, key=lambda o: -o[0])
        tail = _Tail()
        best: float | None = None
        i = 0
        while i < len(ranked):
            score = ranked[i][0]
            while i < len(ranked) and ranked[i][0] == score:
                _, correct, weight = ranked[i]
                tail.weight += weight
                tail.square += weight * weight
                tail.errors += weight * (not correct)
                i += 1
            if tail.effective >= MIN_VERIFIED and tail.interval()[1] <= self.delta:
                best = score
        if best is not None:
            return best
        at_prior = self._tail(prior)
        if at_prior.effective >= MIN_VERIFIED and at_prior.interval()[0] > self.delta:
            # The prior is wrong here: serve only where the measured rate is under δ (or nothing).
            for score in sorted({s for s, _, _ in ranked if s > prior}):
                tail = self._tail(score)
                if tail.effective >= MIN_VERIFIED / 2 and tail.errors <= self.delta * tail.weight:
                    return score
            return math.inf
        return prior

    def share(self, prior: float) -> float:
        """The chance a would-be hit (or near-miss) is verified now: max_share until the served hits'
        bound is well under δ (half of it), then sparse."""
        _, tail = self._state(prior)
        confident = tail.effective >= MIN_VERIFIED and tail.interval()[1] <= self.delta / 2
        return min(self.max_share, SPARSE_SHARE) if confident else self.max_share

    def near(self, score: float, prior: float) -> bool:
        """A near-miss: a candidate past the similarity gate that the verifier scored under the cut, at
        any distance from it, so the cut can move down to wherever this traffic's outcomes allow in
        one step rather than a band at a time (a band of 0.25 had the cut reach a new domain's
        rewordings only near the end of a 1,000-question stream). 0 is a rule's refusal, never a
        candidate."""
        return 0.0 < score < self.cut(prior)

    def report(self, prior: float) -> dict[str, Any]:
        cut, tail = self._state(prior)
        low, high = tail.interval()
        own = self._own(prior)
        return {
            "guarded": self.guarded,
            "cut": None if math.isinf(cut) else round(cut, 4),
            "prior_cut": None if math.isinf(own) else round(own, 4),
            "calibrated": cut != own,
            "verified": self.verified,
            "verified_hits": self.verified_hits,
            "wrong_hits": self.wrong_hits,
            "effective_at_cut": round(tail.effective, 1),
            "false_hit_rate": round(tail.errors / tail.weight, 4) if tail.weight else None,
            "interval": [round(low, 4), round(high, 4)] if tail.weight else None,
            "sampling_share": round(self.share(prior), 4),
        }


@dataclass(frozen=True, slots=True)
class Pending:
    """A verification under way: the cached entry the fresh answer will be judged against."""

    namespace: str
    model: str
    key: str
    score: float
    served: bool  # a would-be hit (else a near-miss)
    weight: float  # 1 / the chance it was sampled
    guarded: bool = False  # judged for the scope of shared-instruction candidates


@dataclass(frozen=True, slots=True)
class Outcome:
    """One judged verification, as the workers tell each other (`to_data` / `of_data`)."""

    namespace: str
    model: str
    score: float
    correct: bool
    weight: float
    served: bool
    guarded: bool = False

    def to_data(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of_data(cls, data: dict[str, Any]) -> Outcome | None:
        """The outcome in `data`, or None when it is not one (written by another version)."""
        try:
            outcome = cls(
                str(data["namespace"]),
                str(data["model"]),
                float(data["score"]),
                bool(data["correct"]),
                float(data["weight"]),
                bool(data["served"]),
                bool(data.get("guarded", False)),  # absent from an earlier version's outcomes
            )
        except (KeyError, TypeError, ValueError):
            return None
        return outcome if math.isfinite(outcome.score) and math.isfinite(outcome.weight) else None


class Calibration:
    """Every scope's outcomes; δ and max_share live here so a tune reaches all scopes at once."""

    def __init__(self, delta: float, max_share: float, seed: int | None = None) -> None:
        self.delta = delta
        self.max_share = max_share
        self.scopes: dict[tuple[str, str, bool], Scope] = {}  # (namespace, model, guarded)
        self.random = random.Random(seed)

    def set_delta(self, delta: float) -> None:
        self.delta = delta
        for scope in self.scopes.values():
            scope.delta = delta
            scope._memo = None

    def scope(self, namespace: str, model: str, guarded: bool = False) -> Scope:
        """The scope a lookup is judged in, made when first needed. A guarded one is kept only once it has
        an outcome; until then each lookup gets a fresh, empty one, so flagged candidates met but never
        judged take no place among the MAX_SCOPES."""
        found = self.scopes.get((namespace, model, guarded))
        if found is not None:
            return found
        if guarded:
            return Scope(self.delta, self.max_share, guarded)
        return self._kept(namespace, model, guarded)

    def _kept(self, namespace: str, model: str, guarded: bool) -> Scope:
        key = (namespace, model, guarded)
        found = self.scopes.get(key)
        if found is None:
            if len(self.scopes) >= MAX_SCOPES:
                # The scope verified least long ago gives way (dicts keep insertion order).
                self.scopes.pop(next(iter(self.scopes)))
            found = self.scopes[key] = Scope(self.delta, self.max_share, guarded)
        return found

    def record(self, pending: Pending, correct: bool) -> Outcome:
        """The judgement of a verification made here: into its scope, and returned for the others."""
        outcome = Outcome(
            pending.namespace,
            pending.model,
            pending.score,
            correct,
            pending.weight,
            pending.served,
            pending.guarded,
        )
        self.add([outcome])
        return outcome

    def add(self, outcomes: Iterable[Outcome]) -> None:
        """Outcomes into their scopes (another worker's: what record() returned there)."""
        for o in outcomes:
            self._kept(o.namespace, o.model, o.guarded).record(o.score, o.correct, o.weight, o.served)

    def draw(self, share: float) -> bool:
        return self.random.random() < share

    def pooled(self, prior: float) -> dict[str, Any]:
        """All scopes' served-hit outcomes together: the estimate the alert watches."""
        tail = _Tail()
        verified = 0
        for scope in self.scopes.values():
            verified += scope.verified
            part = scope._state(prior)[1]
            tail.weight += part.weight
            tail.square += part.square
            tail.errors += part.errors
        low, high = tail.interval()
        return {
            "max_false_hit_rate": self.delta,
            "false_hit_rate": round(tail.errors / tail.weight, 4) if tail.weight else None,
            "interval": [round(low, 4), round(high, 4)] if tail.weight else None,
            "verified": verified,
            # Only once the interval means something: a handful of outcomes always has a wide one.
            "trusted": tail.effective >= MIN_VERIFIED,
            "above_bound": tail.effective >= MIN_VERIFIED and high > self.delta,
        }
