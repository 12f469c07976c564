"""The verifier's token embeddings of cached prompts: kept by recency within a byte budget."""

from __future__ import annotations

import numpy as np

from iros.cache.token_memory import TokenMemory


def tokens(rows: int) -> np.ndarray:
    return np.ones((rows, 4), np.float16)  # 8 bytes a row


def test_the_least_recently_used_go_first_when_over_budget() -> None:
    memory = TokenMemory(max_bytes=3 * 8)
    for key in "abc":
        memory.keep(key, tokens(1))
    memory.touch(["a"])  # a candidate just used: now the most recent
    memory.keep("d", tokens(1))
    assert memory.get("b") is None
    assert all(memory.get(k) is not None for k in "acd")
    assert memory.bytes == 3 * 8 and len(memory) == 3


def test_keeping_again_replaces_and_dropping_frees_the_bytes() -> None:
    memory = TokenMemory(max_bytes=1000)
    memory.keep("a", tokens(2))
    memory.keep("a", tokens(3))
    assert memory.bytes == 3 * 8 and len(memory) == 1
    memory.drop("a")
    memory.drop("never kept")
    assert memory.bytes == 0 and memory.get("a") is None


def test_nothing_is_kept_for_none_and_one_oversized_entry_stays() -> None:
    memory = TokenMemory(max_bytes=8)
    memory.keep("a", None)
    assert len(memory) == 0
    memory.keep("big", tokens(10))  # alone over the budget: kept, so the lookup that needs it has it
    assert memory.get("big") is not None and memory.bytes == 80
    memory.keep("next", tokens(1))
    assert memory.get("big") is None and memory.bytes == 8
