"""Timers in network time, dispatched as packets advance the clock (spec §5.4).

Offline, time only moves when a packet arrives: `advance(now)` fires every timer due at or
before `now` (at most `max_expires` per call; the rest fire on later calls, like Zeek's
max_timer_expires). At end of input `expire_all()` dispatches each pending timer once; only
timers scheduled with `at_termination=True` act then (Zeek's do_expire).

Every connection owns a few timers, so a timer is kept small and cheap to make: the heap entry
*is* the handle, a list `[when, seq, callback, arg, at_termination]` (one object instead of a
tuple plus a handle object). The heap orders entries by (when, seq); `seq` is unique, so the
other fields are never compared. Cancelled entries stay in the heap until popped, unless
`TimerManager.cancel()` sees that they have become a large share of it: then the heap is
rebuilt without them (same firing order, since (when, seq) orders entries totally). Every
TCP connection cancels at least one timer, so without this the heap keeps dead weight.
An entry not acting at termination leaves out that last field (16 B less per connection's
entry, after the allocator's rounding).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

_WHEN, _SEQ, _CALLBACK, _ARG, _AT_TERMINATION = range(5)
_COMPACT_MIN = 1024  # below this many cancelled entries, never bother rebuilding


class Timer(list):
    """Handle of one scheduled callback (also its heap entry); `cancel()` makes it a no-op."""

    __slots__ = ()

    @property
    def when(self) -> float:
        return self[_WHEN]

    @property
    def cancelled(self) -> bool:
        """True once cancelled or fired (no longer pending)."""
        return self[_CALLBACK] is None

    def cancel(self) -> None:
        self[_CALLBACK] = None
        self[_ARG] = None  # a cancelled entry must not keep its connection alive in the heap


class TimerManager:
    """Priority queue of `Timer`s keyed by expiry time (ties fire in scheduling order)."""

    __slots__ = ("heap", "_counter", "max_expires", "now", "_cancelled")

    def __init__(self, max_expires: int = 300) -> None:
        self.heap: list[Timer] = []
        self._counter = 0
        self.max_expires = max_expires
        self.now = 0.0
        self._cancelled = 0   # cancelled entries (an estimate) still in the heap

    def cancel(self, timer: Timer) -> None:
        """Cancel `timer` and drop cancelled entries once they are 1/8 of the heap."""
        if timer[_CALLBACK] is None:
            return
        timer[_CALLBACK] = None
        timer[_ARG] = None  # a cancelled entry must not keep its connection alive in the heap
        self._cancelled += 1
        heap = self.heap
        if self._cancelled > _COMPACT_MIN and self._cancelled * 8 > len(heap):
            heap[:] = [t for t in heap if t[_CALLBACK] is not None]
            heapq.heapify(heap)
            self._cancelled = 0

    def schedule(self, when: float, callback: Callable[..., None],
                 at_termination: bool = False, arg: object = None) -> Timer:
        """Call `callback(now)` (or `callback(arg, now)` when `arg` is given) at `when`."""
        self._counter += 1
        if at_termination:
            timer = Timer((when, self._counter, callback, arg, True))
        else:
            timer = Timer((when, self._counter, callback, arg))
        heapq.heappush(self.heap, timer)
        return timer

    def __len__(self) -> int:
        return len(self.heap)

    def advance(self, now: float) -> int:
        """Fire timers due at `now`; returns how many fired."""
        if now > self.now:
            self.now = now
        heap = self.heap
        pop = heapq.heappop
        fired = 0
        while heap and heap[0][0] <= now and fired < self.max_expires:
            timer = pop(heap)
            callback = timer[_CALLBACK]
            if callback is None:
                continue
            timer[_CALLBACK] = None   # no longer pending: a later cancel() is a no-op
            arg = timer[_ARG]
            fired += 1
            if arg is None:
                callback(now)
            else:
                callback(arg, now)
        return fired

    def expire_all(self) -> None:
        """Termination: dispatch everything once; only `at_termination` timers act."""
        pending = sorted(self.heap)
        self.heap.clear()   # same list object: the tracker peeks at it on every packet
        for timer in pending:
            # Timers scheduled by these callbacks are dropped: the run is ending.
            callback = timer[_CALLBACK]
            if callback is None or len(timer) == _AT_TERMINATION:  # not at termination
                continue
            arg = timer[_ARG]
            if arg is None:
                callback(self.now)
            else:
                callback(arg, self.now)
        self.heap.clear()
