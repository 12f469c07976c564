"""Model selection: which model of a group (or of all, for `auto`) answers, from live measurements.

selector = Selector(settings.models, settings.optimization.model_optimization, live)
selector.rank(["large", "lightweight"])     # best first; the rest are the fallbacks, in order
selector.success("lightweight", upstream_ms=80.0, ttft_ms=30.0, tpot_ms=5.0)
selector.failure("large")
selector.feedback("large", 0.9, n=1)        # user feedback, blended with the configured accuracy

Each model's score is the weighted sum of three parts, each 0..1 relative to the best candidate:
speed (moving average of upstream latency), resource use (CPU, memory and GPU attributed per response)
and accuracy (configured, moved by feedback), times (1 - its recent error rate). A model with fewer
than MIN_SAMPLES measurements, or none for `explore_after_seconds`, is tried first (so a new or
recovered model is measured again), and `exploration_rate` of requests go to a random other candidate.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from iros.config import ModelOptimization, ModelSettings

MIN_SAMPLES = 3  # measurements before a model's averages are trusted
FEEDBACK_PRIOR = 10.0  # the configured accuracy counts as this many feedback scores
DEFAULT_ACCURACY = 0.8  # a model configured without one
PROBE_GAP = 0.5  # seconds between exploring requests to a model still being measured
UNMEASURED_SPEED = 0.5  # the speed part of a model without a latency average, while others have one


class Preferences(Protocol):
    """The live values selection reads on every request (iros.tuning.Tuning holds them)."""

    prefer_speed: bool
    quality_threshold: float | None
    lightweight_only: bool


@dataclass(slots=True)
class Ewma:
    """An exponentially weighted moving average; `value` is None until the first sample."""

    alpha: float
    value: float | None = None
    n: int = 0

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)
        self.n += 1


@dataclass(slots=True)
class ModelStats:
    name: str
    accuracy: float | None
    tags: tuple[str, ...]
    alpha: float
    latency_ms: Ewma = field(init=False)
    ttft_ms: Ewma = field(init=False)
    tpot_ms: Ewma = field(init=False)
    errors: Ewma = field(init=False)
    cpu_ms: Ewma = field(init=False)
    memory_mb: Ewma = field(init=False)
    gpu_ms: Ewma = field(init=False)
    feedback_sum: float = 0.0
    feedback_n: float = 0.0
    responses: int = 0
    failures: int = 0
    selected: int = 0
    explored: int = 0
    last_measured: float | None = None
    last_tried: float | None = None  # when exploration last sent it a request
    # Since the last attribution: time spent answering and responses, to share out CPU/memory/GPU.
    busy_ms: float = 0.0
    pending_responses: int = 0

    def __post_init__(self) -> None:
        for name in ("latency_ms", "ttft_ms", "tpot_ms", "errors", "cpu_ms", "memory_mb", "gpu_ms"):
            setattr(self, name, Ewma(self.alpha))

    @property
    def accuracy_estimate(self) -> float:
        prior = DEFAULT_ACCURACY if self.accuracy is None else self.accuracy
        return (prior * FEEDBACK_PRIOR + self.feedback_sum) / (FEEDBACK_PRIOR + self.feedback_n)


class Selector:
    def __init__(
        self,
        models: Sequence[ModelSettings],
        options: ModelOptimization,
        live: Preferences,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.options = options
        self.live = live
        self.clock = clock
        self.rng = rng or random.Random()
        self.stats: dict[str, ModelStats] = {}
        for m in models:
            if m.name not in self.stats:
                self.stats[m.name] = ModelStats(
                    m.name, m.accuracy, tuple(m.tags), options.moving_average_alpha
                )
        self.decisions = 0

    # --- measurements -------------------------------------------------------------------------
    def success(
        self, model: str, upstream_ms: float, ttft_ms: float | None = None, tpot_ms: float | None = None
    ) -> None:
        s = self.stats.get(model)
        if s is None:
            return
        s.latency_ms.add(upstream_ms)
        if ttft_ms is not None:
            s.ttft_ms.add(ttft_ms)
        if tpot_ms is not None:
            s.tpot_ms.add(tpot_ms)
        s.errors.add(0.0)
        s.responses += 1
        s.busy_ms += upstream_ms
        s.pending_responses += 1
        s.last_measured = self.clock()

    def failure(self, model: str) -> None:
        s = self.stats.get(model)
        if s is None:
            return
        s.errors.add(1.0)
        s.failures += 1
        s.last_measured = self.clock()

    def feedback(self, model: str, total: float, n: float) -> None:
        """Add `n` user scores summing to `total` (0..1 each) to a model's accuracy estimate."""
        s = self.stats.get(model)
        if s is not None and n > 0:
            s.feedback_sum += total
            s.feedback_n += n

    def attribute(
        self, cpu_percent: float, memory_bytes: float, gpu_percent: float | None, seconds: float
    ) -> None:
        """Share the process's CPU, memory and GPU over the last `seconds` among the models by the time
        each spent answering, giving each model's cost per response."""
        busy = sum(s.busy_ms for s in self.stats.values())
        if busy <= 0:
            return
        for s in self.stats.values():
            if s.pending_responses:
                share = s.busy_ms / busy / s.pending_responses
                s.cpu_ms.add(cpu_percent / 100 * seconds * 1000 * share)
                s.memory_mb.add(memory_bytes / 2**20 * share)
                if gpu_percent is not None:
                    s.gpu_ms.add(gpu_percent / 100 * seconds * 1000 * share)
            s.busy_ms, s.pending_responses = 0.0, 0

    # --- choice -------------------------------------------------------------------------------
    def eligible(self, names: Sequence[str], min_accuracy: float | None = None) -> list[str]:
        """The candidates the live preferences (and the request's own `min_accuracy`) allow; never none:
        a filter that would empty the list keeps the most accurate model instead."""
        out = list(names)
        if self.live.lightweight_only:
            light = [n for n in out if "lightweight" in self.stats[n].tags]
            out = light or out
        threshold = self.live.quality_threshold
        if min_accuracy is not None:
            threshold = max(threshold or 0.0, min_accuracy)
        if threshold is not None:
            good = [n for n in out if self.stats[n].accuracy_estimate >= threshold]
            out = good or [max(out, key=lambda n: self.stats[n].accuracy_estimate)]
        return out

    def weights(self) -> tuple[float, float, float]:
        c = self.options.optimization_criteria
        rt, res, acc = c.response_time_weight, c.resource_usage_weight, c.accuracy_weight
        if self.live.prefer_speed:
            rt, acc = rt * 2, acc / 2
        total = rt + res + acc or 1.0
        return rt / total, res / total, acc / total

    def scores(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Each candidate's score and its parts (speed, resources, accuracy all 0..1, best = 1)."""
        stats = [self.stats[n] for n in names]
        measured = self.options.performance_based_routing
        latency = [s.latency_ms.value for s in stats]
        fastest = min((x for x in latency if x), default=None)
        parts_cost = [_resource(s) for s in stats]
        best_accuracy = max(s.accuracy_estimate for s in stats) or 1.0
        w_rt, w_res, w_acc = self.weights()
        out: dict[str, dict[str, Any]] = {}
        for s, lat, cost in zip(stats, latency, parts_cost, strict=True):
            # Unmeasured while others are: a middling prior, not the best; probing measures it.
            speed = 1.0 if not measured or not fastest else fastest / lat if lat else UNMEASURED_SPEED
            resources = _relative(cost, parts_cost) if measured else 1.0
            accuracy = s.accuracy_estimate / best_accuracy
            reliability = 1.0 - (s.errors.value or 0.0) if measured else 1.0
            score = (w_rt * speed + w_res * resources + w_acc * accuracy) * reliability
            out[s.name] = {
                "score": round(score, 4),
                "speed": round(speed, 4),
                "resources": round(resources, 4),
                "accuracy": round(accuracy, 4),
                "reliability": round(reliability, 4),
            }
        return out

    def rank(self, names: Sequence[str], min_accuracy: float | None = None) -> list[str]:
        """The candidates, the one to try first at the head; the rest are fallbacks, best next."""
        if len(names) <= 1:
            if names:
                self.stats[names[0]].selected += 1
            return list(names)
        allowed = self.eligible(names, min_accuracy)
        rest = [n for n in names if n not in allowed]
        if not self.options.dynamic_selection:
            order = allowed + rest
        else:
            scores = self.scores(allowed)
            order = sorted(allowed, key=lambda n: -scores[n]["score"]) + rest
            head = self._explore(allowed, order[0])
            if head != order[0]:
                order.remove(head)
                order.insert(0, head)
                self.stats[head].explored += 1
        self.stats[order[0]].selected += 1
        self.decisions += 1
        return order

    def _explore(self, allowed: list[str], best: str) -> str:
        if not self.options.performance_based_routing or len(allowed) < 2:
            return best
        now = self.clock()
        stale = self.options.explore_after_seconds
        for n in allowed:
            s = self.stats[n]
            # Unmeasured, or not heard from for a while (it may have recovered, or be new): measure it,
            # but not one that failed just now, and one probe at a time, not every request meanwhile.
            heard = max(s.last_measured or -math.inf, s.last_tried or -math.inf)
            quiet = now - heard > stale
            fresh = s.latency_ms.n < MIN_SAMPLES and s.failures == 0 and now - heard > PROBE_GAP
            if quiet or fresh:
                s.last_tried = now
                return n
        if self.rng.random() < self.options.exploration_rate:
            return self.rng.choice([n for n in allowed if n != best])
        return best

    def status(self) -> dict[str, dict[str, Any]]:
        scores = self.scores(list(self.stats)) if self.stats else {}
        total = sum(s.selected for s in self.stats.values()) or 1
        return {
            s.name: {
                "accuracy_configured": s.accuracy,
                "accuracy_estimate": round(s.accuracy_estimate, 4),
                "feedback_count": int(s.feedback_n),
                "latency_ms_avg": _round(s.latency_ms.value),
                "ttft_ms_avg": _round(s.ttft_ms.value),
                "tpot_ms_avg": _round(s.tpot_ms.value),
                "error_rate_avg": _round(s.errors.value, 4),
                "cpu_ms_per_response": _round(s.cpu_ms.value, 4),
                "memory_mb_per_response": _round(s.memory_mb.value, 4),
                "gpu_ms_per_response": _round(s.gpu_ms.value, 4),
                "responses": s.responses,
                "failures": s.failures,
                "selected": s.selected,
                "explored": s.explored,
                "selection_share": round(s.selected / total, 4),
                "tags": list(s.tags),
                **scores.get(s.name, {}),
            }
            for s in self.stats.values()
        }


def _resource(s: ModelStats) -> tuple[float | None, float | None, float | None]:
    return s.cpu_ms.value, s.memory_mb.value, s.gpu_ms.value


def _relative(cost: tuple[float | None, ...], all_costs: Sequence[tuple[float | None, ...]]) -> float:
    """Mean over the measured dimensions of (cheapest / this); 1.0 where nothing is measured."""
    parts = []
    for d, mine in enumerate(cost):
        if mine is None or mine <= 0:
            continue
        measured = [x for c in all_costs if (x := c[d]) is not None and x > 0]
        parts.append(min(measured, default=mine) / mine)
    return sum(parts) / len(parts) if parts else 1.0


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)
