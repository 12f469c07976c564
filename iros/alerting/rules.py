"""Alert rules: the configured ones, the ones performance_targets implies, and validation of new ones.

rules = build_rules(settings.alerting, settings.performance_targets)   # [Rule], checked
rules_as_data(rules)        # the rules as plain dicts (GET /api/alerts/rules, `iros export prometheus-rules`)
rules = parse_rules(body["alert_rules"], settings.alerting)   # PUT: raises RuleErrors naming each problem
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from iros.conditions.parse import Condition, ConditionError, parse_condition
from iros.config import AlertingSettings, AlertRuleSettings, Settings, Target
from iros.core.errors import error_path
from iros.core.timefmt import format_duration, parse_duration
from iros.metrics.kpi import TARGET_ALIASES

MAX_RULES = 500


class RuleErrors(ValueError):
    """Rules that cannot be used; `errors` lists "where: what" lines."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    condition: Condition
    duration: float  # seconds the condition must hold before firing (Prometheus's `for`)
    severity: str
    channels: tuple[str, ...]
    labels: dict[str, str] = field(default_factory=dict)
    description: str | None = None
    keep_firing_for: float = 0.0
    hysteresis: float = 0.0
    source: str = "config"  # config | targets | api

    @property
    def all_labels(self) -> dict[str, str]:
        return {"alertname": self.name, "severity": self.severity, **self.labels}

    def summary(self, value: float | None) -> str:
        shown = "no data" if value is None else f"{value:g}"
        return f"{self.name}: {self.condition.text} (value {shown})"

    def to_data(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "condition": self.condition.text,
            "duration": format_duration(self.duration) if self.duration else "0s",
            "severity": self.severity,
            "channels": list(self.channels),
            "labels": self.labels,
            "description": self.description,
            "keep_firing_for": format_duration(self.keep_firing_for) if self.keep_firing_for else "0s",
            "hysteresis": self.hysteresis,
            "reads": self.condition.names,
            "source": self.source,
        }


def compile_rule(s: AlertRuleSettings, alerting: AlertingSettings, source: str) -> Rule:
    default_channels = alerting.default_channels
    channels = s.channels if s.channels is not None else default_channels
    if channels is None:
        channels = [c.name for c in alerting.channels]
    keep = s.keep_firing_for if s.keep_firing_for is not None else alerting.keep_firing_for
    return Rule(
        name=s.name,
        condition=parse_condition(s.condition, allow_for=False),
        duration=parse_duration(s.duration),
        severity=s.severity,
        channels=tuple(channels),
        labels=dict(s.labels),
        description=s.description,
        keep_firing_for=parse_duration(keep),
        hysteresis=s.hysteresis if s.hysteresis is not None else alerting.hysteresis,
        source=source,
    )


def target_rules(targets: Mapping[str, Target], alerting: AlertingSettings) -> list[AlertRuleSettings]:
    """A warning and a critical rule per KPI target; which side is worse comes from the thresholds'
    order, as in kpi.level."""
    out = []
    for name, target in targets.items():
        kpi = TARGET_ALIASES.get(name, name)
        op = ">=" if target.critical_threshold >= target.target else "<="
        for severity, threshold in (
            ("warning", target.warning_threshold),
            ("critical", target.critical_threshold),
        ):
            out.append(
                AlertRuleSettings(
                    name=f"{name}_{severity}",
                    condition=f"{kpi} {op} {threshold:g}",
                    duration=alerting.target_rule_duration,
                    severity=severity,
                    labels={"kpi": name},
                    description=f"{kpi} passed its {severity} threshold {threshold:g} "
                    f"(target {target.target:g}, performance_targets.{name})",
                )
            )
    return out


def cache_rule(alerting: AlertingSettings) -> AlertRuleSettings:
    """The default alert on the semantic cache's own error: the verified false-hit rate's interval has
    its upper end above the operator's bound δ (no verification yet: no data, never fires)."""
    return AlertRuleSettings(
        name="cache_false_hit_rate_above_bound",
        condition="cache_false_hit_rate_upper > cache_max_false_hit_rate",
        duration=alerting.target_rule_duration,
        severity="warning",
        labels={"kpi": "cache_false_hit_rate"},
        description="the semantic cache's verified false-hit rate may be above cache.max_false_hit_rate "
        "(the Wilson interval's upper end passed it)",
    )


def configured_rules(settings: Settings) -> list[AlertRuleSettings]:
    """alerting.alert_rules, then the seed's live_alerting rules and the budget rules not named there."""
    rules = list(settings.alerting.alert_rules)
    live = settings.live_alerting
    extra = budget_rules(settings)
    if live is not None and live.enabled:
        extra = [*live.alert_rules, *extra]
    names = {r.name for r in rules}
    return rules + [r for r in extra if r.name not in names]


