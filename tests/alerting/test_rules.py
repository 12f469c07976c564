"""Alert rules tested as Prometheus's rule unit tests are: input series in, expected alerts at given
evaluation times out, on an injected clock (no sleeping). The engine, the condition language, the KPI
computation and the SQLite store are the real ones; only the clock and the receiving end are not."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from iros.alerting.channels.base import ChannelError, Notification
from iros.alerting.engine import AlertEngine
from iros.alerting.rules import RuleErrors, build_rules, parse_rules
from iros.alerting.store import AlertStore
from iros.conditions.parse import LiveSource
from iros.config import AlertingSettings, Target
from iros.core.timefmt import parse_duration
from iros.metrics.collector import Frame
from iros.metrics.sketch import Sketch
from iros.metrics.store import SeriesKey

T0 = 1_800_000_000.0
HOOK = "http://127.0.0.1:9/"  # never called: these tests record what the channel is given
OK_MISS = (("cache", "miss"), ("model", "alpha"), ("outcome", "ok"))
SEED_TARGETS = {
    "response_time_ms": Target(target=2000, warning_threshold=3000, critical_threshold=5000),
    "cache_hit_rate": Target(target=0.70, warning_threshold=0.50, critical_threshold=0.30),
}


def expand(notation: str) -> list[float | None]:
    """Prometheus's series notation: 'a+bxn' is a, a+b, ... (n+1 values), 'axn' repeats a, '_' is no
    sample."""
    out: list[float | None] = []
    for part in notation.split():
        if part == "_":
            out.append(None)
            continue
        m = re.fullmatch(r"(-?[\d.]+)(?:([+-][\d.]+))?x(\d+)", part)
        if m:
            start, step, n = float(m.group(1)), float(m.group(2) or 0), int(m.group(3))
            out += [start + step * i for i in range(n + 1)]
        else:
            out.append(float(part))
    return out


def input_series(interval: str, series: dict[SeriesKey, str]) -> list[Frame]:
    """One frame per interval step, each holding that step's sample of every series."""
    step = parse_duration(interval)
    frames: dict[float, Frame] = {}
    for key, notation in series.items():
        for i, value in enumerate(expand(notation)):
            if value is None:
                continue
            at = T0 + i * step
            frame = frames.setdefault(at, Frame(at, {}))
            frame.series[key] = Sketch.of([value])
    return [frames[t] for t in sorted(frames)]


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class RecordingChannel:
    """The receiving end (outside the machine in production): keeps what it is sent."""

    name: str
    type: str = "recording"
    sent: list[Notification] = field(default_factory=list)

    async def send(self, notification: Notification) -> None:
        self.sent.append(notification)

    def describe(self) -> dict[str, Any]:
        return {}

    async def aclose(self) -> None:
        return None

    def statuses(self) -> list[tuple[str, str]]:
        return [(a["rule"], a["am"]["status"]) for n in self.sent for a in n.alerts]


class RuleTest:
    """An engine over given series with a fake clock: `at("3m")` evaluates there and returns the active
    alerts as {rule: state}."""

    def __init__(
        self, tmp: Path, frames: list[Frame], channels: tuple[str, ...] = ("hook",), **alerting: Any
    ):
        settings = AlertingSettings.model_validate(
            {
                "kpi_window_seconds": 30,
                "channels": [{"name": c, "type": "webhook", "config": {"url": HOOK}} for c in channels],
                **alerting,
            }
        )
        self.clock = Clock()
        self.frames = frames
        self.channels = {c: RecordingChannel(c) for c in channels}
        self.tmp = tmp
        self.settings = settings
        self.engine = self._engine()

    def _engine(self) -> AlertEngine:
        return AlertEngine(
            self.settings,
            SEED_TARGETS,
            LiveSource(lambda: self.frames, kpi_window=self.settings.kpi_window_seconds),
            AlertStore(self.tmp / "alerts.db"),
            dict(self.channels),  # type: ignore[arg-type]
            self.clock,
        )

    async def start(self) -> RuleTest:
        await self.engine.start(background=False)
        return self

    async def at(self, when: str) -> dict[str, str]:
        self.clock.now = T0 + parse_duration(when)
        await self.engine.evaluate(self.clock.now)
        await self.engine.notifier.dispatch(wait=True)
        return {a["rule"]: a["state"] for a in self.engine.active()}

    async def restart(self) -> None:
        await self.engine.close()
        self.engine = self._engine()
        await self.start()

    async def close(self) -> None:
        await self.engine.close()


