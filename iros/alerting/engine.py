"""The alert engine: evaluates every rule each interval and moves its alert through
inactive -> pending -> firing -> resolved, with Prometheus's `for` (a rule's `duration`), hysteresis and
keep_firing_for against flapping, and notifications through the durable outbox.

engine = AlertEngine.build(settings, monitor)          # rules, store, channels, live source
await engine.start(); ...; await engine.close()
await engine.evaluate(now)                             # one evaluation (tests drive the clock)
engine.active()                                        # pending and firing alerts, as JSON

With several workers one holds data_dir/alerts.lock and evaluates; the others read state from the store.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from iros.alerting.channels.base import Channel
from iros.alerting.notify import Notifier, inhibited_by, silenced_by
from iros.alerting.rules import Rule, build_rules, configured_rules, rules_as_data
from iros.alerting.store import Alert, AlertStore, Silence
from iros.conditions.parse import LiveSource, Source
from iros.config import AlertingSettings, AlertRuleSettings, Settings, Target
from iros.core.periodic import cancel_all
from iros.metrics.monitor import Monitor

log = logging.getLogger("iros.alerts")

RETENTION_CHECK_SECONDS = 3600.0
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}


class AlertEngine:
    def __init__(
        self,
        settings: AlertingSettings,
        targets: dict[str, Target],
        source: Source,
        store: AlertStore,
        channels: dict[str, Channel],
        clock: Callable[[], float] = time.time,
        publish: Callable[[dict[str, Any]], None] | None = None,
        lock_path: Path | None = None,
        configured: Sequence[AlertRuleSettings] | None = None,
    ) -> None:
        self.settings = settings
        self.targets = targets
        self.source = source
        self.store = store
        self.clock = clock
        self.publish = publish
        self.lock_path = lock_path
        self.configured = list(configured) if configured is not None else list(settings.alert_rules)
        self.rules: list[Rule] = build_rules(settings, targets, configured=self.configured)
        self.rules_source = "config"
        self.notifier = Notifier(store, channels, settings, clock)
        self.current: dict[str, Alert] = {}  # rule name -> its pending or firing alert
        self.silences: list[Silence] = []
        self.leader = True
        self.evaluations = 0
        self.last_evaluation: float | None = None
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None
        self._retention_at = 0.0
        self._rules_stamp: float | None = None

    @classmethod
    def build(
        cls, settings: Settings, monitor: Monitor, clock: Callable[[], float] = time.time
    ) -> AlertEngine:
        from iros.alerting.channels import build_channels

        data_dir = Path(settings.server.data_dir)
        alerting = settings.alerting
        return cls(
            alerting,
            dict(settings.performance_targets),
            LiveSource.of(monitor, alerting.kpi_window_seconds),
            AlertStore(data_dir / "alerts.db"),
            build_channels(alerting.channels),
            clock,
            monitor.hub.publish,
            data_dir / "alerts.lock",
            configured_rules(settings),
        )

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self, background: bool = True) -> None:
        await self.store.start()
        await self._sync_rules()
        self.leader = self._take_lock()
        await self._load()
        if background:
            if self.leader:
                self.notifier.start()
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        await cancel_all([self._task])
        await self.notifier.close()
        await self.store.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)

    def _take_lock(self) -> bool:
        if self.lock_path is None:
            return True
        fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    async def _sync_rules(self) -> None:
        """Rules set through the API (by this worker or another) replace the configured ones."""
        saved = await self.store.saved_rules()
        stamp = saved[2] if saved is not None else None
        if stamp == self._rules_stamp:
            return
        self._rules_stamp = stamp
        if saved is None:
            self.rules = build_rules(self.settings, self.targets, configured=self.configured)
            self.rules_source = "config"
            return
        try:
            given = [AlertRuleSettings.model_validate(r) for r in saved[0]]
            self.rules, self.rules_source = build_rules(self.settings, self.targets, given), "api"
        except Exception as exc:  # rules saved by another version that no longer validate
            log.error("rules saved through the API no longer load (%s); using the configured ones", exc)

    async def _load(self) -> None:
        """State as the store has it: a restart picks up pending and firing alerts where they were."""
        now = self.clock()
        self.current = {a.rule: a for a in await self.store.alerts(("pending", "firing"))}
        self.silences = await self.store.silences(now)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.evaluation_interval_seconds)
            try:
                await self._sync_rules()
                if self.leader:
                    await self.evaluate(self.clock())
                else:
                    await self._load()
                self.last_error = None
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("alert evaluation failed")

    # --- evaluation -----------------------------------------------------------------------------
    async def evaluate(self, now: float | None = None) -> list[tuple[str, str, str]]:
        """Evaluate every rule once at `now`; returns the transitions as (rule, from, to)."""
        now = self.clock() if now is None else now
        self.silences = await self.store.silences(now)
        acks = await self.store.acks([a.id for a in self.current.values()])
        for alert in self.current.values():
            if alert.id in acks:
                alert.acked_by, alert.ack_comment, alert.acked_at = acks[alert.id]
        changes: list[tuple[str, str, str]] = []
        names = set()
        # Critical rules first, so a warning they inhibit is known to be inhibited when it fires.
        for rule in sorted(self.rules, key=lambda r: -SEVERITY_RANK.get(r.severity, 0)):
            names.add(rule.name)
            await asyncio.sleep(0)  # requests in flight get the loop between two rules
            change = await self._step(rule, now)
            if change is not None:
                changes.append((rule.name, *change))
        for name in [n for n in self.current if n not in names]:
            alert = self.current.pop(name)
            await self._move(alert, "resolved", now, "rule removed")
            changes.append((name, "firing", "resolved"))
        self.evaluations += 1
        self.last_evaluation = now
        if now - self._retention_at > RETENTION_CHECK_SECONDS:
            self._retention_at = now
            await self.store.forget_before(now - self.settings.history_retention_days * 86400)
        return changes

    async def _step(self, rule: Rule, now: float) -> tuple[str, str] | None:
        alert = self.current.get(rule.name)
        firing = alert is not None and alert.state == "firing"
        condition = rule.condition.relaxed(rule.hysteresis) if firing else rule.condition
        value, active = await condition.evaluate(self.source, now)
        if alert is None:
            if not active:
                return None
            alert = Alert.new(rule.name, rule.severity, rule.all_labels, now)
            alert.value = value
            alert.annotations = {"summary": rule.summary(value), "description": rule.description or ""}
            self.current[rule.name] = alert
            if rule.duration <= 0:
                await self._fire(alert, rule, now, "inactive")
                return ("inactive", "firing")
            await self._move(alert, "pending", now, None, "inactive")
            return ("inactive", "pending")
        if active:
            alert.value = value
            alert.last_true_at = now
            alert.annotations["summary"] = rule.summary(value)
        if alert.state == "pending":
            if not active:
                del self.current[rule.name]
                await self._move(alert, "inactive", now, "condition cleared before its duration")
                return ("pending", "inactive")
            if now - alert.active_at >= rule.duration:
                await self._fire(alert, rule, now, "pending")
                return ("pending", "firing")
            alert.updated_at = now
            await self.store.save_alert(alert)
            return None
        # firing
        if not active and now - (alert.last_true_at or now) >= rule.keep_firing_for:
            del self.current[rule.name]
            alert.value = value
            alert.resolved_at = now
            await self._move(alert, "resolved", now, None)
            await self.notifier.notify(alert, rule, "resolved", now, self.silences)
            await self.store.save_alert(alert)
            return ("firing", "resolved")
        if not silenced_by(self.silences, alert.labels, now):
            repeats = self.notifier.due_repeats(alert, rule, now)
            if repeats:
                await self.notifier.notify(alert, rule, "firing", now, self.silences, self.current.values())
        alert.updated_at = now
        await self.store.save_alert(alert)
        return None

    async def _fire(self, alert: Alert, rule: Rule, now: float, before: str) -> None:
        alert.fired_at = now
        alert.state = "firing"
        queued = await self.notifier.notify(alert, rule, "firing", now, self.silences, self.current.values())
        note = f"notified {', '.join(queued)}" if queued else "no channel notified"
        if silenced_by(self.silences, alert.labels, now):
            note = "silenced"
        elif inhibited := inhibited_by(self.settings.inhibit_rules, alert.labels, self.current.values()):
            note = f"inhibited by {', '.join(inhibited)}"
        await self._move(alert, "firing", now, note, before)

    async def _move(
        self, alert: Alert, state: str, now: float, note: str | None, before: str | None = None
    ) -> None:
        before = before or alert.state
        alert.state = state
        alert.updated_at = now
        await self.store.save_alert(alert, (before, state, note))
        log.info("alert %s: %s -> %s (value %s)", alert.rule, before, state, alert.value)
        if self.publish is not None:
            self.publish(
                {"type": "alert", "transition": {"from": before, "to": state}, "alert": self.view(alert)}
            )

    # --- reading --------------------------------------------------------------------------------
    def view(self, alert: Alert) -> dict[str, Any]:
        out = alert.to_json(silenced_by(self.silences, alert.labels, self.clock()))
        inhibited = []
        if alert.state == "firing":
            inhibited = inhibited_by(self.settings.inhibit_rules, alert.labels, self.current.values())
        out["inhibited_by"] = inhibited
        return out

    def active(self) -> list[dict[str, Any]]:
        return [self.view(a) for a in sorted(self.current.values(), key=lambda a: a.active_at)]

    def summary(self) -> dict[str, Any]:
        """The live message's alerts section: counts and the active alerts."""
        alerts = self.active()
        return {
            "firing": sum(a["state"] == "firing" for a in alerts),
            "pending": sum(a["state"] == "pending" for a in alerts),
            "active": alerts,
        }

    def rules_data(self) -> list[dict[str, Any]]:
        """The rules in force as plain data (the API, `iros export prometheus-rules`)."""
        return rules_as_data(self.rules)

    async def set_rules(self, rules: Sequence[AlertRuleSettings] | None, who: str) -> None:
        """Replace the configured rules (None: back to the configuration's); persisted for restarts."""
        self.rules = build_rules(self.settings, self.targets, rules, self.configured)
        self.rules_source = "api" if rules is not None else "config"
        if rules is None:
            await self.store.clear_rules()
            self._rules_stamp = None
        else:
            now = self.clock()
            await self.store.save_rules([r.model_dump(mode="json") for r in rules], who, now)
            self._rules_stamp = now
