"""Notification channels, one module each: email (SMTP), Slack (incoming webhook), webhook (the
Alertmanager webhook payload, version 4) and alertmanager (its API v2).

channels = build_channels(settings.alerting.channels)     # name -> Channel; secrets read from the env
await channels["ops-hook"].send(notification)             # raises ChannelError(retryable=...)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import aiohttp
from pydantic import SecretStr

from iros.alerting.channels.base import Channel, ChannelError, Notification
from iros.config import ChannelSettings, ConfigError

__all__ = [
    "HttpChannel",
    "build_channel",
    "build_channels",
    "describe",
    "from_env",
    "post_json",
    "secret_url",
    "subject",
    "text_body",
]


def from_env(variable: str, what: str) -> str:
    value = os.environ.get(variable)
    if not value:
        raise ConfigError(f"{what}: environment variable {variable} is not set")
    return value


def secret_url(variable: str | None, value: SecretStr | None, what: str) -> str:
    """A URL that may hold a secret: from the environment variable when one is named, else the config."""
    if variable:
        return from_env(variable, what)
    assert value is not None
    return value.get_secret_value()


def build_channel(settings: ChannelSettings) -> Channel:
    config = settings.typed()
    if settings.type == "email":
        from iros.alerting.channels.email import EmailChannel

        return EmailChannel(settings.name, config)
    if settings.type == "slack":
        from iros.alerting.channels.slack import SlackChannel

        return SlackChannel(settings.name, config)
    if settings.type == "webhook":
        from iros.alerting.channels.webhook import WebhookChannel

        return WebhookChannel(settings.name, config)
    from iros.alerting.channels.alertmanager import AlertmanagerChannel

    return AlertmanagerChannel(settings.name, config)


def build_channels(settings: Sequence[ChannelSettings]) -> dict[str, Channel]:
    return {s.name: build_channel(s) for s in settings}


def describe(channel: Channel) -> dict[str, Any]:
    return {"name": channel.name, "type": channel.type, **channel.describe()}


def subject(n: Notification) -> str:
    firing = [a for a in n.alerts if a["am"]["status"] == "firing"]
    resolved = len(n.alerts) - len(firing)
    if n.test:
        return f"test notification from Iros ({n.receiver})"
    names = ", ".join(dict.fromkeys(a["rule"] for a in n.alerts))
    parts = []
    if firing:
        parts.append(f"FIRING:{len(firing)}")
    if resolved:
        parts.append(f"RESOLVED:{resolved}")
    severity = max((a["severity"] for a in n.alerts), key=lambda s: _SEVERITY_ORDER.get(s, 0), default="info")
    return f"[{' '.join(parts)}] [{severity}] {names}"


_SEVERITY_ORDER = {"info": 0, "warning": 1, "critical": 2}


def text_body(n: Notification) -> str:
    """Plain text: one paragraph per alert."""
    if n.test:
        return f"This is a test notification from Iros to channel {n.receiver!r}. Delivery works.\n"
    lines = []
    for a in n.alerts:
        am = a["am"]
        lines.append(f"{am['status'].upper()} {a['rule']} ({a['severity']})")
        lines.append(f"  {a['annotations'].get('summary', '')}")
        if a["annotations"].get("description"):
            lines.append(f"  {a['annotations']['description']}")
        lines.append(f"  value: {a['value']}")
        lines.append(f"  since: {a['fired_at'] or a['active_at']}")
        if a.get("resolved_at"):
            lines.append(f"  resolved: {a['resolved_at']}")
        lines.append(f"  alert id: {a['id']}")
        lines.append("")
    if n.external_url:
        lines.append(f"Active alerts: {n.external_url.rstrip('/')}/api/alerts/active")
    return "\n".join(lines) + "\n"


async def post_json(
    session: aiohttp.ClientSession,
    url: str,
    payload: Any,
    timeout: float,  # noqa: ASYNC109 - aiohttp's own timeout, so the connection is cleaned up
    headers: dict[str, str] | None = None,
) -> None:
    """POST JSON; raise ChannelError with a message that never contains the URL (it may be a secret)."""
    try:
        async with session.post(
            url, json=payload, timeout=aiohttp.ClientTimeout(total=timeout), headers=headers
        ) as resp:
            if resp.status >= 300:
                detail = (await resp.text())[:200]
                retryable = resp.status >= 500 or resp.status in (408, 429)
                raise ChannelError(f"the receiver answered HTTP {resp.status}: {detail}", retryable)
    except TimeoutError:
        raise ChannelError(f"no answer within {timeout:g}s") from None
    except aiohttp.ClientError as exc:
        raise ChannelError(f"could not reach the receiver ({type(exc).__name__})") from None


class HttpChannel:
    """Base of the channels that POST JSON (Slack, webhook, Alertmanager): one aiohttp session, opened
    on the first send; an optional bearer token read from the environment.

    await self._post(url, body, self.config.timeout_seconds)
    """

    def __init__(self, name: str, bearer_token_env: str | None = None) -> None:
        self.name = name
        self._headers: dict[str, str] = {}
        if bearer_token_env:
            self._headers["authorization"] = f"Bearer {from_env(bearer_token_env, f'channel {name}')}"
        self._session: aiohttp.ClientSession | None = None

    async def _post(self, url: str, body: Any, timeout: float) -> None:  # noqa: ASYNC109 - see post_json
        if self._session is None:
            self._session = aiohttp.ClientSession()
        await post_json(self._session, url, body, timeout, self._headers)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