def rule(name: str, condition: str, duration: str = "0s", **more: Any) -> dict[str, Any]:
    return {"name": name, "condition": condition, "duration": duration, "severity": "warning", **more}


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


class TestStates:
    async def test_pending_then_firing_after_the_duration_then_resolved(self, tmp: Path) -> None:
        """`duration` is Prometheus's `for`: pending until held that long, then firing, then resolved."""
        frames = input_series("1m", {("response_time_ms", OK_MISS): "100 100 5000 5000 5000 5000 100 100"})
        t = await RuleTest(
            tmp,
            frames,
            target_rules=False,
            alert_rules=[rule("high_response_time", "response_time_avg > 3000", "2m")],
        ).start()
        try:
            assert await t.at("0m") == {}
            assert await t.at("1m") == {}
            assert await t.at("2m") == {"high_response_time": "pending"}
            assert await t.at("3m") == {"high_response_time": "pending"}
            assert await t.at("4m") == {"high_response_time": "firing"}
            assert await t.at("5m") == {"high_response_time": "firing"}
            assert await t.at("6m") == {}
            total, history = await t.engine.store.history(rule="high_response_time")
            assert total == 1 and history[0].state == "resolved"
            assert (history[0].fired_at, history[0].resolved_at) == (T0 + 240, T0 + 360)
            steps = [(s["from"], s["to"]) for s in await t.engine.store.transitions(history[0].id)]
            assert steps == [("inactive", "pending"), ("pending", "firing"), ("firing", "resolved")]
            assert t.channels["hook"].statuses() == [
                ("high_response_time", "firing"),
                ("high_response_time", "resolved"),
            ]
        finally:
            await t.close()

    async def test_a_dip_while_pending_starts_the_wait_again(self, tmp: Path) -> None:
        """A pending alert whose condition clears goes back to inactive and notifies no one."""
        frames = input_series("1m", {("response_time_ms", OK_MISS): "5000 5000 100 5000 5000 5000"})
        t = await RuleTest(
            tmp, frames, target_rules=False, alert_rules=[rule("slow", "response_time_avg > 3000", "2m")]
        ).start()
        try:
            assert [await t.at(f"{m}m") for m in range(6)] == [
                {"slow": "pending"},
                {"slow": "pending"},
                {},
                {"slow": "pending"},
                {"slow": "pending"},
                {"slow": "firing"},
            ]
            assert t.channels["hook"].statuses() == [("slow", "firing")]
        finally:
            await t.close()

    async def test_zero_duration_fires_at_the_first_true_evaluation(self, tmp: Path) -> None:
        """Without a duration an alert fires the first time its condition holds."""
        frames = input_series("1m", {("response_time_ms", OK_MISS): "100 9000"})
        t = await RuleTest(
            tmp, frames, target_rules=False, alert_rules=[rule("slow", "response_time_p95 > 5000")]
        ).start()
        try:
            assert await t.at("0m") == {}
            assert await t.at("1m") == {"slow": "firing"}
        finally:
            await t.close()

    async def test_keep_firing_for_rides_out_a_short_dip(self, tmp: Path) -> None:
        """keep_firing_for keeps a firing alert through a dip shorter than it, and resolves after."""
        frames = input_series("1m", {("response_time_ms", OK_MISS): "5000 100 5000 100 100 100"})
        t = await RuleTest(
            tmp,
            frames,
            target_rules=False,
            alert_rules=[rule("slow", "response_time_avg > 3000", keep_firing_for="90s")],
        ).start()
        try:
            assert [await t.at(f"{m}m") for m in range(6)] == [
                {"slow": "firing"},
                {"slow": "firing"},
                {"slow": "firing"},
                {"slow": "firing"},
                {},
                {},
            ]
            assert t.channels["hook"].statuses() == [("slow", "firing"), ("slow", "resolved")]
        finally:
            await t.close()

    async def test_hysteresis_needs_a_clear_margin_to_resolve(self, tmp: Path) -> None:
        """With hysteresis 0.1 a value just under the threshold keeps firing; one 10% under resolves."""
        frames = input_series("1m", {("response_time_ms", OK_MISS): "3100 2950 3050 2800"})
        t = await RuleTest(
            tmp,
            frames,
            target_rules=False,
            alert_rules=[rule("slow", "response_time_avg > 3000", hysteresis=0.1)],
        ).start()
        try:
            states = [await t.at(f"{m}m") for m in range(4)]
            assert states == [{"slow": "firing"}, {"slow": "firing"}, {"slow": "firing"}, {"slow": "firing"}]
            assert await t.at("4m") == {}  # no sample in the window: the condition has no data
        finally:
            await t.close()

    async def test_performance_targets_yield_warning_and_critical_rules(self, tmp: Path) -> None:
        """The targets block becomes rules on the worse side of each threshold: high response times,
        low cache hit rates."""
        hit = (("cache", "exact_hit"), ("model", "alpha"), ("outcome", "ok"))
        frames = input_series(
            "1m",
            {
                ("response_time_ms", OK_MISS): "1000 3500 6000 6000 6000",
                ("response_time_ms", hit): "_ _ 1 _ _",
            },
        )
        t = await RuleTest(tmp, frames, target_rule_duration="1m").start()
        try:
            names = {r.name: (r.condition.text, r.severity) for r in t.engine.rules}
            assert names["response_time_ms_critical"] == ("response_time_avg >= 5000", "critical")
            assert names["cache_hit_rate_warning"] == ("cache_hit_rate <= 0.5", "warning")
            assert await t.at("0m") == {
                "cache_hit_rate_warning": "pending",
                "cache_hit_rate_critical": "pending",
            }
            assert await t.at("1m") == {
                "cache_hit_rate_warning": "firing",
                "cache_hit_rate_critical": "firing",
                "response_time_ms_warning": "pending",
            }
            # One hit in two lookups: 0.5 is still a warning, no longer critical.
            assert await t.at("2m") == {
                "cache_hit_rate_warning": "firing",
                "response_time_ms_warning": "firing",
            }
            await t.at("3m")
            state = await t.at("4m")
            assert (
                state["response_time_ms_critical"] == "firing"
                and state["response_time_ms_warning"] == "firing"
            )
        finally:
            await t.close()


