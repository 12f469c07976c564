"""The seed's Live Alerting and Alerting and Notifications blocks: channels, rules, retries, inhibitions.

A rule's condition is checked where the condition language lives: at assembly (iros.app.check_settings)
for the config file, and by iros.alerting.rules.parse_rules for rules set through the API.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from iros.config.base import Duration, Strict


class EmailChannelConfig(Strict):
    smtp_server: str = Field(description="host:port (port 25 when omitted)")
    recipients: list[str] = Field(min_length=1, max_length=100)
    sender: str = "iros@localhost"
    tls: Literal["none", "starttls", "tls"] = Field(
        "none", description="starttls upgrades; tls from the start"
    )
    username: str | None = None
    password_env: str | None = Field(None, description="environment variable holding the SMTP password")
    validate_certs: bool = True
    timeout_seconds: float = Field(10.0, gt=0)
    subject_prefix: str = "[iros]"


class SlackChannelConfig(Strict):
    webhook_url_env: str | None = Field(None, description="environment variable holding the incoming webhook")
    webhook_url: SecretStr | None = Field(None, description="the webhook itself; prefer webhook_url_env")
    channel: str | None = None
    username: str | None = None
    timeout_seconds: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _one_url(self) -> SlackChannelConfig:
        if bool(self.webhook_url_env) == bool(self.webhook_url):
            raise ValueError("give exactly one of webhook_url_env or webhook_url")
        return self


class WebhookChannelConfig(Strict):
    url: SecretStr | None = Field(None, description="receiver URL (Alertmanager webhook payload, version 4)")
    url_env: str | None = Field(None, description="environment variable holding the URL")
    bearer_token_env: str | None = None
    max_alerts: int = Field(
        0, ge=0, description="alerts per message, 0 = all (the rest counted as truncated)"
    )
    timeout_seconds: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _one_url(self) -> WebhookChannelConfig:
        if bool(self.url) == bool(self.url_env):
            raise ValueError("give exactly one of url or url_env")
        return self


class AlertmanagerChannelConfig(Strict):
    url: str = Field(description="Alertmanager base URL; alerts are POSTed to <url>/api/v2/alerts")
    bearer_token_env: str | None = None
    resend_interval: Duration = Field(
        "1m", description="firing alerts are re-sent this often (acknowledged or not), as Prometheus does"
    )
    timeout_seconds: float = Field(10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return value.rstrip("/")


CHANNEL_CONFIGS: dict[str, type[Strict]] = {
    "email": EmailChannelConfig,
    "slack": SlackChannelConfig,
    "webhook": WebhookChannelConfig,
    "alertmanager": AlertmanagerChannelConfig,
}


class ChannelSettings(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    type: Literal["email", "slack", "webhook", "alertmanager"]
    config: dict[str, Any] = Field(default_factory=dict)
    send_resolved: bool | None = Field(None, description="default: alerting.send_resolved")
    repeat_interval: Duration | None = Field(None, description="default: alerting.repeat_interval")

    @model_validator(mode="after")
    def _typed_config(self) -> ChannelSettings:
        self.config = dict(CHANNEL_CONFIGS[self.type].model_validate(self.config))
        return self

    def typed(self) -> Any:
        return CHANNEL_CONFIGS[self.type].model_validate(self.config)


Severity = Literal["info", "warning", "critical"]


class AlertRuleSettings(Strict):
    """One rule in the seed's shape; `duration` is Prometheus's `for`."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]*$")
    condition: str = Field(min_length=1, max_length=1000)
    duration: Duration = "0s"
    severity: Severity = "warning"
    channels: list[str] | None = Field(None, description="default: alerting.default_channels")
    labels: dict[str, str] = Field(default_factory=dict, max_length=20)
    description: str | None = Field(None, max_length=1000)
    keep_firing_for: Duration | None = Field(None, description="default: alerting.keep_firing_for")
    hysteresis: float | None = Field(None, ge=0, lt=1, description="default: alerting.hysteresis")
    enabled: bool = True


class AlertRetrySettings(Strict):
    max_attempts: int = Field(8, ge=1, le=100, description="sends of one notification before it is dropped")
    backoff_seconds: float = Field(1.0, gt=0)
    max_backoff_seconds: float = Field(300.0, gt=0)


class InhibitRule(Strict):
    """While an alert matching `source_matchers` fires, alerts matching `target_matchers` with the same
    `equal` labels notify no one (the default: a critical target rule silences its own warning)."""

    source_matchers: dict[str, str] = Field(default_factory=lambda: {"severity": "critical"})
    target_matchers: dict[str, str] = Field(default_factory=lambda: {"severity": "warning"})
    equal: list[str] = Field(default_factory=lambda: ["kpi"])


class AlertingSettings(Strict):
    enabled: bool = True
    evaluation_interval_seconds: float = Field(15.0, gt=0, le=3600)
    kpi_window_seconds: float = Field(60.0, gt=0, le=300, description="window of bare KPIs in conditions")
    channels: list[ChannelSettings] = Field(default_factory=list, max_length=50)
    alert_rules: list[AlertRuleSettings] = Field(default_factory=list, max_length=500)
    target_rules: bool = Field(True, description="derive warning/critical rules from performance_targets")
    target_rule_duration: Duration = "2m"
    default_channels: list[str] | None = Field(None, description="channels of rules naming none; default all")
    group_by: list[str] = Field(default_factory=lambda: ["alertname"], max_length=10)
    group_wait_seconds: float = Field(0.0, ge=0, le=3600, description="first message of a group waits this")
    repeat_interval: Duration = "4h"
    send_resolved: bool = True
    keep_firing_for: Duration = "0s"
    hysteresis: float = Field(
        0.0, ge=0, lt=1, description="share of a threshold a value must clear to resolve"
    )
    retry: AlertRetrySettings = Field(default_factory=AlertRetrySettings)
    history_retention_days: float = Field(30.0, gt=0)
    external_url: str | None = Field(None, description="this Iros as people reach it, for links in messages")
    inhibit_rules: list[InhibitRule] = Field(
        default_factory=lambda: [InhibitRule()], max_length=20, description="as Alertmanager's"
    )

    @model_validator(mode="after")
    def _names_resolve(self) -> AlertingSettings:
        channels = [c.name for c in self.channels]
        if len(set(channels)) != len(channels):
            raise ValueError(f"channel names must be unique: {channels}")
        rules = [r.name for r in self.alert_rules]
        if len(set(rules)) != len(rules):
            raise ValueError(
                f"alert rule names must be unique: {sorted(n for n in rules if rules.count(n) > 1)}"
            )
        for rule in self.alert_rules:
            for name in rule.channels or []:
                if name not in channels:
                    raise ValueError(f"rule {rule.name!r} names channel {name!r}; configured: {channels}")
        for name in self.default_channels or []:
            if name not in channels:
                raise ValueError(f"default_channels names {name!r}; configured: {channels}")
        return self


class LiveAlertingSettings(Strict):
    """The seed's live_alerting block: its rules join alerting.alert_rules (a rule of the same name
    there wins) and notify the default channels."""

    enabled: bool = True
    alert_rules: list[AlertRuleSettings] = Field(default_factory=list, max_length=500)
