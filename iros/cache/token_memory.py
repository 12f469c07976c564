"""The verifier's token embeddings of cached prompts, kept by recency within a byte budget.

memory = TokenMemory(max_bytes=128 * 2**20)
memory.keep("key", tokens)          # a new entry's projection (None: nothing to keep)
memory.get("key")                   # None when it was never kept or has been let go
memory.touch(["key", ...])          # candidates just used: the last to go
memory.drop("key")                  # the entry left the cache

About 10 kB an entry (14 tokens of 384 float16): the most recently used entries' stay; older ones are
embedded again when next a candidate (engine.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["MAX_TOKEN_BYTES", "TokenMemory"]

MAX_TOKEN_BYTES = 128 * 2**20


class TokenMemory:
    def __init__(self, max_bytes: int = MAX_TOKEN_BYTES) -> None:
        self.max_bytes = max_bytes
        self._tokens: OrderedDict[str, np.ndarray[Any, Any]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._tokens)

    def get(self, key: str) -> np.ndarray[Any, Any] | None:
        return self._tokens.get(key)

    def keep(self, key: str, tokens: np.ndarray[Any, Any] | None) -> None:
        if tokens is None:
            return
        self.drop(key)
        self._tokens[key] = tokens
        self.bytes += tokens.nbytes
        # The one just kept stays even when it alone is over the budget.
        while self.bytes > self.max_bytes and len(self._tokens) > 1:
            _, old = self._tokens.popitem(last=False)
            self.bytes -= old.nbytes

    def drop(self, key: str) -> None:
        old = self._tokens.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes

    def touch(self, keys: Iterable[str]) -> None:
        for key in keys:
            if key in self._tokens:
                self._tokens.move_to_end(key)