BUDGET_ALERT_SHARE = 0.8


def budget_rules(settings: Settings) -> list[AlertRuleSettings]:
    """One warning per key with a budget, once it has spent 80% of it this period (gateway/budgets.py
    records the share as budget_used_ratio{key}); a configured rule of the same name replaces it."""
    out = []
    auth = settings.auth
    for role, entries in (("client", auth.api_keys), ("admin", auth.admin_keys)):
        for i, entry in enumerate(entries):
            key = entry.name or f"{role}-{i}"  # the name the key ring gives it
            if entry.budget is None or '"' in key or "\\" in key:
                continue
            out.append(
                AlertRuleSettings(
                    name="budget_80_percent_" + re.sub(r"[^A-Za-z0-9_.:-]", "_", key),
                    condition=f'max(budget_used_ratio{{key="{key}"}}, 1m) >= {BUDGET_ALERT_SHARE}',
                    severity="warning",
                    labels={"key": key},
                    description=(
                        f"key {key} has spent {BUDGET_ALERT_SHARE:.0%} of its ${entry.budget.usd:g} budget "
                        f"for this {entry.budget.period}"
                    ),
                )
            )
    return out


def build_rules(
    alerting: AlertingSettings,
    targets: Mapping[str, Target],
    overrides: Sequence[AlertRuleSettings] | None = None,
    configured: Sequence[AlertRuleSettings] | None = None,
) -> list[Rule]:
    """The rules in force: target rules (unless switched off), then configured (or API-set) rules; a
    configured rule replaces a target rule of the same name. `configured` defaults to
    alerting.alert_rules (configured_rules(settings) adds the live_alerting block)."""
    rules: dict[str, Rule] = {}
    if alerting.target_rules:
        for s in [*target_rules(targets, alerting), cache_rule(alerting)]:
            rules[s.name] = compile_rule(s, alerting, "targets")
    from_config = list(configured) if configured is not None else alerting.alert_rules
    given, source = (overrides, "api") if overrides is not None else (from_config, "config")
    for s in given:
        if s.enabled:
            rules[s.name] = compile_rule(s, alerting, source)
        else:
            rules.pop(s.name, None)
    return list(rules.values())


def condition_problem(rule: AlertRuleSettings) -> str | None:
    """What is wrong with a rule's condition (the condition language's message), or None."""
    try:
        parse_condition(rule.condition, allow_for=False)
    except ConditionError as exc:
        return exc.message
    return None


READ_ONLY = frozenset({"reads", "source"})  # in GET /api/alerts/rules, derived from the rule


def parse_rules(body: Any, alerting: AlertingSettings) -> list[AlertRuleSettings]:
    """Rules sent to PUT /api/alerts/rules, checked one by one; every problem is reported at once."""
    if isinstance(body, dict) and "alert_rules" in body:
        body = body["alert_rules"]
    if not isinstance(body, list):
        raise RuleErrors(['the body must be {"alert_rules": [...]} or a list of rules'])
    if len(body) > MAX_RULES:
        raise RuleErrors([f"{len(body)} rules; at most {MAX_RULES}"])
    errors: list[str] = []
    rules: list[AlertRuleSettings] = []
    channels = {c.name for c in alerting.channels}
    seen: set[str] = set()
    for i, raw in enumerate(body):
        if isinstance(raw, dict):  # what GET returns is accepted back: its read-only fields are ignored
            raw = {k: v for k, v in raw.items() if k not in READ_ONLY}
        label = f"alert_rules[{i}]" + (
            f" ({raw.get('name')})" if isinstance(raw, dict) and raw.get("name") else ""
        )
        try:
            rule = AlertRuleSettings.model_validate(raw)
        except ValidationError as exc:
            for err in exc.errors():
                where = error_path(err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] == "extra_forbidden":
                    msg = f"unknown field; known: {', '.join(AlertRuleSettings.model_fields)}"
                errors.append(f"{label}{'.' + where if where else ''}: {msg}")
            continue
        if problem := condition_problem(rule):
            errors.append(f"{label}.condition: {problem}")
        if rule.name in seen:
            errors.append(f"{label}.name: {rule.name!r} is used twice")
        seen.add(rule.name)
        for name in rule.channels or []:
            if name not in channels:
                errors.append(
                    f"{label}.channels: no channel {name!r}; configured: {sorted(channels) or 'none'}"
                )
        rules.append(rule)
    if errors:
        raise RuleErrors(errors)
    return rules


def rules_as_data(rules: Sequence[Rule]) -> list[dict[str, Any]]:
    return [r.to_data() for r in rules]
