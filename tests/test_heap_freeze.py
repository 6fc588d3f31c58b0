"""The driver's heap frozen while the rounds run, and the bench's count of collections."""

from __future__ import annotations

import gc
import weakref

import pytest

from client.work import GC_FREEZE_ENV, freezes_heap
from simulations.bench import CollectorClock
from simulations.federated import _heap_frozen


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_the_driver_heap_is_frozen_during_the_rounds_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Frozen inside, given back after: a cycle let go of during the rounds (frozen with
    the heap) is collected once they are over."""
    gc.unfreeze()
    monkeypatch.setenv(GC_FREEZE_ENV, "1")
    held = _Cycle()
    alive = weakref.ref(held)
    with _heap_frozen():
        assert gc.get_freeze_count() > 0
        del held
        gc.collect()
        assert alive() is not None  # frozen: out of the collector's reach
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert alive() is None  # given back: the cycle is collected


def test_the_driver_heap_is_left_alone_when_off(monkeypatch: pytest.MonkeyPatch) -> None:
    gc.unfreeze()
    monkeypatch.setenv(GC_FREEZE_ENV, "0")
    with _heap_frozen():
        assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("value", ["off", "false", "2", "yes"])
def test_a_switch_other_than_0_or_1_names_the_variable(
        value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(GC_FREEZE_ENV, value)
    with pytest.raises(ValueError, match=GC_FREEZE_ENV):
        freezes_heap()


def test_the_collector_clock_counts_full_collections_while_in_use() -> None:
    with CollectorClock() as clock:
        gc.collect()
        gc.collect(0)
    assert clock.full == 1
    assert clock.seconds > 0
    gc.collect()
    assert clock.full == 1  # its hook is gone
