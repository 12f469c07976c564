"""Property tests of config parsing: any values, keys, environment overrides or file text load or
fail with a readable ConfigError, never a traceback."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iros.config import ConfigError, Settings, load_settings
from tests.strategies import PROPERTY, json_values

sections = st.sampled_from(
    ["server", "auth", "models", "retry", "performance_targets", "metrics_collection", "cache"]
)


class TestConfigParsing:
    @PROPERTY
    @given(st.dictionaries(sections, json_values, min_size=1, max_size=3))
    def test_any_section_values_load_or_fail_with_a_readable_error(self, overrides: dict[str, Any]) -> None:
        """Any values under known sections give settings or a ConfigError naming what is wrong."""
        try:
            loaded = load_settings(None, overrides)
        except ConfigError as exc:
            assert str(exc).startswith("invalid configuration:\n  ")
        else:
            assert isinstance(loaded, Settings)

    @PROPERTY
    @given(st.text(min_size=1, max_size=20).filter(lambda k: k not in Settings.model_fields))
    def test_an_unknown_top_level_key_is_refused_by_name(self, key: str) -> None:
        """A misspelt or unknown section is refused, never silently ignored."""
        with pytest.raises(ConfigError) as info:
            load_settings(None, {key: 1})
        assert "unknown field" in str(info.value)

    @PROPERTY
    # What an environment variable can hold: UTF-8 text without NUL.
    @given(
        st.integers(-100_000, 100_000)
        | st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=6)
    )
    def test_an_environment_port_override_is_applied_or_refused(self, value: int | str) -> None:
        """IROS_SERVER__PORT wins over the file when it is a port, and is refused clearly otherwise."""
        os.environ["IROS_SERVER__PORT"] = str(value)
        try:
            loaded = load_settings(None)
        except ConfigError as exc:
            assert "server.port" in str(exc)
            assert "IROS_SERVER__PORT" in str(exc)
        else:
            assert 0 <= loaded.server.port <= 65535
            assert float(str(value)) == loaded.server.port  # "8080", " 8080 " and "8080.0" all read as 8080
        finally:
            del os.environ["IROS_SERVER__PORT"]

    @PROPERTY
    @given(st.text(max_size=200))
    def test_any_yaml_text_loads_or_fails_with_a_config_error(self, source: str) -> None:
        """Any file content is read as a config or refused with a ConfigError, never a traceback."""
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"iros-prop-{os.getpid()}.yaml"
        path.write_text(source)
        try:
            load_settings(path)
        except ConfigError as exc:
            assert str(exc)
        finally:
            path.unlink()
