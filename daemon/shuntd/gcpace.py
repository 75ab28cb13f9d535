"""When the live daemon runs Python's full garbage collection: rarely, and at a known cost.

A connection dies in a reference cycle (its endpoints point at each other), so it is freed by a
full (generation 2) collection, whose pause grows with everything alive: 100-700 ms once the
engine holds some ten thousand connections. CPython's own rule runs one each time the old
generation grew by a quarter, i.e. several per second while the connection table fills, and
every pause lets the packets of each session whose shunt was due reach Python instead of XDP.

So: start-up objects (modules, policies, BPF tables) are frozen out of every collection; the
youngest generation is collected as usual but less often (a larger first threshold); the
automatic middle and full collections are off, and `tick()` runs a full one once as many
connections were removed since the last as are alive now (at least `floor`). The middle
generation is off too because what survives a young collection is nearly all connection state
that lives for seconds or minutes: collecting it again only traversed it once more, a 10-25 ms
pause every few thousand connections with shunting on (each pause lets shunts land late).
Garbage then never outgrows the live table (memory at most about twice the live connections'),
the cost per removed connection is bounded, and a steady link pays one pause per table
turnover instead of one per 25% of heap growth.
`max_interval` also bounds the time between two full collections for other cyclic garbage.

Removed connections no longer form cycles (the tracker breaks them at removal, so reference
counting frees them at once), so most full collections find almost nothing. The spacing adapts:
a collection that found under CYCLIC_PER_REMOVAL unreachable objects per connection removed
doubles the number of turnovers until the next one (up to MAX_SPACING); one that found more
(a policy or analyser leaving cycles again) sets it back to one turnover.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

YOUNG_THRESHOLD = 10_000   # allocations minus deallocations between two generation-0 runs
OLD_NEVER = 1 << 30        # generation-1 runs per automatic full run: never, tick() runs it
MIDDLE_NEVER = 1 << 30     # generation-0 runs per generation-1 run: never, tick() runs it
SLOW_PAUSE = 0.25          # seconds: a full collection longer than this is logged
CYCLIC_PER_REMOVAL = 0.5   # unreachable objects per removed connection below which cycles are rare
MAX_SPACING = 32           # table turnovers between two full collections, at most


class GcPacer:
    """Takes over full collections for one process; call `removed()` per connection logged
    and `tick()` from the main loop."""

    __slots__ = ("live", "floor", "max_interval", "pending", "next_due", "collections",
                 "spacing")

    def __init__(self, live: Callable[[], int], floor: int = 20_000,
                 max_interval: float = 600.0) -> None:
        self.live = live
        self.floor = floor
        self.max_interval = max_interval
        self.pending = 0
        self.collections = 0
        self.spacing = 1   # table turnovers between two full collections (adapts in collect())
        gc.collect()
        gc.freeze()
        gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_NEVER, OLD_NEVER)
        self.next_due = time.monotonic() + max_interval

    def removed(self) -> None:
        self.pending += 1

    def tick(self) -> None:
        due = self.pending // self.spacing
        if due >= self.floor and due >= self.live():
            self.collect()
        elif time.monotonic() >= self.next_due:
            self.collect()

    def collect(self) -> float:
        """One full collection now; returns its duration in seconds."""
        start = time.perf_counter()
        found = gc.collect()
        took = time.perf_counter() - start
        if found < CYCLIC_PER_REMOVAL * self.pending:
            self.spacing = min(self.spacing * 2, MAX_SPACING)
        else:
            self.spacing = 1
        self.pending = 0
        self.collections += 1
        self.next_due = time.monotonic() + self.max_interval
        if took > SLOW_PAUSE:
            log.info("full garbage collection took %.0f ms (%d connections alive)",
                     took * 1e3, self.live())
        return took
