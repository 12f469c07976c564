"""The alert rules as a Prometheus rule file: the rules the alert engine would run with this
configuration, each condition translated to PromQL; what does not translate is listed with why.

    iros export prometheus-rules -o iros-rules.yml    # rule_files: in prometheus.yml; promtool check rules
"""

from __future__ import annotations

from typing import Any

from iros.alerting.rules import build_rules, configured_rules, rules_as_data
from iros.conditions import parse as cond
from iros.config import Settings
from iros.core.timefmt import parse_duration
from iros.export.promql import Untranslatable, promql_duration, to_promql


def _rule_dicts(settings: Settings) -> list[dict[str, Any]]:
    """The rules the alert engine would run with this configuration: target rules, alert_rules and the
    live_alerting block, built by the engine's own code so the export never disagrees with it."""
    if not settings.alerting.enabled:
        return []
    rules = build_rules(settings.alerting, settings.performance_targets, None, configured_rules(settings))
    return rules_as_data(rules)


def prometheus_rules(settings: Settings) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """(the rule file, the rules skipped with why)."""
    rules: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    seen: set[str] = set()
    window = promql_duration(settings.alerting.kpi_window_seconds)
    for rule in _rule_dicts(settings):
        name = str(rule.get("name", "unnamed"))
        if name in seen:
            continue
        seen.add(name)
        try:
            parsed = cond.parse_condition(str(rule["condition"]))
            expr = to_promql(parsed.tree, window=window)
        except (Untranslatable, cond.ConditionError, KeyError) as exc:
            skipped.append({"name": name, "reason": str(exc)})
            continue
        seconds = parsed.for_seconds
        if rule.get("duration") is not None:
            seconds = max(seconds, parse_duration(rule["duration"]))
        out: dict[str, Any] = {"alert": name, "expr": expr}
        if seconds:
            out["for"] = promql_duration(seconds)
        out["labels"] = {"severity": str(rule.get("severity", "warning")), "source": "iros"}
        out["annotations"] = {
            "summary": f"{name}: {rule['condition']}",
            "description": f"Iros rule {name} ({rule['condition']}); value {{{{ $value }}}}",
        }
        rules.append(out)
    return {"groups": [{"name": "iros", "rules": rules}]}, skipped