class TestNotifications:
    async def test_repeats_stop_once_acknowledged(self, tmp: Path) -> None:
        """A firing alert is re-sent every repeat interval until someone acknowledges it."""
        frames = input_series("1m", {("response_time_ms", OK_MISS): "5000x10"})
        t = await RuleTest(
            tmp,
            frames,
            target_rules=False,
            repeat_interval="2m",
            alert_rules=[rule("slow", "response_time_avg > 3000")],
        ).start()
        try:
            for m in range(5):
                await t.at(f"{m}m")
            assert t.channels["hook"].statuses() == [("slow", "firing")] * 3  # at 0m, 2m, 4m
            alert_id = t.engine.active()[0]["id"]
            assert await t.engine.store.acknowledge(alert_id, "kim", "on it", t.clock.now)
            for m in range(5, 10):
                await t.at(f"{m}m")
            assert len(t.channels["hook"].sent) == 3
            assert t.engine.active()[0]["acknowledged_by"] == "kim"
        finally:
            await t.close()

    async def test_a_firing_critical_inhibits_its_warning(self, tmp: Path) -> None:
        """While a KPI's critical rule fires its warning rule fires too but notifies no one; once the
        critical resolves, the warning is sent."""
        frames = input_series("1m", {("response_time_ms", OK_MISS): "6000 6000 4000 4000"})
        t = await RuleTest(tmp, frames, target_rule_duration="0s").start()
        try:
            state = await t.at("0m")
            assert state["response_time_ms_warning"] == state["response_time_ms_critical"] == "firing"
            assert [r for r, _ in t.channels["hook"].statuses() if r.startswith("response")] == [
                "response_time_ms_critical"
            ]
            warning = next(a for a in t.engine.active() if a["rule"] == "response_time_ms_warning")
            critical = next(a for a in t.engine.active() if a["rule"] == "response_time_ms_critical")
            assert warning["inhibited_by"] == [critical["id"]]
            await t.at("2m")
            sent = [s for s in t.channels["hook"].statuses() if s[0].startswith("response")]
            assert sent[1:] == [
                ("response_time_ms_critical", "resolved"),
                ("response_time_ms_warning", "firing"),
            ]
        finally:
            await t.close()

    async def test_silenced_alerts_fire_but_notify_no_one(self, tmp: Path) -> None:
        """A silence matching the alert's labels keeps its notifications back until it expires."""
        from iros.alerting.store import Silence

        frames = input_series("1m", {("response_time_ms", OK_MISS): "5000x10"})
        t = await RuleTest(
            tmp,
            frames,
            target_rules=False,
            repeat_interval="1m",
            alert_rules=[rule("slow", "response_time_avg > 3000")],
        ).start()
        try:
            matcher = [{"name": "alertname", "value": "slow", "isEqual": True}]
            await t.engine.store.add_silence(Silence("s1", matcher, T0, T0 + 150, "kim", "", T0))
            assert await t.at("0m") == {"slow": "firing"}
            assert await t.at("2m") == {"slow": "firing"}
            assert t.channels["hook"].sent == []
            assert t.engine.active()[0]["silenced_by"] == ["s1"]
            await t.at("3m")  # the silence ended at 2.5m
            assert t.channels["hook"].statuses() == [("slow", "firing")]
        finally:
            await t.close()

    async def test_alerts_due_together_go_out_as_one_grouped_message(self, tmp: Path) -> None:
        """group_by severity: two rules firing at once reach a channel as one message with both."""
        frames = input_series("1m", {("response_time_ms", OK_MISS): "5000"})
        t = await RuleTest(
            tmp,
            frames,
            target_rules=False,
            group_by=["severity"],
            alert_rules=[rule("slow", "response_time_avg > 3000"), rule("worse", "response_time_max > 4000")],
        ).start()
        try:
            await t.at("0m")
            (message,) = t.channels["hook"].sent
            assert sorted(a["rule"] for a in message.alerts) == ["slow", "worse"]
            assert message.group_labels == {"severity": "warning"}
        finally:
            await t.close()

    async def test_a_restart_keeps_firing_alerts_without_notifying_again(self, tmp: Path) -> None:
        """State lives in SQLite: after a restart the same alert is firing and no duplicate goes out."""
        frames = input_series("1m", {("response_time_ms", OK_MISS): "5000x10"})
        t = await RuleTest(
            tmp, frames, target_rules=False, alert_rules=[rule("slow", "response_time_avg > 3000", "1m")]
        ).start()
        try:
            await t.at("0m")
            await t.at("1m")
            before = t.engine.active()
            await t.restart()
            assert t.engine.active() == before
            assert await t.at("2m") == {"slow": "firing"}
            assert t.engine.active()[0]["id"] == before[0]["id"]
            assert t.channels["hook"].statuses() == [("slow", "firing")]
        finally:
            await t.close()

    async def test_pending_outbox_items_are_sent_after_a_restart(self, tmp: Path) -> None:
        """A notification accepted but not yet delivered is delivered by the next process."""
        frames = input_series("1m", {("response_time_ms", OK_MISS): "5000x3"})
        t = await RuleTest(
            tmp, frames, target_rules=False, alert_rules=[rule("slow", "response_time_avg > 3000")]
        ).start()
        try:
            t.clock.now = T0
            await t.engine.evaluate(T0)  # queued, not dispatched
            await t.restart()
            await t.engine.notifier.dispatch(wait=True)
            assert t.channels["hook"].statuses() == [("slow", "firing")]
        finally:
            await t.close()


