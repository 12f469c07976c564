"""Forwarding to an Alertmanager: POST <url>/api/v2/alerts, which then groups, routes and silences.

channel = AlertmanagerChannel("am", AlertmanagerChannelConfig(url="http://127.0.0.1:9093"))
A firing alert is sent with endsAt four resend intervals ahead and re-sent every resend_interval
(default 1m, acknowledged or not), as Prometheus does, so an Alertmanager that stops hearing from Iros
resolves it by itself; acknowledging and silencing there is the Alertmanager's own business.
"""

from __future__ import annotations

from typing import Any

from iros.alerting.channels import HttpChannel
from iros.alerting.channels.base import Notification
from iros.config import AlertmanagerChannelConfig
from iros.core.redact import redact_url
from iros.core.timefmt import iso


def payload(n: Notification) -> list[dict[str, Any]]:
    out = []
    for a in n.alerts:
        am = a["am"]
        item = {
            "labels": am["labels"],
            "annotations": am["annotations"],
            "startsAt": am["startsAt"],
            "generatorURL": am["generatorURL"],
        }
        if am["status"] == "resolved":
            item["endsAt"] = am["endsAt"]
        elif a.get("am_ends_at"):
            item["endsAt"] = iso(a["am_ends_at"])
        out.append(item)
    return out


class AlertmanagerChannel(HttpChannel):
    type = "alertmanager"

    def __init__(self, name: str, config: AlertmanagerChannelConfig) -> None:
        super().__init__(name, config.bearer_token_env)
        self.config = config

    async def send(self, notification: Notification) -> None:
        url = f"{self.config.url}/api/v2/alerts"
        await self._post(url, payload(notification), self.config.timeout_seconds)

    def describe(self) -> dict[str, Any]:
        return {"url": redact_url(self.config.url)}
