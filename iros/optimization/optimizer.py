"""The auto-optimization engine: rules whose trigger holds change live settings, and change them back
once the trigger has been clear for a cool-down. Every change is audited with the KPIs before and after.

optimizer = Optimizer(settings, tuning, router, gateway=gateway, monitor=monitor)
await optimizer.start()                  # evaluates every evaluation_interval_seconds in the background
await optimizer.tick(now)                # one evaluation (tests pass their own clock's time)
await optimizer.compare()                # each action's KPIs before and after (/api/analysis/compare/...)

A rule is the seed's {name, trigger: "cpu_usage > 7.0 for 5m", actions: [...]}; the trigger is read by
iros.conditions (the language alert rules use too). In dry-run mode rules are evaluated and audited as
"would_apply"/"would_revert", and nothing changes.

With several workers only the holder of the shared lease (`leadership`) evaluates; the rules, the mode and
each rule's state go to every worker as the shared document "optimizer", so a worker that takes over
reverts what its predecessor applied, and every worker answers GET /api/optimization/rules alike.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iros.conditions.parse import Condition, ConditionError, Hold, LiveSource, Source, parse_condition
from iros.config import OptimizationRule, Settings
from iros.core.periodic import cancel_all, every
from iros.gateway.pipeline import Gateway
from iros.metrics import kpi
from iros.metrics.monitor import Monitor
from iros.metrics.store import Samples
from iros.optimization.actionlog import FILENAME, ActionLog
from iros.optimization.actions import action_changes
from iros.optimization.tuning import Tuning
from iros.routing.router import Router
from iros.state.lease import Leadership
from iros.state.sync import SharedState

log = logging.getLogger("iros.optimizer")

MAINTAIN_SECONDS = 0.5  # queue gauges; resource attribution and feedback every ATTRIBUTE_SECONDS
ATTRIBUTE_SECONDS = 5.0
WARM_BATCH = 20  # frequent misses warmed per evaluation while cache warming is on
KPI_KEYS = (
    "count",
    "throughput_rps",
    "response_time_avg",
    "response_time_p95",
    "error_rate",
    "cache_hit_rate",
    "cpu_usage_avg",
)
MAX_KPI_WINDOW = 300.0  # the collector's live window


@dataclass
class RuleState:
    rule: OptimizationRule
    condition: Condition
    hold: Hold
    fired_at: float | None = None  # when its actions were applied (or, dry, would have been)
    dry: bool = False
    clear_since: float | None = None
    changes: dict[str, dict[str, Any]] = field(default_factory=dict)
    audit_id: int | None = None
    kpis_before: dict[str, Any] | None = None
    last_value: float | None = None
    last_active: bool = False
    last_error: str | None = None

    def status(self) -> dict[str, Any]:
        return {
            **self.rule.model_dump(),
            "condition": self.condition.canonical(),
            "state": "applied"
            if self.fired_at and not self.dry
            else "would_apply"
            if self.fired_at
            else "pending"
            if self.hold.since is not None
            else "clear",
            "value": self.last_value,
            "active": self.last_active,
            "fired_at": self.fired_at,
            "clear_since": self.clear_since,
            "changes": self.changes,
            "error": self.last_error,
        }


_SHARED_FIELDS = ("fired_at", "dry", "clear_since", "changes", "audit_id", "kpis_before")


def _state_of(state: RuleState) -> dict[str, Any]:
    return {f: getattr(state, f) for f in _SHARED_FIELDS}


def _restore(state: RuleState, shared: dict[str, Any]) -> None:
    for f in _SHARED_FIELDS:
        if f in shared:
            setattr(state, f, shared[f])


def compile_rule(rule: OptimizationRule) -> RuleState:
    """Raises ConditionError for a trigger the condition language does not accept."""
    condition = parse_condition(rule.trigger)
    return RuleState(rule, condition, Hold(condition.for_seconds))


class Optimizer:
    def __init__(
        self,
        settings: Settings,
        tuning: Tuning,
        router: Router,
        *,
        gateway: Gateway | None = None,
        monitor: Monitor | None = None,
        source: Source | None = None,
        actionlog: ActionLog | None = None,
        clock: Callable[[], float] = time.time,
        leadership: Leadership | None = None,
        shared: SharedState | None = None,
    ) -> None:
        auto = settings.optimization.auto_optimization
        self.settings = settings
        self.tuning = tuning
        self.router = router
        self.gateway = gateway
        self.monitor = monitor
        self.clock = clock
        self.source: Source | None = source or (LiveSource.of(monitor) if monitor is not None else None)
        self.log = actionlog or ActionLog(Path(settings.server.data_dir) / FILENAME)
        self.enabled = auto.enabled
        self.dry_run = auto.dry_run
        self.cooldown = auto.cooldown_seconds
        self.interval = auto.evaluation_interval_seconds
        self.states = [compile_rule(r) for r in auto.optimization_rules]
        self.last_evaluation: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._harvested_at = 0.0
        tuning.listeners.append(self._changed_by_hand)
        self._own_change = False
        self.leadership = leadership
        self.shared = shared
        if shared is not None:
            shared.register("optimizer", self.shared_view, self.apply_shared)

    @property
    def leader(self) -> bool:
        return self.leadership is None or self.leadership.leader

    # --- rules --------------------------------------------------------------------------------
    def rules_status(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "dry_run": self.dry_run,
            "cooldown_seconds": self.cooldown,
            "evaluation_interval_seconds": self.interval,
            "metrics": self.source is not None,
            "last_evaluation": self.last_evaluation,
            "rules": [s.status() for s in self.states],
        }

    async def replace_rules(self, rules: list[OptimizationRule]) -> None:
        """New rules; a rule kept as it was keeps its state, the actions of any other are reverted."""
        fresh = [compile_rule(r) for r in rules]  # raises before anything changes
        old = {(s.rule.name, s.rule.trigger, tuple(s.rule.actions)): s for s in self.states}
        kept = []
        for state in fresh:
            key = (state.rule.name, state.rule.trigger, tuple(state.rule.actions))
            previous = old.pop(key, None)
            kept.append(previous if previous is not None else state)
            if previous is not None:
                previous.rule = state.rule
        for gone in old.values():
            if gone.fired_at is not None and self.leader:
                await self._revert(gone, self.clock(), "rule removed or changed")
        self.states = kept

    async def set_dry_run(self, dry_run: bool) -> None:
        if dry_run and not self.dry_run and self.leader:
            # Going dry: take back what was really applied, so nothing stays changed unseen.
            for state in self.states:
                if state.fired_at is not None and not state.dry:
                    await self._revert(state, self.clock(), "dry-run mode switched on")
        self.dry_run = dry_run

    # --- shared with the other workers --------------------------------------------------------
    def shared_view(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "dry_run": self.dry_run,
            "cooldown_seconds": self.cooldown,
            "rules": [s.rule.model_dump(mode="json") for s in self.states],
            "states": {s.rule.name: _state_of(s) for s in self.states},
        }

    async def apply_shared(self, view: dict[str, Any]) -> None:
        rules = [OptimizationRule.model_validate(r) for r in view["rules"]]
        if self.leader:
            # Another worker's API change: the leader reverts what it removes; its own states stand.
            await self.replace_rules(rules)
            await self.set_dry_run(bool(view["dry_run"]))
        else:
            self.states = [compile_rule(r) for r in rules]
            for state in self.states:
                _restore(state, view["states"].get(state.rule.name) or {})
            self.dry_run = bool(view["dry_run"])
        self.enabled = bool(view["enabled"])
        self.cooldown = float(view["cooldown_seconds"])

    async def publish(self) -> None:
        """Send the rules, mode and states to every other worker (after a change made here)."""
        if self.shared is not None:
            await self.shared.publish("optimizer")

    async def tick(self, now: float | None = None) -> None:
        """Evaluate every rule once: apply what fires, revert what has been clear for the cool-down."""
        now = self.clock() if now is None else now
        self.last_evaluation = now
        if not self.enabled or self.source is None:
            return
        for state in self.states:
            if not state.rule.enabled:
                continue
            try:
                value, active = await state.condition.evaluate(self.source, now)
                state.last_error = None
            except Exception as exc:  # a store outage must not stop the other rules
                state.last_error = str(exc)
                log.warning("rule %s: trigger not evaluated: %s", state.rule.name, exc)
                continue
            state.last_value, state.last_active = value, active
            held = state.hold.update(active, now)
            if state.fired_at is None:
                if held:
                    await self._apply(state, now)
            elif active:
                state.clear_since = None
            else:
                state.clear_since = state.clear_since or now
                if now - state.clear_since >= self.cooldown:
                    await self._revert(state, now, "trigger clear for the cool-down")

    async def _apply(self, state: RuleState, now: float) -> None:
        rule = state.rule
        changes: dict[str, Any] = {}
        notes: list[str] = []
        for action in rule.actions:
            wanted, note = action_changes(action, self.tuning)
            changes.update(wanted)
            if note:
                notes.append(f"{action}: {note}")
        window = min(max(60.0, state.condition.for_seconds), MAX_KPI_WINDOW)
        state.kpis_before = self.kpis(now - window, now)
        state.fired_at, state.dry, state.clear_since = now, self.dry_run, None
        if self.dry_run:
            state.changes = {k: {"before": self.tuning.get(k), "after": v} for k, v in changes.items()}
        else:
            self._own_change = True
            try:
                state.changes = await self.tuning.set(changes, f"rule:{rule.name}")
            finally:
                self._own_change = False
        log.info("rule %s fired (%s): %s", rule.name, "dry run" if self.dry_run else "applied", state.changes)
        state.audit_id = await self.log.add(
            {
                "at": now,
                "event": "would_apply" if self.dry_run else "applied",
                "rule": rule.name,
                "trigger": rule.trigger,
                "trigger_value": state.last_value,
                "actions": list(rule.actions),
                "dry_run": self.dry_run,
                "changes": state.changes,
                "kpis_before": state.kpis_before,
                "applied_at": now,
                "note": "; ".join(notes) or None,
                "source": f"rule:{rule.name}",
            }
        )

    async def _revert(self, state: RuleState, now: float, why: str) -> None:
        back: dict[str, Any] = {}
        skipped = []
        for name, change in state.changes.items():
            # Only what still holds this rule's value: a later hand or rule change is left alone.
            if not state.dry and self.tuning.get(name) == change["after"]:
                back[name] = change["before"]
            elif not state.dry:
                skipped.append(name)
        reverted: dict[str, dict[str, Any]] = {}
        if back:
            self._own_change = True
            try:
                reverted = await self.tuning.set(back, f"rule:{state.rule.name}")
            finally:
                self._own_change = False
        fired = state.fired_at or now
        kpis_after = self.kpis(max(fired, now - MAX_KPI_WINDOW), now)
        note = why + (f"; left as changed since: {', '.join(skipped)}" if skipped else "")
        await self.log.add(
            {
                "at": now,
                "event": "would_revert" if state.dry else "reverted",
                "rule": state.rule.name,
                "actions": list(state.rule.actions),
                "dry_run": state.dry,
                "changes": reverted
                if not state.dry
                else {k: {"before": v["after"], "after": v["before"]} for k, v in state.changes.items()},
                "kpis_before": state.kpis_before,
                "kpis_after": kpis_after,
                "applied_at": fired,
                "reverted_at": now,
                "note": note,
                "source": f"rule:{state.rule.name}",
            }
        )
        if state.audit_id is not None:
            await self.log.update(state.audit_id, kpis_after=kpis_after, reverted_at=now)
        log.info("rule %s reverted: %s", state.rule.name, note)
        state.fired_at, state.clear_since, state.changes, state.audit_id = None, None, {}, None
        state.hold = Hold(state.condition.for_seconds)

    async def _changed_by_hand(self, source: str, changes: dict[str, dict[str, Any]]) -> None:
        # API tuning is audited too; the engine's own changes are audited with their rule.
        if self._own_change:
            return
        await self.log.add(
            {"at": self.clock(), "event": "changed", "rule": None, "changes": changes, "source": source}
        )

    # --- KPIs and comparison ------------------------------------------------------------------
    def kpis(self, since: float, until: float) -> dict[str, Any]:
        """The response KPIs over [since, until] from the live window (empty without metrics)."""
        if self.monitor is None:
            if self.source is None:
                return {}
            flat = self.source.kpis(until)
            return {k: flat.get(k) for k in KPI_KEYS}
        frames = [f for f in self.monitor.frames() if f.at <= until]
        seconds = max(until - since, 1.0)
        report = kpi.response_kpis(kpi.window(frames, since), seconds)
        return {"window_seconds": round(seconds, 3), **{k: report.get(k) for k in KPI_KEYS}}

    async def compare(self, limit: int = 100) -> list[dict[str, Any]]:
        """Each firing (applied or dry): its changes and the KPIs before it and while it held."""
        rows = [r for r in await self.log.rows(limit * 2) if r["event"] in ("applied", "would_apply")]
        now = self.clock()
        out = []
        for row in rows[:limit]:
            stored: dict[str, Any] | None = row.get("kpis_after")
            live = stored is None
            after = (
                stored if stored is not None else self.kpis(max(row["applied_at"], now - MAX_KPI_WINDOW), now)
            )
            before = row.get("kpis_before") or {}
            delta = {
                k: round(after[k] - before[k], 6)
                for k in KPI_KEYS
                if isinstance(before.get(k), int | float) and isinstance(after.get(k), int | float)
            }
            out.append(
                {
                    "id": row["id"],
                    "rule": row["rule"],
                    "actions": row.get("actions"),
                    "dry_run": row.get("dry_run"),
                    "applied_at": row["applied_at"],
                    "reverted_at": row.get("reverted_at"),
                    "active": live,
                    "changes": row.get("changes"),
                    "kpis_before": before,
                    "kpis_after": after,
                    "delta": delta,
                    "note": row.get("note"),
                }
            )
        return out

    # --- background ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(every(MAINTAIN_SECONDS, self.refresh_queues, log, "optimizer")),
            asyncio.create_task(every(ATTRIBUTE_SECONDS, self.attribute, log, "optimizer")),
            asyncio.create_task(every(self.interval, self.evaluate, log, "optimizer")),
        ]

    async def close(self) -> None:
        await cancel_all(self._tasks)
        self.log.close()

    async def evaluate(self) -> None:
        if self.leader:
            before = [_state_of(s) for s in self.states]
            await self.tick()
            if [_state_of(s) for s in self.states] != before:
                await self.publish()
        if self.tuning.cache_warming:
            await self.warm()

    async def warm(self) -> int:
        """Warm the cache with the most frequent recent misses; returns how many were cached."""
        gateway = self.gateway
        if gateway is None or gateway.cache is None:
            return 0
        jobs = [key for key, _ in gateway.cache.misses.most_common(WARM_BATCH)]
        results = await asyncio.gather(*(gateway.warm(m, p, {}) for m, p in jobs), return_exceptions=True)
        for key, outcome in zip(jobs, results, strict=True):
            if outcome in ("cached", "already_cached"):
                gateway.cache.misses.pop(key, None)
        return sum(1 for r in results if r == "cached")

    def refresh_queues(self) -> None:
        """Each deployment's queue length to /metrics (and, every attribution, to the store)."""
        if self.monitor is None:
            return
        gauge = self.monitor.exposition.gauges.get("backend_queue_length")
        if gauge is not None:
            for d in self.router.all():
                gauge.labels(d.label).set(d.queued)

    def attribute(self) -> None:
        """Share resource use among models, take in new user feedback, record the queue lengths."""
        monitor = self.monitor
        if monitor is None:
            return
        sample = monitor.sampler.latest
        selector = self.router.selector
        if sample is not None:
            selector.attribute(
                sample.process_cpu_percent,
                float(sample.process_memory_bytes),
                sample.gpu_utilization,
                ATTRIBUTE_SECONDS,
            )
        # Frames older than two seconds are complete (the collector merges only into the current one).
        cutoff = time.time() - 2
        for frame in monitor.collector.frames:
            if self._harvested_at < frame.at <= cutoff:
                for (metric, labels), sketch in frame.series.items():
                    if metric == "user_satisfaction" and sketch.count:
                        selector.feedback(dict(labels).get("model", ""), sketch.sum, sketch.count)
        self._harvested_at = max(self._harvested_at, cutoff)
        if "backend_queue_length" in monitor.exposition.gauges:
            now = time.time()
            monitor.store.append(
                {
                    ("backend_queue_length", (("deployment", d.label),)): Samples([now], [float(d.queued)])
                    for d in self.router.all()
                }
            )


__all__ = ["ConditionError", "Optimizer", "RuleState", "action_changes", "compile_rule"]
