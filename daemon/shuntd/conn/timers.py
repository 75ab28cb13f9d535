"""Timers in network time, dispatched as packets advance the clock (spec §5.4).

Offline, time only moves when a packet arrives: `advance(now)` fires every timer due at or
before `now` (at most `max_expires` per call; the rest fire on later calls, like Zeek's
max_timer_expires). At end of input `expire_all()` dispatches each pending timer once; only
timers scheduled with `at_termination=True` act then (Zeek's do_expire).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable


class Timer:
    """Handle of one scheduled callback; `cancel()` makes it a no-op."""

    __slots__ = ("when", "callback", "at_termination", "cancelled", "arg")

    def __init__(self, when: float, callback: Callable[..., None],
                 at_termination: bool, arg: object = None) -> None:
        self.when = when
        self.callback = callback
        self.at_termination = at_termination
        self.cancelled = False
        self.arg = arg  # if not None the callback is called as callback(arg, now)

    def cancel(self) -> None:
        self.cancelled = True


class TimerManager:
    """Priority queue of `Timer`s keyed by expiry time (ties fire in scheduling order)."""

    __slots__ = ("heap", "_counter", "max_expires", "now")

    def __init__(self, max_expires: int = 300) -> None:
        self.heap: list[tuple[float, int, Timer]] = []
        self._counter = 0
        self.max_expires = max_expires
        self.now = 0.0

    def schedule(self, when: float, callback: Callable[..., None],
                 at_termination: bool = False, arg: object = None) -> Timer:
        """Call `callback(now)` (or `callback(arg, now)` when `arg` is given) at `when`."""
        timer = Timer(when, callback, at_termination, arg)
        self._counter += 1
        heapq.heappush(self.heap, (when, self._counter, timer))
        return timer

    def __len__(self) -> int:
        return len(self.heap)

    def advance(self, now: float) -> int:
        """Fire timers due at `now`; returns how many fired."""
        if now > self.now:
            self.now = now
        heap = self.heap
        fired = 0
        while heap and heap[0][0] <= now and fired < self.max_expires:
            timer = heapq.heappop(heap)[2]
            if timer.cancelled:
                continue
            fired += 1
            if timer.arg is None:
                timer.callback(now)
            else:
                timer.callback(timer.arg, now)
        return fired

    def expire_all(self) -> None:
        """Termination: dispatch everything once; only `at_termination` timers act."""
        pending = sorted(self.heap)
        self.heap = []
        for _when, _n, timer in pending:
            # Timers scheduled by these callbacks are dropped: the run is ending.
            if timer.cancelled or not timer.at_termination:
                continue
            if timer.arg is None:
                timer.callback(self.now)
            else:
                timer.callback(timer.arg, self.now)
        self.heap = []
