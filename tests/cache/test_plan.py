"""Property tests of the cache key: it ignores key order and delivery and changes with any message."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from iros.cache.build import build_cache
from iros.cache.engine import ResponseCache
from iros.config import CacheSettings
from iros.core.schema import parse_request
from tests.strategies import PROPERTY, text, valid_requests


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


class TestClientTtl:
    def test_a_clients_ttl_may_shorten_but_never_lengthen_the_operators(self, cache: ResponseCache) -> None:
        """iros.ttl is clamped to cache.ttl_seconds; shorter ones are kept; none gives the operator's."""
        base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        ceiling = cache.settings.ttl_seconds
        assert ceiling is not None
        assert _plan(cache, {**base, "iros": {"ttl": ceiling * 1000}}).ttl == ceiling
        assert _plan(cache, {**base, "iros": {"ttl": 5}}).ttl == 5.0
        assert _plan(cache, base).ttl == ceiling


class TestLongPrompts:
    def test_a_prompt_longer_than_the_model_reads_is_matched_exactly_only(self, cache: ResponseCache) -> None:
        """Two long texts that share what the embedding model reads get no semantic view; short ones do."""
        limit = cache.settings.semantic_max_chars
        shared = "Summarise this report. " + "word " * limit
        long_plan = _plan(cache, {"model": "m", "messages": [{"role": "user", "content": shared + "A"}]})
        other = _plan(cache, {"model": "m", "messages": [{"role": "user", "content": shared + "B"}]})
        short = _plan(cache, {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert long_plan.prompt is None and other.prompt is None
        assert long_plan.key != other.key  # exact repeats are still served
        assert short.prompt == "hi"
