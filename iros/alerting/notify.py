"""Notifications: alerts to the durable outbox, the outbox to channels, off the request path.

notifier = Notifier(store, channels, settings.alerting, clock=time.time)
await notifier.notify(alert, rule, "firing", now)    # accepted: written to SQLite before anything else
notifier.start(); ...; await notifier.close()        # one worker task per channel; retries with backoff

Grouping as Alertmanager's: items due together for one channel with the same group labels (group_by)
go out as one message; `group_wait_seconds` holds a new firing alert back so others can join it.
A notification is marked sent only after the channel took it, so a restart re-sends what was pending
(at least once: a crash between the receiver's answer and the mark may repeat one message).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from iros.alerting.channels.base import Channel, ChannelError, Notification
from iros.alerting.rules import Rule
from iros.alerting.store import Alert, AlertStore, OutboxItem, Silence
from iros.alerting.wire import am_alert
from iros.config import AlertingSettings, InhibitRule
from iros.core.periodic import cancel_all
from iros.core.timefmt import parse_duration

log = logging.getLogger("iros.alerts")

POLL_SECONDS = 0.25


def silenced_by(silences: Sequence[Silence], labels: dict[str, str], now: float) -> list[str]:
    return [s.id for s in silences if s.matches(labels, now)]


def inhibited_by(rules: Sequence[InhibitRule], labels: dict[str, str], firing: Iterable[Alert]) -> list[str]:
    """Ids of firing alerts that inhibit one with `labels` (Alertmanager's inhibit_rules)."""
    out = []
    for rule in rules:
        if not all(labels.get(k) == v for k, v in rule.target_matchers.items()):
            continue
        if any(labels.get(k) is None for k in rule.equal):
            continue  # an alert without the shared labels is not the same thing's
        for source in firing:
            if source.labels is labels or source.state != "firing":
                continue
            if all(source.labels.get(k) == v for k, v in rule.source_matchers.items()) and all(
                source.labels.get(k) == labels[k] for k in rule.equal
            ):
                out.append(source.id)
    return out


class Notifier:
    def __init__(
        self,
        store: AlertStore,
        channels: dict[str, Channel],
        settings: AlertingSettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.channels = channels
        self.settings = settings
        self.clock = clock
        by_name = {c.name: c for c in settings.channels}
        self.send_resolved = {
            n: by_name[n].send_resolved if n in by_name and by_name[n].send_resolved is not None
            else settings.send_resolved
            for n in channels
        }  # fmt: skip
        default_repeat = parse_duration(settings.repeat_interval)
        self.repeat: dict[str, float] = {}
        # An Alertmanager acknowledges, groups and repeats by itself: it is kept up to date instead.
        self.mirrors = {n for n, c in channels.items() if c.type == "alertmanager"}
        for n in channels:
            s = by_name.get(n)
            if s is not None and s.repeat_interval is not None:
                self.repeat[n] = parse_duration(s.repeat_interval)
            elif n in self.mirrors and s is not None:
                self.repeat[n] = parse_duration(s.typed().resend_interval)
            else:
                self.repeat[n] = default_repeat
        self.sent: dict[str, int] = dict.fromkeys(channels, 0)
        self.failed: dict[str, int] = dict.fromkeys(channels, 0)
        self.last_error: dict[str, str | None] = dict.fromkeys(channels)
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # Asked before each send with items due: with several workers, only the evaluator's says yes
        # (checked against the shared lease itself, so a paused old leader sends nothing).
        self.may_send: Callable[[], Awaitable[bool]] | None = None

    def group_key(self, channel: str, alert: Alert) -> tuple[str, dict[str, str]]:
        labels = {k: alert.labels[k] for k in self.settings.group_by if k in alert.labels}
        return f"{channel}:{{}}/{{{','.join(f'{k}={v!r}' for k, v in sorted(labels.items()))}}}", labels

    async def notify(
        self,
        alert: Alert,
        rule: Rule,
        status: str,
        now: float,
        silences: Sequence[Silence] = (),
        firing: Iterable[Alert] = (),
    ) -> list[str]:
        """Queue `status` (firing | resolved) for the rule's channels; returns the channels queued.

        Silenced and inhibited alerts are not queued; a resolution goes only where the firing went.
        """
        if silenced_by(silences, alert.labels, now):
            return []
        if status == "firing" and inhibited_by(self.settings.inhibit_rules, alert.labels, firing):
            return []
        targets = [c for c in rule.channels if c in self.channels]
        if status == "resolved":
            targets = [c for c in targets if c in alert.notified and self.send_resolved[c]]
        if not targets:
            return []
        wait = self.settings.group_wait_seconds if status == "firing" and not alert.notified else 0.0
        snapshot = self.snapshot(alert, rule)
        items = [
            OutboxItem(c, self.group_key(c, alert)[0], alert.id, status, snapshot, now + wait)
            for c in targets
        ]
        await self.store.enqueue(items, now)
        for c in targets:
            alert.notified[c] = now
        self._wake.set()
        return targets

    def due_repeats(self, alert: Alert, rule: Rule, now: float) -> list[str]:
        """Channels owed a reminder of a firing alert: repeat interval passed, not acknowledged (an
        Alertmanager is re-sent to regardless: it resolves an alert it stops hearing about)."""
        return [
            c
            for c in rule.channels
            if c in self.channels
            and (alert.acked_by is None or c in self.mirrors)
            and now - alert.notified.get(c, -float("inf")) >= self.repeat[c]
        ]

    def snapshot(self, alert: Alert, rule: Rule) -> dict[str, Any]:
        data = alert.to_json()
        base = (self.settings.external_url or "").rstrip("/")
        data["am"] = am_alert(alert, None, f"{base}/api/alerts/{alert.id}" if base else "")
        if self.mirrors and alert.state != "resolved":
            # What an Alertmanager is told: resolve it yourself if Iros stops re-sending (as Prometheus does).
            data["am_ends_at"] = self.clock() + 4 * max(self.repeat[c] for c in self.mirrors)
        return data

    # --- delivery -------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        await cancel_all((self._task, *self._workers.values()))
        for channel in self.channels.values():
            with contextlib.suppress(Exception):
                await channel.aclose()

    async def _run(self) -> None:
        while True:
            try:
                await self.dispatch()
            except Exception:
                log.exception("alert dispatch failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):  # asyncio.timeout: see AlertEngine._run
                async with asyncio.timeout(POLL_SECONDS):
                    await self._wake.wait()

    async def dispatch(self, wait: bool = False) -> None:
        """Start a send for each channel with due items and no send in progress (`wait`: finish them)."""
        now = self.clock()
        due = await self.store.due(now)
        if due and self.may_send is not None and not await self.may_send():
            return
        by_channel: dict[str, list[OutboxItem]] = {}
        for item in due:
            by_channel.setdefault(item.channel, []).append(item)
        started = []
        for channel, items in by_channel.items():
            busy = self._workers.get(channel)
            if busy is not None and not busy.done():
                continue
            task = asyncio.create_task(self._deliver(channel, items))
            self._workers[channel] = task
            started.append(task)
        if wait and started:
            await asyncio.gather(*started)

    async def _deliver(self, channel_name: str, items: list[OutboxItem]) -> None:
        channel = self.channels.get(channel_name)
        if channel is None:
            await self.store.mark_failed([i.id for i in items], "channel no longer configured", None)
            return
        groups: dict[str, list[OutboxItem]] = {}
        for item in items:
            groups.setdefault(item.group_key, []).append(item)
        for key, group in groups.items():
            # One alert once per message: the newest state of each.
            latest: dict[str, OutboxItem] = {}
            for item in group:
                latest[item.alert_id] = item
            alerts = [i.alert for i in latest.values()]
            status = "firing" if any(i.status == "firing" for i in latest.values()) else "resolved"
            labels = {k: alerts[0]["labels"][k] for k in self.settings.group_by if k in alerts[0]["labels"]}
            note = Notification(channel_name, status, key, labels, alerts, self.settings.external_url or "")
            ids = [i.id for i in group]
            try:
                await channel.send(note)
            except ChannelError as exc:
                await self._failed(channel_name, ids, max(i.attempts for i in group), exc)
                continue
            except Exception as exc:  # a bug in a channel must not stop the others
                log.exception("channel %s raised", channel_name)
                await self._failed(channel_name, ids, max(i.attempts for i in group), ChannelError(str(exc)))
                continue
            self.sent[channel_name] += 1
            self.last_error[channel_name] = None
            await self.store.mark_sent(ids, self.clock())

    async def _failed(self, channel: str, ids: list[int], attempts: int, exc: ChannelError) -> None:
        retry = self.settings.retry
        self.failed[channel] += 1
        self.last_error[channel] = str(exc)
        if exc.retryable and attempts + 1 < retry.max_attempts:
            delay = min(retry.max_backoff_seconds, retry.backoff_seconds * 2**attempts)
            log.warning("channel %s: %s; retry %d in %.1fs", channel, exc, attempts + 1, delay)
            await self.store.mark_failed(ids, str(exc), self.clock() + delay)
        else:
            log.error("channel %s: %s; notification dropped after %d attempts", channel, exc, attempts + 1)
            await self.store.mark_failed(ids, str(exc), None)

    async def test(self, channel_name: str) -> None:
        """Send a test message now, straight to the channel (not through the outbox). Raises ChannelError."""
        channel = self.channels[channel_name]
        note = Notification(channel_name, "firing", f"{channel_name}:test", {}, [], "", test=True)
        await channel.send(note)

    def stats(self) -> dict[str, dict[str, Any]]:
        return {
            n: {"sent": self.sent[n], "failed_attempts": self.failed[n], "last_error": self.last_error[n]}
            for n in self.channels
        }
