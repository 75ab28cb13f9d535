"""Timers in network time, dispatched as packets advance the clock (spec §5.4).

Offline, time only moves when a packet arrives: `advance(now)` fires every timer due at or
before `now` (at most `max_expires` per call; the rest fire on later calls, like Zeek's
max_timer_expires). At end of input `expire_all()` dispatches each pending timer once; only
timers scheduled with `at_termination=True` act then (Zeek's do_expire).

Timers fire in the order of one priority queue keyed by (when, scheduling order). Every open
connection has a timer pending, so they are kept in two tiers to spend little memory:

* timers due in the current time slot (`SLOTS_PER_SECOND` slots a second) or before are
  `Timer` lists `[when, seq, callback, arg(, at_termination)]` in a heap ordered by
  (when, seq); `seq` is unique, so the other fields are never compared;
* later timers wait in one dict per slot, in scheduling order, with no seq yet: a `Timer`, or
  an *owner* (a connection) with its single deadline (`set_deadline`), which then costs one
  dict entry instead of a Timer list, its seq int and a heap slot (about 90 B).

When the clock reaches a slot, its entries move into the heap in dict order and get their
seq numbers then. This keeps the one-queue order: every entry of a later slot is due after
every entry of the heap, and within a slot the dict holds scheduling order (re-setting a
deadline moves the owner to the end, as a new timer would be). Cancelled heap entries stay
in the heap until popped, unless `TimerManager.cancel()` sees that they have become a large
share of it: then the heap is rebuilt without them (same firing order).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from math import floor
from typing import Any

_WHEN, _SEQ, _CALLBACK, _ARG, _AT_TERMINATION = range(5)
_COMPACT_MIN = 1024  # below this many cancelled entries, never bother rebuilding
SLOTS_PER_SECOND = 8  # a power of two: slot boundaries are exact in binary floats
_LAST_SLOT = 1 << 62  # where timers due at infinity (or absurdly late) wait
_INF = float("inf")


def _slot(when: float) -> int:
    """The slot of a due time: floor(when * SLOTS_PER_SECOND)."""
    s = when * SLOTS_PER_SECOND
    return floor(s) if s < _LAST_SLOT else _LAST_SLOT


class Timer(list):
    """Handle of one scheduled callback (also its heap entry); `cancel()` makes it a no-op."""

    __slots__ = ()
    __hash__ = object.__hash__  # a dict key by identity while it waits in a slot

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
    """Timers keyed by expiry time (ties fire in scheduling order), and one deadline per
    owner object that calls `on_deadline(owner, now)`."""

    __slots__ = ("heap", "_counter", "max_expires", "now", "_cancelled", "_slots",
                 "_slot_heap", "_cur", "wake_at", "on_deadline", "_active", "_fire")

    def __init__(self, max_expires: int = 300,
                 on_deadline: Callable[[Any, float], None] | None = None) -> None:
        self.heap: list[Timer] = []
        self._counter = 0
        self.max_expires = max_expires
        self.now = 0.0
        self._cancelled = 0   # cancelled entries (an estimate) still in the heap
        # Later slots: slot number -> {Timer or owner: when} (possibly empty), and a heap of
        # their numbers.
        self._slots: dict[int, dict[Any, float]] = {}
        self._slot_heap: list[int] = []
        self._cur = -_LAST_SLOT   # slots up to this one have been moved into the heap
        # Start time of the earliest waiting slot: `advance` must run once now reaches it.
        self.wake_at = _INF
        self.on_deadline = on_deadline
        self._active: dict[Any, Timer] = {}   # owner -> its deadline's entry in the heap
        # The callback of every deadline entry: one bound method, known by identity.
        self._fire = self._fire_deadline

    # --- scheduling ----------------------------------------------------------------------------
    def _wait(self, k: int, entry: Any, when: float) -> None:
        """Put `entry` in the dict of the later slot `k`."""
        slot = self._slots.get(k)
        if slot is None:
            slot = self._slots[k] = {}
            heapq.heappush(self._slot_heap, k)
            start = k / SLOTS_PER_SECOND
            if start < self.wake_at:
                self.wake_at = start
        slot[entry] = when

    def _unwait(self, k: int, entry: Any) -> None:
        slot = self._slots.get(k)
        if slot is not None and slot.pop(entry, None) is not None and not slot:
            # A dict keeps its table when emptied: a new empty one frees it. The slot stays
            # (its number is in _slot_heap once, however often it empties and refills).
            self._slots[k] = {}

    def _push(self, timer: Timer) -> None:
        self._counter += 1
        timer[_SEQ] = self._counter
        heapq.heappush(self.heap, timer)

    def schedule(self, when: float, callback: Callable[..., None],
                 at_termination: bool = False, arg: object = None) -> Timer:
        """Call `callback(now)` (or `callback(arg, now)` when `arg` is given) at `when`."""
        if at_termination:
            timer = Timer((when, 0, callback, arg, True))
        else:
            timer = Timer((when, 0, callback, arg))
        k = _slot(when)
        if k <= self._cur:
            self._push(timer)
        else:
            self._wait(k, timer, when)
        return timer

    def cancel(self, timer: Timer) -> None:
        """Cancel `timer` and drop cancelled entries once they are 1/8 of the heap."""
        if timer[_CALLBACK] is None:
            return
        timer[_CALLBACK] = None
        timer[_ARG] = None  # a cancelled entry must not keep its connection alive in the heap
        k = _slot(timer[_WHEN])
        if k > self._cur:
            self._unwait(k, timer)
            return
        self._cancelled += 1
        heap = self.heap
        if self._cancelled > _COMPACT_MIN and self._cancelled * 8 > len(heap):
            heap[:] = [t for t in heap if t[_CALLBACK] is not None]
            heapq.heapify(heap)
            self._cancelled = 0

    def set_deadline(self, owner: Any, when: float) -> None:
        """Call `on_deadline(owner, now)` at `when`. An owner has at most one deadline:
        `clear_deadline` the pending one first. (Every connection sets one or two: _slot,
        _wait and _push_deadline are inline.)"""
        s = when * SLOTS_PER_SECOND
        k = floor(s) if s < _LAST_SLOT else _LAST_SLOT
        if k <= self._cur:
            self._counter = seq = self._counter + 1
            timer = Timer((when, seq, self._fire, owner))
            self._active[owner] = timer
            heapq.heappush(self.heap, timer)
            return
        slot = self._slots.get(k)
        if slot is None:
            self._wait(k, owner, when)
        else:
            slot[owner] = when

    def clear_deadline(self, owner: Any, when: float) -> None:
        """Cancel the deadline `owner` has pending at `when`."""
        s = when * SLOTS_PER_SECOND
        k = floor(s) if s < _LAST_SLOT else _LAST_SLOT
        if k > self._cur:
            self._unwait(k, owner)
            return
        timer = self._active.pop(owner, None)
        if timer is not None:
            self.cancel(timer)

    def _fire_deadline(self, owner: Any, now: float) -> None:
        del self._active[owner]
        self.on_deadline(owner, now)  # type: ignore[misc]

    # --- inspection ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.heap) + sum(len(slot) for slot in self._slots.values())

    def pending(self) -> Iterator[tuple[float, Callable[..., None], Any]]:
        """(when, callback, arg) of every pending timer and deadline, in no set order."""
        for timer in self.heap:
            if timer[_CALLBACK] is not None:
                yield timer[_WHEN], timer[_CALLBACK], timer[_ARG]
        for slot in self._slots.values():
            for entry, when in slot.items():
                if type(entry) is not Timer:
                    yield when, self.on_deadline, entry  # type: ignore[misc]
                elif entry[_CALLBACK] is not None:
                    yield when, entry[_CALLBACK], entry[_ARG]

    # --- firing --------------------------------------------------------------------------------
    def _reach(self, now: float) -> None:
        """Move the entries of every slot up to `now`'s into the heap."""
        k_now = _slot(now)
        if k_now <= self._cur:
            return
        self._cur = k_now
        slots = self._slots
        keys = self._slot_heap
        heap = self.heap
        push = heapq.heappush
        active = self._active
        fire = self._fire
        seq = self._counter
        while keys and keys[0] <= k_now:
            slot = slots.pop(heapq.heappop(keys))
            for entry, when in slot.items():
                seq += 1
                if type(entry) is not Timer:   # an owner's deadline
                    timer = Timer((when, seq, fire, entry))
                    active[entry] = timer
                    push(heap, timer)
                elif entry[_CALLBACK] is not None:   # (cancelled by Timer.cancel())
                    entry[_SEQ] = seq
                    push(heap, entry)
        self._counter = seq
        self.wake_at = keys[0] / SLOTS_PER_SECOND if keys else _INF

    def advance(self, now: float) -> int:
        """Fire timers due at `now`; returns how many fired."""
        if now > self.now:
            self.now = now
        self._reach(now)
        heap = self.heap
        pop = heapq.heappop
        fire = self._fire
        fired = 0
        while heap and heap[0][0] <= now and fired < self.max_expires:
            timer = pop(heap)
            callback = timer[_CALLBACK]
            if callback is None:
                continue
            timer[_CALLBACK] = None   # no longer pending: a later cancel() is a no-op
            arg = timer[_ARG]
            fired += 1
            if callback is fire:   # _fire_deadline, inline
                del self._active[arg]
                self.on_deadline(arg, now)  # type: ignore[misc]
            elif arg is None:
                callback(now)
            else:
                callback(arg, now)
        return fired

    def expire_all(self) -> None:
        """Termination: dispatch everything once; only `at_termination` timers act."""
        pending = sorted(self.heap)
        for k in sorted(self._slots):
            # Stable sort by due time: ties keep the slot's scheduling order.
            for entry, _when in sorted(self._slots[k].items(), key=lambda item: item[1]):
                if type(entry) is Timer:   # deadlines never act at termination
                    pending.append(entry)
        self.heap.clear()   # same list object: the tracker peeks at it on every packet
        self._slots.clear()
        self._slot_heap.clear()
        self._active.clear()
        self.wake_at = _INF
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
        self._slots.clear()
        self._slot_heap.clear()
        self._active.clear()
        self.wake_at = _INF
