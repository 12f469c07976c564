"""Model selection, load balancing, circuit breakers and single-flight, in-process with injected clocks."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from iros.config import ModelOptimization, ModelSettings, OptimizationCriteria, OptimizationSettings
from iros.core.admission import Admission
from iros.gateway.singleflight import SingleFlight, request_key
from iros.routing.breaker import CircuitBreaker
from iros.routing.router import Router
from iros.routing.selection import MIN_SAMPLES, Selector


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Prefs:
    prefer_speed: bool = False
    quality_threshold: float | None = None
    lightweight_only: bool = False


def _models(**accuracy: float) -> list[ModelSettings]:
    return [
        ModelSettings(
            name=n,
            backend="simulated",
            profile="instant",
            accuracy=a,
            group="chat",
            tags=["lightweight"] if n.startswith("small") else [],
        )
        for n, a in accuracy.items()
    ]


def _selector(clock: Clock, prefs: Prefs | None = None, **options: object) -> Selector:
    opts = ModelOptimization(**{"exploration_rate": 0.1, **options})  # type: ignore[arg-type]
    return Selector(_models(big=0.9, small=0.88), opts, prefs or Prefs(), clock, random.Random(7))


def _measure(selector: Selector, model: str, ms: float, n: int = MIN_SAMPLES + 2) -> None:
    for _ in range(n):
        selector.success(model, ms)


class TestSelector:
    def test_unmeasured_model_is_tried_first(self) -> None:
        """A model without measurements is put first, so a new model gets measured."""
        clock = Clock()
        s = _selector(clock)
        _measure(s, "big", 50)
        assert s.rank(["big", "small"])[0] == "small"

    def test_faster_model_wins_and_slower_is_still_explored(self) -> None:
        """With equal accuracy the faster model takes most requests, and exploration still sends some to
        the slower one."""
        clock = Clock()
        s = _selector(clock, exploration_rate=0.2)
        _measure(s, "big", 500)
        _measure(s, "small", 50)
        heads = Counter(s.rank(["big", "small"])[0] for _ in range(300))
        assert heads["small"] > heads["big"] > 0

    def test_accuracy_weight_can_outweigh_speed(self) -> None:
        """When accuracy is all that counts, the more accurate model wins however slow it is."""
        clock = Clock()
        criteria = OptimizationCriteria(response_time_weight=0, resource_usage_weight=0, accuracy_weight=1)
        s = Selector(
            _models(big=0.95, small=0.6),
            ModelOptimization(exploration_rate=0, optimization_criteria=criteria),
            Prefs(),
            clock,
        )
        _measure(s, "big", 900)
        _measure(s, "small", 10)
        assert s.rank(["big", "small"])[0] == "big"

    def test_prefer_speed_shifts_the_choice_to_the_faster_model(self) -> None:
        """Turning prefer_speed on moves the pick from the accurate model to the fast one."""
        clock = Clock()
        prefs = Prefs()
        s = Selector(_models(big=0.95, small=0.7), ModelOptimization(exploration_rate=0), prefs, clock)
        _measure(s, "big", 110)
        _measure(s, "small", 100)
        assert s.rank(["big", "small"])[0] == "big"
        prefs.prefer_speed = True
        assert s.rank(["big", "small"])[0] == "small"

    def test_quality_threshold_and_lightweight_filters(self) -> None:
        """A quality threshold leaves out models below it; lightweight-only keeps the tagged ones."""
        clock = Clock()
        prefs = Prefs(quality_threshold=0.89)
        s = _selector(clock, prefs, exploration_rate=0)
        _measure(s, "big", 500)
        _measure(s, "small", 50)
        assert s.rank(["big", "small"])[0] == "big"
        prefs.quality_threshold, prefs.lightweight_only = None, True
        assert [s.rank(["big", "small"])[0] for _ in range(20)] == ["small"] * 20

    def test_feedback_moves_the_accuracy_estimate(self) -> None:
        """User feedback pulls a model's accuracy estimate away from the configured value."""
        s = _selector(Clock())
        before = s.stats["big"].accuracy_estimate
        s.feedback("big", total=0.0, n=20)
        assert s.stats["big"].accuracy_estimate < before

    def test_failing_model_loses_and_is_measured_again_when_quiet(self) -> None:
        """Errors lower a model's score; once unmeasured for explore_after_seconds it is tried again."""
        clock = Clock()
        s = _selector(clock, exploration_rate=0, explore_after_seconds=30)
        _measure(s, "big", 50)
        _measure(s, "small", 60)
        for _ in range(10):
            s.failure("big")
        assert s.rank(["big", "small"])[0] == "small"
        clock.now += 31
        s.success("small", 60)
        assert s.rank(["big", "small"])[0] == "big"

    def test_without_dynamic_selection_the_configured_order_holds(self) -> None:
        """dynamic_selection off: the group's first model always leads, however slow it measures."""
        clock = Clock()
        s = _selector(clock, dynamic_selection=False)
        _measure(s, "big", 900)
        _measure(s, "small", 10)
        assert {s.rank(["big", "small"])[0] for _ in range(50)} == {"big"}

    def test_without_performance_based_routing_measurements_do_not_count(self) -> None:
        """performance_based_routing off: speed is ignored, so the more accurate model leads."""
        clock = Clock()
        s = _selector(clock, performance_based_routing=False)
        _measure(s, "big", 900)
        _measure(s, "small", 10)
        assert {s.rank(["big", "small"])[0] for _ in range(50)} == {"big"}

    def test_resource_cost_is_attributed_by_busy_time(self) -> None:
        """Process CPU is shared among models by the time each spent answering."""
        s = _selector(Clock())
        s.success("big", 300)
        s.success("small", 100)
        s.attribute(cpu_percent=40.0, memory_bytes=100 * 2**20, gpu_percent=None, seconds=5)
        big, small = s.stats["big"].cpu_ms.value, s.stats["small"].cpu_ms.value
        assert big is not None and small is not None and big == pytest.approx(3 * small)


