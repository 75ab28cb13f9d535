"""Kernel capture drops in the log, not only in the metrics.

A dropped packet is one the analyser never saw: the operator must hear of it even without a
Prometheus scrape. The watch reads the rings' counters (`CaptureRing.stats()`, which the
metrics read too) every `check` seconds from the main loop: the first drop of an episode is a
warning at once, further drops at most one line per `every` seconds with their count, and an
info line when none came for `quiet` seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

CHECK_EVERY = 1.0    # seconds between two reads of the counters
REPORT_EVERY = 10.0  # seconds between two lines while drops go on
QUIET_AFTER = 60.0   # seconds without a drop that end an episode


class DropWatch:
    """Call `poll()` from the loop that reads the rings (cheap until `check` seconds passed)."""

    __slots__ = ("rings", "iface", "check", "every", "quiet", "clock", "_next_check", "_last",
                 "_episode", "_unreported", "_last_report", "_last_drop")

    def __init__(self, rings: Mapping[str, Any], iface: str, check: float = CHECK_EVERY,
                 every: float = REPORT_EVERY, quiet: float = QUIET_AFTER,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rings = rings
        self.iface = iface
        self.check, self.every, self.quiet, self.clock = check, every, quiet, clock
        self._next_check = clock() + check
        self._last = self._dropped()   # drops before the watch began are not news
        self._episode = 0              # drops in the current episode (0: none going on)
        self._unreported = 0
        self._last_report = self._last_drop = 0.0

    def _dropped(self) -> int:
        return sum(ring.stats().dropped for ring in self.rings.values())

    def poll(self, force: bool = False) -> None:
        now = self.clock()
        if now < self._next_check and not force:
            return
        self._next_check = now + self.check
        total = self._dropped()
        new, self._last = total - self._last, total
        if new:
            self._last_drop = now
            self._unreported += new
            if not self._episode:
                self._report(now, "the kernel dropped %d captured packets: the analyser is "
                             "behind (see shuntd_capture_lag_seconds); raise --ring-blocks for "
                             "bursts, --workers for sustained load", new)
            elif now - self._last_report >= self.every:
                self._report(now, "%d more captured packets dropped in the last %.0f s",
                             self._unreported, now - self._last_report)
            self._episode += new
        elif self._episode and now - self._last_drop >= self.quiet:
            if self._unreported:
                log.warning("capture on %s: %d more captured packets dropped", self.iface,
                            self._unreported)
            log.info("capture on %s: no drop for %.0f s (%d packets dropped in all since the "
                     "first)", self.iface, now - self._last_drop, self._episode)
            self._episode = self._unreported = 0

    def _report(self, now: float, msg: str, *args: Any) -> None:
        log.warning("capture on %s: " + msg, self.iface, *args)
        self._unreported = 0
        self._last_report = now
