"""`iros export grafana` and `iros export prometheus-rules`: real CLI runs, checked by promtool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from iros.config import Settings
from iros.export.grafana import grafana_dashboard
from tests.conftest import SEED_PANELS

PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (Debian package prometheus)")

CONFIG: dict[str, Any] = {
    "models": [{"name": "local", "backend": "simulated", "profile": "instant"}],
    "alerting": {
        "alert_rules": [
            # The seed's live_alerting and alerting examples.
            {"name": "high_response_time", "condition": "response_time_avg > 3000", "duration": "2m"},
            {
                "name": "cpu_usage_high",
                "condition": "cpu_usage > 8.0",
                "duration": "1m",
                "severity": "critical",
            },
            {"name": "cache_hit_rate_low", "condition": "cache_hit_rate < 0.5", "duration": "5m"},
            {
                "name": "performance_degradation",
                "condition": "response_time_p95 > 5000",
                "duration": "3m",
                "severity": "critical",
            },
            {"name": "resource_exhaustion", "condition": "memory_usage > 90", "duration": "1m"},
            {
                "name": "compound",
                "condition": "p95(response_time, 5m) > 2000"
                " and not (error_rate > 0.1 or rate(errors, 1m) > 3)",
            },
            {"name": "no_twin", "condition": "max(response_time, 5m) > 5000"},
            {"name": "switched_off", "condition": "error_rate > 0.5", "enabled": False},
        ]
    },
}


def iros(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iros", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "iros.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


@pytest.fixture(scope="module")
def rules(config: Path) -> tuple[dict[str, Any], str, Path]:
    out = config.parent / "rules.yml"
    result = iros("export", "prometheus-rules", "--config", str(config), "-o", str(out), cwd=config.parent)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(out.read_text()), result.stderr, out


@pytest.mark.e2e
class TestPrometheusRules:
    def test_enabled_rules_translate_with_for_and_severity(
        self, rules: tuple[dict[str, Any], str, Path]
    ) -> None:
        """Each enabled rule with a PromQL twin becomes an alert with its `for` and severity."""
        data, _, _ = rules
        by_name = {r["alert"]: r for r in data["groups"][0]["rules"]}
        assert by_name["cpu_usage_high"]["for"] == "1m"
        assert by_name["cpu_usage_high"]["labels"]["severity"] == "critical"
        assert "avg_over_time(iros_cpu_usage_percent[1m])" in by_name["cpu_usage_high"]["expr"]
        assert "histogram_quantile(0.95" in by_name["performance_degradation"]["expr"]
        assert "iros_system_memory_percent" in by_name["resource_exhaustion"]["expr"]
        assert "switched_off" not in by_name
        # The targets' derived rules come too (alerting.target_rules defaults on).
        assert by_name["error_rate_critical"]["expr"].endswith(">= 0.1")  # as the engine: kpi.level

    def test_negation_is_pushed_into_the_comparisons(self, rules: tuple[dict[str, Any], str, Path]) -> None:
        """`not (a > x or b > y)` becomes `a <= x and b <= y`: PromQL has no boolean not."""
        data, _, _ = rules
        expr = next(r["expr"] for r in data["groups"][0]["rules"] if r["alert"] == "compound")
        assert re.search(r"<= 0\.1 and .*<= 3\)", expr), expr

    def test_rules_without_a_twin_are_skipped_and_named(
        self, rules: tuple[dict[str, Any], str, Path]
    ) -> None:
        """A condition PromQL cannot express is left out and reported on stderr with the reason."""
        data, stderr, _ = rules
        assert "no_twin" not in {r["alert"] for r in data["groups"][0]["rules"]}
        assert "skipped no_twin" in stderr and "histogram keeps no max" in stderr

    @needs_promtool
    def test_promtool_accepts_the_rule_file(self, rules: tuple[dict[str, Any], str, Path]) -> None:
        """promtool check rules passes on the exported file."""
        data, _, path = rules
        result = subprocess.run(
            [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{len(data['groups'][0]['rules'])} rules found" in result.stdout


class TestGrafana:
    @pytest.mark.e2e
    def test_writes_the_dashboards_panels_as_json(self, config: Path) -> None:
        """The dashboard JSON has the seed's panels, each with a Prometheus query."""
        result = iros("export", "grafana", "--config", str(config), cwd=config.parent)
        assert result.returncode == 0, result.stderr
        dashboard = json.loads(result.stdout)
        titles = {p["title"]: p for p in dashboard["panels"]}
        for title in SEED_PANELS:
            assert title in titles, title
        assert titles["Response Time Trend"]["timeFrom"] == "24h"
        assert titles["CPU and Memory Usage"]["timeFrom"] == "1h"
        assert titles["GPU Utilization"]["fieldConfig"]["defaults"]["noValue"] == "no GPU"
        steps = titles["Average Response Time"]["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert [s["value"] for s in steps] == [None, 3000, 5000]  # the seed's warning and critical

    def test_panels_do_not_overlap(self) -> None:
        """Panels tile Grafana's 24-column grid without overlapping."""
        panels = grafana_dashboard(Settings.model_validate(CONFIG))["panels"]
        cells: set[tuple[int, int]] = set()
        for p in panels:
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & mine, p["title"]
            cells |= mine

    @pytest.mark.e2e
    @needs_promtool
    def test_every_query_is_valid_promql(self, tmp_path: Path) -> None:
        """promtool parses every panel query (Grafana's range variables set to a fixed window)."""
        panels = grafana_dashboard(Settings.model_validate(CONFIG))["panels"]
        exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
        assert len(exprs) >= 15
        records = [
            {
                "record": f"iros:panel_{i}",
                "expr": e.replace("$__rate_interval", "1m").replace("$__range", "1h"),
            }
            for i, e in enumerate(exprs)
        ]
        path = tmp_path / "panels.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": records}]}))
        result = subprocess.run(
            [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr

    @pytest.mark.e2e
    def test_unwritable_output_says_what_to_do(self, config: Path) -> None:
        """Writing to a path that cannot be written fails with a message naming --output."""
        result = iros(
            "export", "grafana", "--config", str(config), "-o", "/proc/nope/x.json", cwd=config.parent
        )
        assert result.returncode != 0
        assert "--output" in result.stderr
