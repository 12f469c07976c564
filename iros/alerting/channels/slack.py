"""Slack through an incoming webhook: one message per notification, one attachment per alert.

channel = SlackChannel("slack", SlackChannelConfig(webhook_url_env="SLACK_WEBHOOK_URL", channel="#ops"))
"""

from __future__ import annotations

from typing import Any

from iros.alerting.channels import HttpChannel, secret_url, subject
from iros.alerting.channels.base import Notification
from iros.config import SlackChannelConfig

COLORS = {"resolved": "#2eb886", "critical": "#d40e0d", "warning": "#daa038", "info": "#439fe0"}


def payload(n: Notification, channel: str | None, username: str | None) -> dict[str, Any]:
    attachments = []
    for a in n.alerts:
        status = a["am"]["status"]
        attachments.append(
            {
                "color": COLORS["resolved" if status == "resolved" else a["severity"]],
                "title": f"{status.upper()}: {a['rule']} ({a['severity']})",
                "text": a["annotations"].get("summary", ""),
                "fields": [
                    {"title": "value", "value": str(a["value"]), "short": True},
                    {"title": "since", "value": str(a["fired_at"] or a["active_at"]), "short": True},
                    {"title": "alert id", "value": a["id"], "short": False},
                ],
                "footer": "Iros",
            }
        )
    body: dict[str, Any] = {"text": subject(n), "attachments": attachments}
    if n.test:
        body["text"] = f"Test notification from Iros to {n.receiver}: delivery works."
    if channel:
        body["channel"] = channel
    if username:
        body["username"] = username
    return body


class SlackChannel(HttpChannel):
    type = "slack"

    def __init__(self, name: str, config: SlackChannelConfig) -> None:
        super().__init__(name)
        self.config = config
        self._url = secret_url(config.webhook_url_env, config.webhook_url, f"channel {name}")

    async def send(self, notification: Notification) -> None:
        body = payload(notification, self.config.channel, self.config.username)
        await self._post(self._url, body, self.config.timeout_seconds)

    def describe(self) -> dict[str, Any]:
        return {
            "webhook_url": "***",
            "webhook_url_env": self.config.webhook_url_env,
            "channel": self.config.channel,
        }