@dataclass
class FlakyChannel(RecordingChannel):
    """Fails its first `failures` sends."""

    failures: int = 0

    async def send(self, notification: Notification) -> None:
        if self.failures:
            self.failures -= 1
            raise ChannelError("the receiver answered HTTP 503", retryable=True)
        await super().send(notification)


async def test_failed_sends_are_retried_with_growing_backoff(tmp: Path) -> None:
    """A channel that fails is retried after 1, 2, 4 s (backoff doubling) and delivers in the end."""
    frames = input_series("1m", {("response_time_ms", OK_MISS): "5000"})
    rules = [rule("slow", "response_time_avg > 3000")]
    t = RuleTest(
        tmp, frames, target_rules=False, alert_rules=rules, retry={"backoff_seconds": 1, "max_attempts": 5}
    )
    flaky = FlakyChannel("hook", failures=3)
    t.engine.notifier.channels["hook"] = flaky
    await t.start()
    try:
        await t.at("0s")
        tried_at = []
        for second in range(10):
            t.clock.now = T0 + second
            before = flaky.failures
            await t.engine.notifier.dispatch(wait=True)
            if flaky.failures != before or flaky.sent:
                tried_at.append(second)
            if flaky.sent:
                break
        assert tried_at == [1, 3, 7]  # after the first try at 0 s: waits of 1, 2 and 4 s
        assert flaky.statuses() == [("slow", "firing")]
        assert (await t.engine.store.outbox_stats())["hook"] == {"sent": 1}
    finally:
        await t.close()


