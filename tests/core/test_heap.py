"""Heap: what imports bring in is frozen out of full collections, and nothing else is frozen again."""

from __future__ import annotations

import gc
import sys
import types
from collections.abc import Iterator

import pytest

from iros.core.heap import Heap


@pytest.fixture
def heap() -> Iterator[Heap]:
    heap = Heap()
    heap.freeze()
    yield heap
    gc.unfreeze()  # the test process's other objects go back to the collector
    sys.modules.pop("iros_test_lazy_module", None)


def test_a_module_loaded_after_the_freeze_is_frozen_on_the_next_check(heap: Heap) -> None:
    """A library imported on first use (scipy, plotly) joins the frozen set at the next refreeze."""
    lazy = types.ModuleType("iros_test_lazy_module")
    exec("def f(x):\n    return [x]\nclass C:\n    pass\n", lazy.__dict__)
    sys.modules[lazy.__name__] = lazy
    function = lazy.__dict__["f"]
    assert any(o is function for o in gc.get_objects())  # the collector scans it
    before = gc.get_freeze_count()
    assert heap.refreeze() > 0
    assert gc.get_freeze_count() > before
    assert not any(o is function for o in gc.get_objects())  # frozen: no collection scans it now
    assert heap.freezes == 2


def test_without_new_modules_nothing_is_frozen_again(heap: Heap) -> None:
    """Data that comes and goes stays collectable: no import, no freeze."""
    entry = {"answer": ["made after the freeze"]}
    before = gc.get_freeze_count()
    assert heap.refreeze() == 0
    assert gc.get_freeze_count() == before
    assert heap.freezes == 1
    assert any(o is entry for o in gc.get_objects())  # still in the collector's generations