class TestBreaker:
    def test_opens_after_failures_within_the_window(self) -> None:
        """N failures inside the window open it; spread wider than the window they do not."""
        clock = Clock()
        b = CircuitBreaker(3, window_seconds=10, open_seconds=5, clock=clock)
        for _ in range(3):
            b.failure()
            clock.now += 6
        assert b.state == "closed"
        for _ in range(3):
            b.failure()
        assert b.state == "open" and not b.allow()

    def test_half_open_probe_closes_on_success_and_reopens_on_failure(self) -> None:
        """After open_seconds one probe is let through: a failure reopens, a success closes."""
        clock = Clock()
        b = CircuitBreaker(1, window_seconds=10, open_seconds=5, clock=clock)
        b.failure()
        clock.now += 5
        assert b.state == "half_open"
        assert b.allow() and not b.allow()  # one probe only
        b.failure()
        assert b.state == "open"
        clock.now += 5
        assert b.allow()
        b.success()
        assert b.state == "closed" and b.allow() and b.allow()


class TestRouter:
    def _router(self, **options: object) -> Router:
        models = [
            ModelSettings(name="m", backend="simulated", profile="instant"),
            ModelSettings(name="m", backend="simulated", profile="instant"),
            ModelSettings(name="m", backend="simulated", profile="instant"),
        ]
        opt = OptimizationSettings(model_optimization=ModelOptimization(**options))  # type: ignore[arg-type]
        return Router(models, optimization=opt, rng=random.Random(3))

    def test_power_of_two_prefers_the_less_loaded_deployment(self) -> None:
        """The busiest deployment is never first when two others are idle."""
        router = self._router()
        busy = router.deployments["m"][0]
        busy.in_flight = 50
        firsts = Counter(router.candidates("m")[0].index for _ in range(100))
        assert firsts[0] == 0 and firsts[1] > 0 and firsts[2] > 0

    def test_least_in_flight_and_open_breakers_last(self) -> None:
        """least_in_flight orders by load; a deployment with an open breaker goes last."""
        router = self._router(balancing="least_in_flight")
        d0, d1, d2 = router.deployments["m"]
        d0.in_flight, d1.in_flight, d2.in_flight = 2, 1, 0
        for _ in range(5):
            d2.breaker.failure()
        assert [d.index for d in router.candidates("m")] == [1, 0, 2]

    def test_groups_and_auto_resolve_to_their_models(self) -> None:
        """A group name gives its members, auto gives every model, an unknown name a 404."""
        from iros.core.errors import IrosError

        router = Router([*_models(big=0.9, small=0.8), ModelSettings(name="x", backend="simulated")])
        assert sorted(router.resolve("chat")) == ["big", "small"]
        assert sorted(router.resolve("auto")) == ["big", "small", "x"]
        with pytest.raises(IrosError) as err:
            router.resolve("nope")
        assert err.value.status == 404 and "chat (group)" in err.value.message