async def test_a_refused_notification_is_not_retried(tmp: Path) -> None:
    """A permanent failure (the receiver refuses the message) is dropped, not retried forever."""

    class Refusing(RecordingChannel):
        async def send(self, notification: Notification) -> None:
            raise ChannelError("the receiver answered HTTP 400", retryable=False)

    frames = input_series("1m", {("response_time_ms", OK_MISS): "5000"})
    t = RuleTest(tmp, frames, target_rules=False, alert_rules=[rule("slow", "response_time_avg > 3000")])
    t.engine.notifier.channels["hook"] = Refusing("hook")
    await t.start()
    try:
        await t.at("0s")
        assert (await t.engine.store.outbox_stats())["hook"] == {"failed": 1}
        assert t.engine.notifier.stats()["hook"]["last_error"] == "the receiver answered HTTP 400"
    finally:
        await t.close()


class TestRuleValidation:
    def test_put_bodies_are_checked_rule_by_rule(self) -> None:
        """Every problem in a rule list is named with where it is."""
        settings = AlertingSettings.model_validate(
            {"channels": [{"name": "hook", "type": "webhook", "config": {"url": "http://127.0.0.1:9/"}}]}
        )
        body = {
            "alert_rules": [
                rule("ok", "error_rate > 0.1", channels=["hook"]),
                rule("bad_kpi", "eror_rate > 0.1"),
                rule("bad_channel", "error_rate > 0.1", channels=["pager"]),
                {"name": "no_condition"},
                rule("bad_duration", "error_rate > 0.1", "5 minutes"),
                rule("ok", "error_rate > 0.2"),
            ]
        }
        with pytest.raises(RuleErrors) as err:
            parse_rules(body, settings)
        text = "\n".join(err.value.errors)
        assert (
            "alert_rules[1] (bad_kpi).condition: unknown KPI 'eror_rate' (did you mean 'error_rate'" in text
        )
        assert "alert_rules[2] (bad_channel).channels: no channel 'pager'" in text
        assert "alert_rules[3] (no_condition).condition: Field required" in text
        assert "alert_rules[4] (bad_duration).duration" in text
        assert "'ok' is used twice" in text

    def test_configured_rules_replace_target_rules_of_the_same_name(self) -> None:
        """A configured rule named like a target rule replaces it; a disabled one removes it."""
        settings = AlertingSettings.model_validate(
            {
                "alert_rules": [
                    rule("cache_hit_rate_warning", "cache_hit_rate < 0.4"),
                    rule("cache_hit_rate_critical", "cache_hit_rate < 0.1", enabled=False),
                ]
            }
        )
        rules = {r.name: r for r in build_rules(settings, SEED_TARGETS)}
        assert rules["cache_hit_rate_warning"].condition.text == "cache_hit_rate < 0.4"
        assert "cache_hit_rate_critical" not in rules
        assert rules["response_time_ms_warning"].source == "targets"


