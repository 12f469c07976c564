"""Configuration: one YAML file plus environment overrides, with errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from iros.app import check_settings
from iros.cli.main import app
from iros.config import MIN_KEY_CHARS, ConfigError, load_settings, redacted

ISSUE_EXAMPLE = """
server: {host: 127.0.0.1, port: 8080}
auth: {open: true}            # or api_keys / admin_keys, see below
models:
  - name: gpt-test
    backend: openai
    base_url: http://127.0.0.1:9100/v1
    api_key_env: UPSTREAM_KEY
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "iros.yaml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        # What the settings check themselves, then what needs the parts (as `iros serve` does).
        check_settings(load_settings(_write(tmp_path, text)))
    return str(info.value)


class TestLoading:
    def test_documented_shape_loads_as_written(self, tmp_path: Path) -> None:
        """The issue's example config loads unchanged, with the seed's KPI targets by default."""
        settings = load_settings(_write(tmp_path, ISSUE_EXAMPLE))
        model = settings.models[0]
        assert (model.name, model.backend, model.base_url, model.api_key_env) == (
            "gpt-test",
            "openai",
            "http://127.0.0.1:9100/v1",
            "UPSTREAM_KEY",
        )
        assert settings.auth.open is True
        assert settings.performance_targets["response_time_ms"].critical_threshold == 5000
        assert settings.performance_targets["cache_hit_rate"].target == 0.70

    def test_embedded_default_has_a_slow_accurate_and_a_fast_model(self) -> None:
        """The embedded default serves two simulated profiles, on loopback, open."""
        settings = load_settings(None)
        by_name = {m.name: m for m in settings.models}
        assert by_name["large"].backend == by_name["lightweight"].backend == "simulated"
        assert (by_name["large"].accuracy or 0) > (by_name["lightweight"].accuracy or 0)
        assert settings.server.host == "127.0.0.1"

    def test_environment_overrides_the_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """IROS_SECTION__FIELD wins over the file, and leaves the rest of the section alone."""
        monkeypatch.setenv("IROS_SERVER__PORT", "9911")
        monkeypatch.setenv("IROS_RETRY__ATTEMPTS", "5")
        settings = load_settings(_write(tmp_path, ISSUE_EXAMPLE))
        assert settings.server.port == 9911
        assert settings.server.host == "127.0.0.1"
        assert settings.retry.attempts == 5

    def test_later_blocks_are_accepted(self, tmp_path: Path) -> None:
        """The cache, alerting and optimization blocks are carried for the parts that read them."""
        settings = load_settings(_write(tmp_path, ISSUE_EXAMPLE + "cache: {enabled: true}\n"))
        assert settings.cache.model_dump()["enabled"] is True

    def test_the_seeds_metrics_collection_block_loads_as_written(self, tmp_path: Path) -> None:
        seed = """
metrics_collection:
  enabled: true
  collection_interval_seconds: 10
  retention_days: 30
  aggregation_intervals: ["1m", "5m", "1h", "1d"]
  storage: {backend: prometheus, endpoint: "http://prometheus:9090"}
  custom_metrics: {business_metrics: true, user_journey_metrics: true, model_performance_metrics: true}
"""
        metrics = load_settings(_write(tmp_path, ISSUE_EXAMPLE + seed)).metrics_collection
        assert (
            metrics.storage.backend == "prometheus" and metrics.storage.endpoint == "http://prometheus:9090"
        )
        assert metrics.aggregation_intervals == ["1m", "5m", "1h", "1d"]
        assert metrics.custom_metrics.user_journey_metrics is True


class TestErrors:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (
                ISSUE_EXAMPLE + "metrics_collection: {storage: {backend: prometheus}}\n",
                "metrics_collection.storage: storage.backend prometheus needs storage.endpoint",
            ),
            (
                ISSUE_EXAMPLE + "metrics_collection: {aggregation_intervals: [2m]}\n",
                "metrics_collection.aggregation_intervals[0]: Input should be '1m', '5m', '1h' or '1d'",
            ),
            (
                ISSUE_EXAMPLE.replace("port: 8080", "prot: 8080"),
                "server.prot: unknown field (did you mean 'port'?)",
            ),
            (
                ISSUE_EXAMPLE.replace("    base_url: http://127.0.0.1:9100/v1\n", ""),
                "models[0]: backend 'openai' needs base_url",
            ),
            (
                ISSUE_EXAMPLE.replace("http://127.0.0.1:9100/v1", "127.0.0.1:9100"),
                "models[0].base_url: base_url must start",
            ),
            (ISSUE_EXAMPLE.replace("port: 8080", "port: 99999"), "server.port:"),
            (ISSUE_EXAMPLE.replace("backend: openai", "backend: grpc"), "models[0].backend:"),
            (ISSUE_EXAMPLE.replace("auth: {open: true}", "auth: {open: false}"), "no api_keys or admin_keys"),
            (ISSUE_EXAMPLE.replace("host: 127.0.0.1", "host: 0.0.0.0"), "auth.open serves anyone"),
            ("server: {port: 1}\n", "models: Field required"),
            ("models: [{name: a, backend: simulated, profile: huge}]\n", "unknown simulated profile 'huge'"),
            (
                "models: [{name: a, backend: simulated}]\n"
                "alerting: {alert_rules: [{name: x, condition: 'eror_rate > 0.1'}]}\n",
                "alerting.alert_rules[0].condition: unknown KPI 'eror_rate' (did you mean 'error_rate'",
            ),
            (
                "models: [{name: a, backend: simulated}]\n"
                "optimization: {auto_optimization: {optimization_rules: "
                "[{name: x, trigger: 'cpu_usage >', actions: [enable_aggressive_caching]}]}}\n",
                "optimization.auto_optimization.optimization_rules[0].trigger:",
            ),
            (
                "auth: {api_keys: [{name: a}]}\nmodels: [{name: a, backend: simulated}]\n",
                "auth.api_keys[0]: give exactly one of key, key_env or key_sha256",
            ),
            (
                "models: [{name: a, backend: simulated}]\ncache: {semantic_max_chars: 5000}\n",
                "cache.semantic_max_chars: Input should be less than or equal to 4096",
            ),
        ],
    )
    def test_error_names_the_field(self, tmp_path: Path, text: str, expected: str) -> None:
        """Each invalid config is refused with a message that names the field and what is wrong."""
        assert expected in _error(tmp_path, text)

    def test_yaml_syntax_error_gives_the_line(self, tmp_path: Path) -> None:
        """Broken YAML is reported with its line."""
        assert "line 3" in _error(tmp_path, "server:\n  port: 1\n  host: a: b\n")

    def test_missing_file(self, tmp_path: Path) -> None:
        """A config path that does not exist says so."""
        with pytest.raises(ConfigError, match="no such config file"):
            load_settings(tmp_path / "missing.yaml")


