"""node.heap: a long-running process freezes what it loaded at start (#12)."""

import gc
import weakref
from collections.abc import Iterator

import pytest

from node.heap import BUSY_THRESHOLDS, freeze_startup_heap


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.parametrize("busy", [False, True])
def test_what_lives_at_start_is_frozen_and_garbage_is_not(busy: bool, restored_gc: None) -> None:
    """Everything alive is exempt from later collections; a cycle already unreachable is
    collected first rather than frozen for the process's life. Only a busy process collects
    young objects less often."""
    gc.unfreeze()
    thresholds = gc.get_threshold()

    class Node:
        other: object = None

    kept, dropped = Node(), Node()
    kept.other, dropped.other = kept, dropped  # two cycles; only `kept` stays reachable
    dropped_ref = weakref.ref(dropped)
    del dropped
    freeze_startup_heap(busy=busy)
    assert gc.get_freeze_count() > 0
    assert all(o is not kept for o in gc.get_objects())  # frozen: in none of the collector's generations
    assert dropped_ref() is None  # collected, not frozen
    assert gc.get_threshold() == (BUSY_THRESHOLDS if busy else thresholds)
