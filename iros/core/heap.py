"""What lives as long as the process, kept out of the cyclic collector's full collections.

heap = Heap()
heap.freeze()                 # at start: modules, classes, the app built so far
heap.refreeze()               # every 5 s (iros.app): freezes again only if modules were imported since

A full collection scans every tracked object outside the frozen set. Iros loads some libraries on first
use (scipy and pandas for analysis, plotly for reports) so that a start stays quick; their tens of
thousands of functions, classes and dicts then sat in the oldest generation, and each full collection,
a pause of the whole event loop, scanned them again: about 20 ms each under load at concurrency 64
(28 ms at most), against 2.5 ms (5 ms at most) with them frozen. Freezing again only when sys.modules
grew keeps the frozen set to what imports made: data that comes and goes (cache entries, windows of
metrics) stays collectable.
"""

from __future__ import annotations

import gc
import sys

__all__ = ["Heap"]


class Heap:
    def __init__(self) -> None:
        self.modules = 0  # len(sys.modules) at the last freeze
        self.freezes = 0

    def freeze(self) -> int:
        """Freeze every tracked object alive now (what is garbage then stays uncollected: a start's or
        an import's leftovers, bounded). Returns how many objects the freeze added."""
        before = gc.get_freeze_count()
        gc.freeze()
        self.modules = len(sys.modules)
        self.freezes += 1
        return gc.get_freeze_count() - before

    def refreeze(self) -> int:
        """Freeze again if modules were imported since the last freeze; 0 when nothing was."""
        if len(sys.modules) == self.modules:
            return 0
        return self.freeze()