class TestCli:
    def test_config_check_accepts_a_good_file(self, tmp_path: Path) -> None:
        """`iros config check` says ok for a valid file."""
        result = CliRunner().invoke(app, ["config", "check", str(_write(tmp_path, ISSUE_EXAMPLE))])
        assert result.exit_code == 0
        assert "ok" in result.output

    def test_config_check_names_the_bad_field_and_exits_2(self, tmp_path: Path) -> None:
        """`iros config check` fails with the field named and a non-zero status."""
        path = _write(tmp_path, ISSUE_EXAMPLE.replace("port: 8080", "port: -1"))
        result = CliRunner().invoke(app, ["config", "check", str(path)])
        assert result.exit_code == 2
        assert "server.port" in result.output

    def test_config_show_redacts_keys(self, tmp_path: Path) -> None:
        """`iros config show` prints the effective config with keys hidden."""
        path = _write(
            tmp_path, "auth: {api_keys: [sk-very-secret]}\nmodels: [{name: a, backend: simulated}]\n"
        )
        result = CliRunner().invoke(app, ["config", "show", "--config", str(path)])
        assert result.exit_code == 0
        assert "sk-very-secret" not in result.output
        assert '"***"' in result.output

    def test_bench_rejects_bad_concurrency_with_advice(self) -> None:
        """A malformed --concurrency is a clear CLI error, not a traceback."""
        result = CliRunner().invoke(app, ["bench", "overhead", "--concurrency", "one,two"])
        assert result.exit_code == 2
        assert "whole numbers" in result.output


class TestSecrets:
    def test_userinfo_with_an_api_key_env_is_refused(self) -> None:
        """A base_url holding user:pass@ and an api_key_env cannot both be sent: refused, by field."""
        model = {"name": "m", "base_url": "http://u:p@127.0.0.1:9/v1", "api_key_env": "K"}
        with pytest.raises(ConfigError, match=r"models\[0\]: base_url holds credentials"):
            load_settings(None, {"models": [model]})
        embedder = {"backend": "openai", "base_url": "http://u:p@127.0.0.1:9/v1", "api_key_env": "K"}
        with pytest.raises(ConfigError, match=r"cache.embedder: base_url holds credentials"):
            load_settings(None, {"cache": {"embedder": embedder}})
        # Either one alone is fine: basic auth in the URL, or a bearer key.
        assert load_settings(None, {"models": [{"name": "m", "base_url": "http://u:p@127.0.0.1:9/v1"}]})

    def test_shown_settings_hide_every_urls_password(self) -> None:
        """The settings as /api/config and `iros config show` print them: no URL password anywhere."""
        settings = load_settings(
            None,
            {
                "models": [{"name": "m", "base_url": "http://u:pw-1@127.0.0.1:9/v1"}],
                "cache": {"store": {"backend": "redis", "url": "redis://:pw-2@127.0.0.1:6379/0"}},
                "metrics_collection": {
                    "storage": {"backend": "prometheus", "endpoint": "http://u:pw-3@127.0.0.1:9090"}
                },
            },
        )
        shown = str(redacted(settings))
        assert "pw-" not in shown and shown.count("***@127.0.0.1") == 3

    def test_short_keys_are_refused_on_a_public_bind_only(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Off loopback every key (inline or from the environment) needs MIN_KEY_CHARS characters."""
        monkeypatch.setenv("SHORT_KEY", "abc")
        public = {
            "server": {"host": "0.0.0.0"},
            "auth": {"open": False, "admin_keys": [{"name": "ops", "key_env": "SHORT_KEY"}]},
        }
        with pytest.raises(
            ConfigError, match=f"auth.admin_keys\\[0\\] \\(ops\\): .* at least {MIN_KEY_CHARS}"
        ):
            load_settings(None, public)
        assert load_settings(None, {**public, "server": {"host": "127.0.0.1"}})
        monkeypatch.setenv("SHORT_KEY", "k" * MIN_KEY_CHARS)
        assert load_settings(None, public)