SEED_BLOCKS = """
{
  "live_alerting": {
    "enabled": true,
    "alert_rules": [
      {"name": "high_response_time", "condition": "response_time_avg > 3000", "duration": "2m",
       "severity": "warning"},
      {"name": "cpu_usage_high", "condition": "cpu_usage > 8.0", "duration": "1m", "severity": "critical"},
      {"name": "cache_hit_rate_low", "condition": "cache_hit_rate < 0.5", "duration": "5m",
       "severity": "warning"}
    ]
  },
  "alerting": {
    "enabled": true,
    "channels": [
      {"name": "email", "type": "email",
       "config": {"smtp_server": "smtp.company.com", "recipients": ["ops@company.com"]}},
      {"name": "slack", "type": "slack",
       "config": {"webhook_url": "https://hooks.slack.com/...", "channel": "#ops-alerts"}}
    ],
    "alert_rules": [
      {"name": "performance_degradation", "condition": "response_time_p95 > 5000", "duration": "3m",
       "severity": "critical", "channels": ["email", "slack"]},
      {"name": "resource_exhaustion", "condition": "memory_usage > 90", "duration": "1m",
       "severity": "critical", "channels": ["email", "slack"]}
    ]
  }
}
"""


def test_the_seeds_alerting_blocks_load_as_written(tmp_path: Path) -> None:
    """Both seed blocks load verbatim; their five rules are in force and the inline webhook stays hidden."""
    import json

    from iros.alerting.rules import configured_rules
    from iros.config import load_settings

    settings = load_settings(None, json.loads(SEED_BLOCKS))
    rules = {r.name: r for r in build_rules(settings.alerting, {}, configured=configured_rules(settings))}
    # Beside them, the default alert on the semantic cache's verified false-hit rate.
    assert rules.pop("cache_false_hit_rate_above_bound").source == "targets"
    assert set(rules) == {
        "high_response_time",
        "cpu_usage_high",
        "cache_hit_rate_low",
        "performance_degradation",
        "resource_exhaustion",
    }
    assert rules["cpu_usage_high"].condition.names == ["cpu_usage_avg"]
    assert rules["resource_exhaustion"].condition.names == ["memory_percent"]
    assert rules["cache_hit_rate_low"].duration == 300 and rules["cache_hit_rate_low"].channels == (
        "email",
        "slack",
    )
    assert "hooks.slack.com" not in settings.model_dump_json()


def test_the_alert_bench_reports_evaluation_cost() -> None:
    """`iros bench alerts` evaluates every rule over a synthetic live window and reports CPU per run."""
    from iros.bench.alerts import RULES, run_alert_bench

    result = run_alert_bench(models=2, seconds=10, evaluations=3)
    # The seed's four targets give two rules each; one more is the cache's default false-hit alert.
    assert result["rules"] == len(RULES) + 8 + 1
    assert result["evaluations"] == 3 and result["series_per_second"] == 2 * (6 + 5) + 1
    assert 0 < result["event_loop_cpu_ms"]["median"] <= result["event_loop_cpu_ms"]["max"]
