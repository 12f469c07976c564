"""Nesting that no parser bounds for us: a client's JSON (orjson reads 1,024 levels but writes only
254, and the cache key is written) and a condition's parentheses (lark's tree is walked recursively).
One bound for both, checked where the text comes in, so nothing deeper reaches the parts.

MAX_NESTING                      # 64 levels
json_depth("[[1]]" parsed)       # 2
paren_depth("((a > 1))")         # 2
"""

from __future__ import annotations

from typing import Any

__all__ = ["MAX_NESTING", "json_depth", "paren_depth"]

MAX_NESTING = 64


def json_depth(tree: Any, limit: int = MAX_NESTING) -> int:
    """How deep objects and arrays nest in a parsed JSON tree (0 for a scalar); the walk stops just
    past `limit`, so a hostile tree costs no more than a legitimate one."""
    if not isinstance(tree, dict | list):
        return 0
    deepest = 1
    stack: list[tuple[Any, int]] = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > deepest:
            deepest = depth
            if depth > limit:
                break
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return deepest


def paren_depth(text: str) -> int:
    """How deep parentheses nest in a text (unbalanced ones included)."""
    depth = deepest = 0
    for char in text:
        if char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth -= 1
    return deepest
