"""Property tests: request normalisation, the cache key and config parsing hold for any input, not only
the examples the other tests pick."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iros.cache import ResponseCache, build_cache
from iros.config import CacheSettings, ConfigError, Settings, load_settings
from iros.errors import IrosError
from iros.schema import parse_request

# Derandomized: CI sees the same examples every run; sweep wider by hand with --hypothesis-seed.
PROPERTY = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

# --- request normalisation ------------------------------------------------------------------------
text = st.text(min_size=1, max_size=40)
# What JSON can carry and orjson reads: no NaN or infinity, integers within 64 bits.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer"]), "content": text}),
        st.fixed_dictionaries({"role": st.just("assistant"), "content": text}),
    ),
    min_size=1,
    max_size=5,
)
# Fields Iros does not know (vLLM's guided_json, Ollama's options) must reach the upstream untouched.
extras = st.dictionaries(
    st.text(min_size=1, max_size=12).filter(lambda k: k not in _KNOWN), json_values, max_size=3
)
_KNOWN = {
    "model",
    "messages",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "n",
    "user",
    "tools",
    "tool_choice",
    "response_format",
    "stream",
    "stream_options",
    "presence_penalty",
    "frequency_penalty",
    "iros",
}
valid_requests = st.builds(
    lambda model, msgs, temperature, top_p, max_tokens, stream, extra: {
        **extra,
        "model": model,
        "messages": msgs,
        **({"temperature": temperature} if temperature is not None else {}),
        **({"top_p": top_p} if top_p is not None else {}),
        **({"max_tokens": max_tokens} if max_tokens is not None else {}),
        "stream": stream,
    },
    text,
    messages,
    st.none() | st.floats(0, 2),
    st.none() | st.floats(0, 1),
    st.none() | st.integers(1, 100_000),
    st.booleans(),
    extras,
)


class TestRequestNormalisation:
    @PROPERTY
    @given(st.binary(max_size=300))
    def test_any_bytes_are_parsed_or_refused_with_a_400(self, body: bytes) -> None:
        """Whatever bytes arrive, parsing either succeeds or raises a 400 IrosError with a message."""
        try:
            parse_request(body)
        except IrosError as exc:
            assert exc.status == 400
            assert exc.message

    @PROPERTY
    @given(json_values)
    def test_any_json_value_is_parsed_or_refused_with_a_400(self, value: Any) -> None:
        """Any JSON document, object or not, is accepted or refused with a 400 in the OpenAI shape."""
        try:
            parse_request(json.dumps(value).encode())
        except IrosError as exc:
            assert exc.status == 400
            assert set(exc.payload()["error"]) == {"message", "type", "param", "code"}

    @PROPERTY
    @given(valid_requests)
    def test_a_valid_request_is_kept_as_sent(self, request: dict[str, Any]) -> None:
        """A valid request parses, and the data forwarded upstream is exactly what the client sent."""
        parsed = parse_request(orjson.dumps(request))
        assert parsed.data == request
        assert parsed.model == request["model"]
        assert parsed.stream is request["stream"]

    @PROPERTY
    @given(valid_requests, st.floats(2.0001, 1e6) | st.floats(-1e6, -0.0001))
    def test_an_out_of_range_temperature_names_the_field(
        self, request: dict[str, Any], temperature: float
    ) -> None:
        """A temperature outside 0..2 is refused with param "temperature"."""
        with pytest.raises(IrosError) as info:
            parse_request(orjson.dumps({**request, "temperature": temperature}))
        assert info.value.status == 400
        assert info.value.param == "temperature"


# --- the cache key --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> ResponseCache:
    return build_cache(CacheSettings(semantic=False), tmp_path_factory.mktemp("cache"))


def _plan(cache: ResponseCache, request: dict[str, Any]) -> Any:
    return cache.plan(parse_request(orjson.dumps(request)), "tenant", None)


class TestCacheKey:
    @PROPERTY
    @given(valid_requests.map(lambda r: {**r, "temperature": 0}), st.randoms())
    def test_key_order_and_delivery_do_not_change_the_key(
        self, cache: ResponseCache, request: dict[str, Any], rnd: Any
    ) -> None:
        """The same request with its keys shuffled, streamed or not, has the same cache key."""
        items = list(request.items())
        rnd.shuffle(items)
        shuffled = dict(items, stream=not request["stream"])
        first, second = _plan(cache, request), _plan(cache, shuffled)
        assert first is not None and second is not None
        assert first.key == second.key

    @PROPERTY
    @given(valid_requests.map(lambda r: {**r, "temperature": 0}), st.integers(0, 4), text)
    def test_any_changed_message_changes_the_key(
        self, cache: ResponseCache, request: dict[str, Any], at: int, other: str
    ) -> None:
        """Changing any message of the conversation (history or system prompt) gives another key."""
        msgs = request["messages"]
        i = at % len(msgs)
        if msgs[i]["content"] == other:
            other += "!"
        changed = dict(request, messages=[*msgs[:i], dict(msgs[i], content=other), *msgs[i + 1 :]])
        first, second = _plan(cache, request), _plan(cache, changed)
        assert first is not None and second is not None
        assert first.key != second.key


# --- config parsing -------------------------------------------------------------------------------
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
