"""One bound on nesting: JSON trees and condition parentheses are measured without recursion."""

from __future__ import annotations

from iros.core.limits import MAX_NESTING, json_depth, paren_depth


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
