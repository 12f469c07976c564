"""One bound on nesting: JSON trees and condition parentheses are measured without recursion."""

from __future__ import annotations

import pytest

from iros.core.errors import IrosError
from iros.core.limits import MAX_NESTING, json_depth, paren_depth
from iros.core.schema import parse_request


class TestNesting:
    def test_json_depth_is_measured_and_the_walk_stops_past_the_limit(self) -> None:
        """Scalars are 0 deep, each object or array adds one; a hostile tree stops the walk early."""
        assert json_depth("x") == 0 and json_depth({"a": [1, {"b": []}]}) == 4
        deep: list[object] = []
        node = deep
        for _ in range(10_000):
            node.append([])
            node = node[0]  # type: ignore[assignment]
        assert json_depth(deep) == MAX_NESTING + 1

    def test_paren_depth_counts_the_deepest_nesting(self) -> None:
        """Parentheses in a row nest; side by side they do not."""
        assert paren_depth("(a) and (b)") == 1 and paren_depth("((a > 1) or b)") == 2
        assert paren_depth("(" * 250) == 250

    @pytest.mark.parametrize("padding", [10, 100_000])
    def test_a_request_nested_past_the_bound_is_a_400_small_or_large(self, padding: int) -> None:
        """Deep JSON is refused whether the body is small (bracket count first) or large (walked)."""
        deep = "[" * 255 + "]" * 255
        body = (
            f'{{"model": "m", "messages": [{{"role": "user", "content": "{"x" * padding}"}}], "x": {deep}}}'
        )
        with pytest.raises(IrosError) as info:
            parse_request(body.encode())
        assert info.value.status == 400 and info.value.code == "nesting_too_deep"
        assert f"{MAX_NESTING} levels" in info.value.message
        shallow = body.replace(deep, "[[[1]]]")
        assert parse_request(shallow.encode()).data["x"] == [[[1]]]
