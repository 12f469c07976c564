"""What every notification channel is, and the one message it delivers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(slots=True)
class Notification:
    """One message to one channel: a group of alerts that changed together (Alertmanager's model).

    Each alert is Alert.to_json() plus "am": the alert as Alertmanager shows it.
    """

    receiver: str  # the channel's name
    status: str  # "firing" if any alert in it fires, else "resolved"
    group_key: str
    group_labels: dict[str, str]
    alerts: list[dict[str, Any]]
    external_url: str = ""
    test: bool = False


class ChannelError(Exception):
    """A channel could not deliver; `retryable` says whether trying again later may work."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class Channel(Protocol):
    """Delivers alert notifications: email, Slack, a webhook, an Alertmanager. Raises ChannelError.

    Secrets (passwords, webhook URLs) are read from the environment when the channel is built and never
    appear in `describe()`, errors or logs.
    """

    name: str
    type: str

    async def send(self, notification: Notification) -> None: ...

    def describe(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...
