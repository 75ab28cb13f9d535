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


POLLS_KEY = "_polls"  # conn.ext: the connection's pending polls, cancelled by `forget`


class _Poll:
    __slots__ = ("conn", "callback", "cnt", "when", "timer")

    def __init__(self, conn: Any, callback: PollCallback, cnt: int, when: float) -> None:
        self.conn = conn
        self.callback = callback
        self.cnt = cnt
        self.when = when
        self.timer: Any = None


class ConnPolling:
    """Schedules polls on a `TimerManager` (`schedule(when, cb, at_termination)`, `now`)."""

    __slots__ = ("timers",)

    def __init__(self, timers: Any) -> None:
        self.timers = timers

    def watch(self, conn: Any, callback: PollCallback, cnt: int, interval: float) -> None:
        when = self.timers.now + max(0.0, float(interval))
        poll = _Poll(conn, callback, cnt, when)
        poll.timer = self.timers.schedule(when, self._check, at_termination=True, arg=poll)
        self._register(conn, poll)

    def run_due(self, conn: Any, callback: PollCallback, cnt: int, when: float,
                now: float) -> None:
        """Run, at `now`, a poll due at `when` that its owner kept until then instead of
        `watch`ing it (conn_long.log's first poll of every connection): from here on it is
        an ordinary poll (re-armed or stopped by the callback's answer)."""
        poll = _Poll(conn, callback, cnt, when)
        self._register(conn, poll)
        self._check(poll, now)

    @staticmethod
    def _register(conn: Any, poll: _Poll) -> None:
        ext = conn.ext
        if ext is None:
            conn.ext = {POLLS_KEY: [poll]}
            return
        polls = ext.get(POLLS_KEY)
        if polls is None:
            ext[POLLS_KEY] = [poll]
        else:
            polls.append(poll)

    def forget(self, conn: Any) -> None:
        """Cancel the polls of a removed connection. A poll would stop silently when it ran
        anyway, but its pending timer would keep the whole connection in memory until then
        (conn_long.log's first poll is 10 minutes away: bench/soak.py found it)."""
        polls = conn.ext.pop(POLLS_KEY, None) if conn.ext else None
        for poll in polls or ():
            if poll.timer is not None:
                self.timers.cancel(poll.timer)
                poll.timer = None

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
        poll.timer = self.timers.schedule(poll.when, self._check, at_termination=True,
                                          arg=poll)
