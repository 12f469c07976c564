"""The alert engine: evaluates every rule each interval and moves its alert through
inactive -> pending -> firing -> resolved, with Prometheus's `for` (a rule's `duration`), hysteresis and
keep_firing_for against flapping, and notifications through the durable outbox.

engine = AlertEngine.build(settings, monitor)          # rules, store, channels, live source
await engine.start(); ...; await engine.close()
await engine.evaluate(now)                             # one evaluation (tests drive the clock)
engine.active()                                        # pending and firing alerts, as JSON

With several workers (and replicas) one evaluates: the holder of the shared lease (iros/state/lease.py).
Its every save goes out on the shared "alerts" log, fenced by its lease token, and so do acknowledgements
and silences made on any worker: the others copy them into their own store (Redis: one store per replica)
or read the shared one again (local), so history and acknowledgements are the same whichever answers.
Only the leader queues and sends notifications, and only after asking the lease it still holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

from iros.alerting.channels.base import Channel
from iros.alerting.notify import Notifier, inhibited_by, silenced_by
from iros.alerting.rules import Rule, build_rules, configured_rules, rules_as_data
from iros.alerting.store import Alert, AlertStore, Silence
from iros.conditions.parse import LiveSource, Source
from iros.config import AlertingSettings, AlertRuleSettings, Settings, Target
from iros.core.periodic import cancel_all
from iros.metrics.monitor import Monitor
from iros.state.base import StateUnavailable
from iros.state.lease import Leadership
from iros.state.sync import SharedState

log = logging.getLogger("iros.alerts")

RETENTION_CHECK_SECONDS = 3600.0
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
CHANNEL = "alerts"  # the shared log of saves, acknowledgements and silences


class LostLease(Exception):
    """This worker is no longer the evaluator: what it was about to do is another worker's now."""


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
        configured: Sequence[AlertRuleSettings] | None = None,
        *,
        leadership: Leadership | None = None,
        shared: SharedState | None = None,
    ) -> None:
        self.settings = settings
        self.targets = targets
        self.source = source
        self.store = store
        self.clock = clock
        self.publish = publish
        self.leadership = leadership
        self.shared = shared
        self.configured = list(configured) if configured is not None else list(settings.alert_rules)
        self.rules: list[Rule] = build_rules(settings, targets, configured=self.configured)
        self.rules_source = "config"
        self.notifier = Notifier(store, channels, settings, clock)
        self.current: dict[str, Alert] = {}  # rule name -> its pending or firing alert
        self.silences: list[Silence] = []
        self.evaluations = 0
        self.last_evaluation: float | None = None
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._retention_at = 0.0
        self._rules_stamp: float | None = None
        self._given: list[dict[str, Any]] | None = None  # the API-set rules as sent
        if leadership is not None:
            self.notifier.may_send = leadership.still_held
            leadership.on_change(self._leadership_changed)
        if shared is not None:
            shared.register("alert_rules", self._rules_doc, self._apply_rules_doc)
            shared.follow(CHANNEL, self._apply_events, from_start=not shared.backend.shared_files)

    @classmethod
    def build(
        cls,
        settings: Settings,
        monitor: Monitor,
        clock: Callable[[], float] = time.time,
        *,
        leadership: Leadership | None = None,
        shared: SharedState | None = None,
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
            configured_rules(settings),
            leadership=leadership,
            shared=shared,
        )

    # --- lifecycle ------------------------------------------------------------------------------
    @property
    def leader(self) -> bool:
        return self.leadership is None or self.leadership.leader

    async def start(self, background: bool = True) -> None:
        await self.store.start()
        await self._sync_rules()
        await self._load()
        if background:
            self.notifier.start()  # sends only while this worker leads (notifier.may_send)
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        await cancel_all([self._task])
        await self.notifier.close()
        await self.store.close()

    def _leadership_changed(self, leader: bool) -> None:
        if leader:
            self._wake.set()  # evaluate now: a takeover should not wait a whole interval

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
            self._given = saved[0]
        except Exception as exc:  # rules saved by another version that no longer validate
            log.error("rules saved through the API no longer load (%s); using the configured ones", exc)

    async def _load(self) -> None:
        """State as the store has it: a restart picks up pending and firing alerts where they were."""
        now = self.clock()
        self.current = {a.rule: a for a in await self.store.alerts(("pending", "firing"))}
        self.silences = await self.store.silences(now)

    async def _run(self) -> None:
        led = False
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that lands
            # as the wait ends, and close() would wait for this task for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.evaluation_interval_seconds):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._sync_rules()
                if self.leader:
                    if not led:
                        # As the last leader left it: its latest saves first, so that an alert it
                        # has just announced is not announced again from here.
                        if self.shared is not None:
                            with contextlib.suppress(StateUnavailable):
                                await self.shared.sync()
                        await self._load()
                    led = True
                    await self.evaluate(self.clock())
                else:
                    led = False
                    await self._load()
                self.last_error = None
            except LostLease:
                log.info("alert evaluation stopped: another worker evaluates now")
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
            await self._save(alert)
            return None
        # firing
        if not active and now - (alert.last_true_at or now) >= rule.keep_firing_for:
            del self.current[rule.name]
            alert.value = value
            alert.resolved_at = now
            await self._move(alert, "resolved", now, None)
            await self._notify(alert, rule, "resolved", now, self.silences)
            await self._save(alert)
            return ("firing", "resolved")
        if not silenced_by(self.silences, alert.labels, now):
            repeats = self.notifier.due_repeats(alert, rule, now)
            if repeats:
                await self._notify(alert, rule, "firing", now, self.silences, self.current.values())
        alert.updated_at = now
        await self._save(alert)
        return None

    async def _fire(self, alert: Alert, rule: Rule, now: float, before: str) -> None:
        alert.fired_at = now
        alert.state = "firing"
        queued = await self._notify(alert, rule, "firing", now, self.silences, self.current.values())
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
        await self._save(alert, (before, state, note))
        log.info("alert %s: %s -> %s (value %s)", alert.rule, before, state, alert.value)
        if self.publish is not None:
            self.publish(
                {"type": "alert", "transition": {"from": before, "to": state}, "alert": self.view(alert)}
            )

    # --- sharing ---------------------------------------------------------------------------------
    async def _save(self, alert: Alert, transition: tuple[str, str, str | None] | None = None) -> None:
        """Save here, and for every other worker: fenced, so a replaced leader's saves go nowhere."""
        if self.shared is not None and self.leadership is not None:
            entry = {"kind": "alert", "alert": asdict(alert), "transition": transition}
            body = orjson.dumps({"by": self.shared.worker, **entry})
            if not await self.leadership.append(CHANNEL, body) and not await self.leadership.still_held():
                raise LostLease(alert.rule)
        await self.store.save_alert(alert, transition)

    async def _notify(self, *args: Any) -> list[str]:
        # Asked of the lease itself: a leader paused past its lease must not queue what the next one will.
        if self.leadership is not None and not await self.leadership.still_held():
            raise LostLease(args[0].rule)
        return await self.notifier.notify(*args)

    async def _event(self, entry: dict[str, Any]) -> None:
        if self.shared is not None:
            await self.shared.append(CHANNEL, entry)

    async def _apply_events(self, entries: list[dict[str, Any]]) -> None:
        """What other workers saved, acknowledged or silenced: into this worker's store (unless it is the
        same file), then into what it shows."""
        if self.shared is not None and not self.shared.backend.shared_files:
            for e in entries:
                kind = e.get("kind")
                if kind == "alert" and not self.leader:
                    transition = e.get("transition")
                    await self.store.save_alert(
                        Alert(**e["alert"]), tuple(transition) if transition else None
                    )
                elif kind == "ack":
                    await self.store.acknowledge(e["id"], e["who"], e["comment"], e["at"])
                elif kind == "silence":
                    await self.store.add_silence(Silence(**e["silence"]))
                elif kind == "expire":
                    await self.store.expire_silence(e["id"], e["at"])
        if self.leader:
            self.silences = await self.store.silences(self.clock())
            acks = await self.store.acks([a.id for a in self.current.values()])
            for alert in self.current.values():
                if alert.id in acks:
                    alert.acked_by, alert.ack_comment, alert.acked_at = acks[alert.id]
        else:
            await self._load()

    async def acknowledge(self, alert_id: str, who: str, comment: str) -> bool:
        now = self.clock()
        if not await self.store.acknowledge(alert_id, who, comment, now):
            return False
        current = next((a for a in self.current.values() if a.id == alert_id), None)
        if current is not None:
            current.acked_by, current.ack_comment, current.acked_at = who, comment, now
        await self._event({"kind": "ack", "id": alert_id, "who": who, "comment": comment, "at": now})
        return True

    async def add_silence(self, silence: Silence) -> None:
        await self.store.add_silence(silence)
        self.silences.append(silence)
        await self._event({"kind": "silence", "silence": asdict(silence)})

    async def expire_silence(self, silence_id: str) -> bool:
        now = self.clock()
        if not await self.store.expire_silence(silence_id, now):
            return False
        self.silences = [s for s in self.silences if s.id != silence_id]
        await self._event({"kind": "expire", "id": silence_id, "at": now})
        return True

    def _rules_doc(self) -> dict[str, Any]:
        given = None if self.rules_source != "api" else self._given
        return {"rules": given}

    async def _apply_rules_doc(self, body: dict[str, Any]) -> None:
        given = body.get("rules")
        try:
            rules = None if given is None else [AlertRuleSettings.model_validate(r) for r in given]
        except Exception as exc:  # saved by another version that no longer validates
            log.error("shared alert rules do not load here (%s); keeping the rules in force", exc)
            return
        assert self.shared is not None  # registered only with shared state
        await self.set_rules(rules, "shared", publish=False, persist=not self.shared.backend.shared_files)

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

    async def set_rules(
        self,
        rules: Sequence[AlertRuleSettings] | None,
        who: str,
        *,
        publish: bool = True,
        persist: bool = True,
    ) -> None:
        """Replace the configured rules (None: back to the configuration's); persisted for restarts and
        sent to every other worker."""
        self.rules = build_rules(self.settings, self.targets, rules, self.configured)
        self.rules_source = "api" if rules is not None else "config"
        self._given = None if rules is None else [r.model_dump(mode="json") for r in rules]
        if persist and rules is None:
            await self.store.clear_rules()
            self._rules_stamp = None
        elif persist and self._given is not None:
            now = self.clock()
            await self.store.save_rules(self._given, who, now)
            self._rules_stamp = now
        if publish and self.shared is not None:
            await self.shared.publish("alert_rules")
