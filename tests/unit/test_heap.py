"""bus.heap.freeze_long_lived: garbage is collected first, the living are frozen, later garbage is still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from bus.heap import freeze_long_lived


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Nothing frozen, and no automatic collection: only the calls under test may collect."""
    enabled = gc.isenabled()
    gc.unfreeze()
    gc.disable()
    yield
    gc.unfreeze()  # leave the collector as other tests expect it
    if enabled:
        gc.enable()


def _cycle() -> weakref.ref[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_cyclic_garbage_is_collected_before_the_freeze(unfrozen: None) -> None:
    gone = _cycle()  # unreachable already, but only the cyclic collector can free it
    assert gone() is not None
    freeze_long_lived()
    assert gone() is None  # frozen instead, it would never have been freed


def test_live_objects_are_frozen_and_later_garbage_is_still_collected(unfrozen: None) -> None:
    kept = [_Node() for _ in range(100)]
    frozen = freeze_long_lived()
    assert frozen == gc.get_freeze_count() > len(kept)
    assert not any(o is kept for o in gc.get_objects())  # out of every generation the collector scans
    later = _cycle()
    gc.collect()
    assert later() is None
