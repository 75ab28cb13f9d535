"""GcPacer: the live daemon's full garbage collections run once per connection-table turnover."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from shuntd.gcpace import MAX_SPACING, MIDDLE_NEVER, OLD_NEVER, GcPacer


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_full_collection_waits_for_a_table_turnover(restore_gc: None) -> None:
    live = [50]
    pacer = GcPacer(lambda: live[0], floor=10)
    assert gc.get_threshold()[2] == OLD_NEVER  # no automatic full collection
    assert gc.get_threshold()[1] == MIDDLE_NEVER  # nor of the middle generation
    assert gc.get_freeze_count() > 0           # start-up objects left out of every collection
    for _ in range(49):
        pacer.removed()
    pacer.tick()
    assert pacer.collections == 0              # fewer removed than alive
    pacer.removed()
    pacer.tick()
    assert pacer.collections == 1 and pacer.pending == 0


def test_floor_and_interval(restore_gc: None) -> None:
    pacer = GcPacer(lambda: 0, floor=5, max_interval=3600)
    for _ in range(4):
        pacer.removed()
    pacer.tick()
    assert pacer.collections == 0              # below the floor
    pacer.next_due = 0.0                       # the interval ran out
    pacer.tick()
    assert pacer.collections == 1


def test_collect_frees_cycles(restore_gc: None) -> None:
    pacer = GcPacer(lambda: 0)
    gc.collect()
    _Cycle()
    assert gc.get_count()[0] > 0
    pacer.collect()
    assert not any(isinstance(o, _Cycle) for o in gc.get_objects())


def test_spacing_grows_while_removals_leave_no_cycles(restore_gc: None) -> None:
    pacer = GcPacer(lambda: 10, floor=10)
    for expected in (2, 4):
        for _ in range(10 * pacer.spacing):
            pacer.removed()
        pacer.tick()
        assert pacer.spacing == expected       # nothing cyclic found: wait longer next time
    for _ in range(39):
        pacer.removed()
    pacer.tick()
    assert pacer.spacing == 4                  # 39 < 4 turnovers of 10: not yet
    pacer.removed()
    cycles = [_Cycle() for _ in range(40)]     # removals leaving cycles again
    del cycles
    pacer.tick()
    assert pacer.collections == 3 and pacer.spacing == 1


def test_spacing_is_bounded(restore_gc: None) -> None:
    pacer = GcPacer(lambda: 1, floor=1)
    for _ in range(12):
        for _ in range(pacer.spacing):
            pacer.removed()
        pacer.tick()
    assert pacer.spacing == MAX_SPACING


def test_survivors_of_young_collections_wait_for_the_pacer(restore_gc: None) -> None:
    """Connection state outlives the young generation; collecting it again as the middle
    generation only paused the daemon, so only the pacer's full collections reach it."""
    GcPacer(lambda: 0)
    middle = gc.get_stats()[1]["collections"]
    young = gc.get_stats()[0]["collections"]
    keep = [[i] for i in range(200_000)]       # 20 young collections' worth of survivors
    assert gc.get_stats()[0]["collections"] > young + 5
    assert gc.get_stats()[1]["collections"] == middle
    del keep
