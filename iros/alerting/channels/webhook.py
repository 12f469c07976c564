"""The generic webhook: Alertmanager's webhook payload (version 4), so any Alertmanager receiver works.

channel = WebhookChannel("ops-hook", WebhookChannelConfig(url="http://127.0.0.1:9300/alerts"))
"""

from __future__ import annotations

from typing import Any

from iros.alerting.channels import HttpChannel, secret_url
from iros.alerting.channels.base import Notification
from iros.config import WebhookChannelConfig


def payload(n: Notification, max_alerts: int = 0) -> dict[str, Any]:
    alerts = [a["am"] for a in n.alerts]
    kept = alerts[:max_alerts] if max_alerts else alerts
    labels = [a["labels"] for a in alerts]
    annotations = [a["annotations"] for a in alerts]
    return {
        "version": "4",
        "groupKey": n.group_key,
        "truncatedAlerts": len(alerts) - len(kept),
        "status": n.status,
        "receiver": n.receiver,
        "groupLabels": n.group_labels,
        "commonLabels": _common(labels),
        "commonAnnotations": _common(annotations),
        "externalURL": n.external_url,
        "alerts": kept,
    }


def _common(items: list[dict[str, str]]) -> dict[str, str]:
    if not items:
        return {}
    first = items[0]
    return {k: v for k, v in first.items() if all(i.get(k) == v for i in items[1:])}


class WebhookChannel(HttpChannel):
    type = "webhook"

    def __init__(self, name: str, config: WebhookChannelConfig) -> None:
        super().__init__(name, config.bearer_token_env)
        self.config = config
        self._url = secret_url(config.url_env, config.url, f"channel {name}")

    async def send(self, notification: Notification) -> None:
        body = payload(notification, self.config.max_alerts)
        await self._post(self._url, body, self.config.timeout_seconds)

    def describe(self) -> dict[str, Any]:
        return {"url": "***", "url_env": self.config.url_env, "max_alerts": self.config.max_alerts}