class TestSingleFlight:
    async def test_identical_concurrent_calls_share_one(self) -> None:
        """Ten callers with one key make one call and all get its result."""
        flight: SingleFlight[int] = SingleFlight()
        gate = asyncio.Event()
        calls = 0

        async def call() -> int:
            nonlocal calls
            calls += 1
            await gate.wait()
            return 42

        tasks = [asyncio.create_task(flight.do("k", call)) for _ in range(10)]
        while flight.shared < 9:  # noqa: ASYNC110 - waiting for the other tasks to get there
            await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(*tasks)
        assert calls == 1 and [r for r, _ in results] == [42] * 10
        assert sum(shared for _, shared in results) == 9 and len(flight) == 0

    async def test_error_is_shared_and_a_leaving_follower_does_not_cancel(self) -> None:
        """A follower that leaves leaves the call running; the call's error reaches every caller."""
        flight: SingleFlight[int] = SingleFlight()
        gate = asyncio.Event()

        async def call() -> int:
            await gate.wait()
            raise ValueError("upstream down")

        leader = asyncio.create_task(flight.do("k", call))
        follower = asyncio.create_task(flight.do("k", call))
        other = asyncio.create_task(flight.do("k", call))
        while flight.shared < 2:  # noqa: ASYNC110 - waiting for the other tasks to get there
            await asyncio.sleep(0)
        follower.cancel()
        gate.set()
        for task in (leader, other):
            with pytest.raises(ValueError, match="upstream down"):
                await task

    def test_request_key_separates_tenants(self) -> None:
        """The same body from two API keys gives two keys; key order in the body does not matter."""
        a = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        b = {"messages": [{"role": "user", "content": "hi"}], "model": "m"}
        assert request_key("alice", a) == request_key("alice", b) != request_key("bob", a)


class TestAdmissionLimit:
    async def test_raising_the_limit_admits_waiters(self) -> None:
        """A live raise of the concurrency limit hands slots to queued requests at once."""
        admission = Admission(1, 10, 30)
        await admission.acquire()
        waiter = asyncio.create_task(admission.acquire())
        while admission.queued == 0:  # noqa: ASYNC110 - waiting for the other tasks to get there
            await asyncio.sleep(0)
        admission.set_limit(2)
        await asyncio.wait_for(waiter, 5)
        assert admission.active == 2 and admission.queued == 0


ISSUE_YAML = """
models:
  - {name: big, backend: openai, base_url: "http://127.0.0.1:9101/v1", group: chat, accuracy: 0.92}
  - {name: small, backend: openai, base_url: "http://127.0.0.1:9102/v1", group: chat, accuracy: 0.80, tags: [lightweight]}
optimization:
  model_optimization: {dynamic_selection: true, performance_based_routing: true, load_balancing: true,
                       optimization_criteria: {response_time_weight: 0.4, resource_usage_weight: 0.3, accuracy_weight: 0.3}}
  auto_optimization:
    enabled: true
    optimization_rules:
      - {name: high_load_optimization, trigger: "cpu_usage > 7.0 for 5m", actions: [enable_aggressive_caching, switch_to_lightweight_models]}
"""  # noqa: E501 - the issue's YAML, verbatim


class TestConfig:
    def test_the_issues_yaml_loads_as_written(self, tmp_path: Path) -> None:
        """The optimization block of the issue loads, and its rule's trigger parses."""
        from iros.conditions.parse import parse_condition
        from iros.config import load_settings

        path = tmp_path / "iros.yaml"
        path.write_text(ISSUE_YAML)
        opt = load_settings(path).optimization
        assert opt.model_optimization.optimization_criteria.response_time_weight == 0.4
        [rule] = opt.auto_optimization.optimization_rules
        assert rule.actions == ["enable_aggressive_caching", "switch_to_lightweight_models"]
        assert parse_condition(rule.trigger).for_seconds == 300

    def test_unknown_action_is_refused_naming_it(self, tmp_path: Path) -> None:
        """A rule with an action the engine does not have is a configuration error that names it."""
        from iros.config import ConfigError, load_settings

        path = tmp_path / "iros.yaml"
        path.write_text(ISSUE_YAML.replace("switch_to_lightweight_models", "reboot_the_gpu"))
        with pytest.raises(ConfigError, match="actions"):
            load_settings(path)

    def test_default_config_has_a_chat_group_with_accuracies(self) -> None:
        """The embedded default serves `chat` and `auto` out of the box."""
        from iros.config import load_settings

        router = Router(load_settings(None).models)
        assert sorted(router.resolve("chat")) == ["large", "lightweight"]
        assert all(s.accuracy for s in router.selector.stats.values())
