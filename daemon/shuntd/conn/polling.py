"""ConnPolling: call a function on a connection repeatedly, in network time (spec §7).

`watch(conn, callback, cnt, interval)` runs `callback(conn, cnt)` after `interval` seconds of
network time; the callback returns the next interval (then `cnt + 1`) or a negative number to
stop. A poll for a connection already removed stops silently. Polls pending at end of input
run once (Zeek dispatches scheduled events at termination) and do not re-arm. A callback
that raises is logged and its polling stops: the engine never dies of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

PollCallback = Callable[[Any, int], float]


class _Poll:
    __slots__ = ("conn", "callback", "cnt", "when")

    def __init__(self, conn: Any, callback: PollCallback, cnt: int, when: float) -> None:
        self.conn = conn
        self.callback = callback
        self.cnt = cnt
        self.when = when


class ConnPolling:
    """Schedules polls on a `TimerManager` (`schedule(when, cb, at_termination)`, `now`)."""

    __slots__ = ("timers",)

    def __init__(self, timers: Any) -> None:
        self.timers = timers

    def watch(self, conn: Any, callback: PollCallback, cnt: int, interval: float) -> None:
        when = self.timers.now + max(0.0, float(interval))
        poll = _Poll(conn, callback, cnt, when)
        self.timers.schedule(when, lambda now: self._check(poll, now), at_termination=True)

    def _check(self, poll: _Poll, now: float) -> None:
        conn = poll.conn
        if conn.removed:
            return
        # The timer manager runs due timers with now >= when; a poll run with now < when is
        # the end-of-input dispatch: run the callback once, do not re-arm.
        terminating = now < poll.when
        try:
            interval = poll.callback(conn, poll.cnt)
        except Exception:
            log.exception("connection poll %r on %s failed; polling stopped",
                          getattr(poll.callback, "__name__", poll.callback),
                          getattr(conn, "uid", conn))
            return
        if terminating or interval is None or interval < 0:
            return
        poll.cnt += 1
        poll.when = now + interval
        self.timers.schedule(poll.when, lambda t: self._check(poll, t), at_termination=True)
