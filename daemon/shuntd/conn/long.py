"""conn_long.log: records of connections still open past set durations (spec §9).

Semantics of corelight/zeek-long-connections: on new_connection a poll is scheduled after
`durations[0]`; when it runs (offline: at the first packet after that time, before the packet
is processed) it compares the connection's duration (last packet time - start) with
`durations[offset]`; if reached, the conn.log record as of now (live conn_state, duration,
sizes) is written to conn_long. The offset then advances whether or not a row was written,
and the next poll comes `durations[offset] - duration` later; after the last one, polling stops
unless `repeat_last_duration`. The final conn.log record is still written at removal.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from .polling import ConnPolling

STATE_KEY = "long_conn_offset"

DEFAULT_DURATIONS: tuple[float, ...] = (600.0, 1800.0, 3600.0, 43200.0, 86400.0, 259200.0)


@dataclasses.dataclass
class LongConnSettings:
    """LongConnection:: options."""

    durations: tuple[float, ...] = DEFAULT_DURATIONS
    repeat_last_duration: bool = False
    # special_cases: subnet -> durations; orig_h is looked up first, then resp_h.
    special_cases: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.durations = _checked(self.durations)
        self.special_cases = {k: _checked(v) for k, v in self.special_cases.items()}


def _checked(durations: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(d) for d in durations)
    if not values or any(d <= 0 for d in values) or list(values) != sorted(values):
        raise ValueError(f"long-connection durations must be positive and ascending: {values}")
    return values


def parse_durations(text: str) -> tuple[float, ...]:
    """'10min,30min,1h,12h,24h,3d' or plain seconds -> seconds (for the command line)."""
    units = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "hr": 3600.0,
             "hrs": 3600.0, "d": 86400.0, "day": 86400.0, "days": 86400.0}
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        num = item.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = item[len(num):] or "s"
        if unit not in units:
            raise ValueError(f"bad duration {item!r}: unit must be one of {sorted(units)}")
        try:
            out.append(float(num) * units[unit])
        except ValueError:
            raise ValueError(f"bad duration {item!r}") from None
    return _checked(out)


class _FirstPolls:
    """The first polls of one first duration, due in creation order.

    Nearly every connection ends long before its first poll, so these are not timers: one
    dict entry each (dropped at removal), and one timer for the earliest."""

    __slots__ = ("first", "pending", "timer")

    def __init__(self, first: float) -> None:
        self.first = first
        self.pending: OrderedDict[Any, float] = OrderedDict()   # connection -> due time
        self.timer: Any = None   # the timer of the earliest due time, if scheduled


class LongConnections:
    """Writes conn_long rows via `write_row(record(conn))`; `found(conn)` is told too."""

    __slots__ = ("settings", "polling", "record", "write_row", "found", "_special", "_first",
                 "_only")

    def __init__(self, settings: LongConnSettings, polling: ConnPolling,
                 record: Callable[[Any], tuple], write_row: Callable[[tuple], None],
                 found: Callable[[Any], None] | None = None) -> None:
        self.settings = settings
        self.polling = polling
        self.record = record
        self.write_row = write_row
        self.found = found
        self._special = [(ipaddress.ip_network(net, strict=False), d)
                         for net, d in settings.special_cases.items()]
        self._first: dict[float, _FirstPolls] = {}   # first duration -> its queue
        # Without special cases every connection has the same first duration: its queue.
        self._only: _FirstPolls | None = None
        if not self._special:
            self._only = self._first[settings.durations[0]] = _FirstPolls(settings.durations[0])

    def new_connection(self, conn: Any) -> None:
        """Queue the first poll (`durations[0]` from now); it runs as `ConnPolling` would
        run a watched one, and later polls are watched."""
        queue = self._only
        if queue is None:
            first = self._durations(conn)[0]
            queue = self._first.get(first)
            if queue is None:
                queue = self._first[first] = _FirstPolls(first)
        timers = self.polling.timers
        when = timers.now + queue.first
        queue.pending[conn] = when
        if queue.timer is None:
            queue.timer = timers.schedule(when, self._first_due, at_termination=True,
                                          arg=queue)

    def forget(self, conn: Any) -> None:
        """A removed connection's first poll will not run (nor hold the connection)."""
        queue = self._only
        if queue is not None:
            if queue.pending.pop(conn, None) is not None and not queue.pending:
                if queue.timer is not None:
                    self.polling.timers.cancel(queue.timer)   # nothing left to wait for
                    queue.timer = None
            return
        for queue in self._first.values():
            if queue.pending.pop(conn, None) is not None:
                if not queue.pending and queue.timer is not None:
                    self.polling.timers.cancel(queue.timer)   # nothing left to wait for
                    queue.timer = None
                return

    def _first_due(self, queue: _FirstPolls, now: float) -> None:
        """Run the earliest first poll if due, then wait for the next one. At end of input
        (now before the due time) every pending one runs once, as pending polls do."""
        pending = queue.pending
        due = queue.timer.when
        queue.timer = None
        if now < due:
            for conn, when in list(pending.items()):
                # Shorter than the first duration: the poll would only note that it ran.
                if conn.last_time - conn.start_time >= queue.first:
                    self._run_first(conn, when, now)
            pending.clear()
            return
        if pending:
            conn, when = next(iter(pending.items()))
            if when <= now:   # else it was removed: the next one is later
                del pending[conn]
                self._run_first(conn, when, now)
        if pending and queue.timer is None:
            when = next(iter(pending.values()))
            queue.timer = self.polling.timers.schedule(when, self._first_due,
                                                       at_termination=True, arg=queue)

    def _run_first(self, conn: Any, when: float, now: float) -> None:
        ext = conn.ext
        if ext is None:
            conn.ext = ext = {}
        ext[STATE_KEY] = 0
        self.polling.run_due(conn, self._callback, 1, when, now)

    def _durations(self, conn: Any) -> tuple[float, ...]:
        if self._special:
            for addr in (conn.orig_h, conn.resp_h):
                ip = ipaddress.ip_address(bytes(addr) if not isinstance(addr, str) else addr)
                for net, durations in self._special:
                    if ip.version == net.version and ip in net:
                        return durations
        return self.settings.durations

    def _callback(self, conn: Any, cnt: int) -> float:
        durations = self._durations(conn)
        offset = conn.ext[STATE_KEY]
        duration = conn.last_time - conn.start_time
        if offset >= len(durations):          # repeating the last duration
            offset = len(durations) - 1
        if duration >= durations[offset]:
            self.write_row(self.record(conn))
            if self.found is not None:
                self.found(conn)
        offset += 1
        conn.ext[STATE_KEY] = offset
        if offset < len(durations):
            return durations[offset] - duration
        if self.settings.repeat_last_duration:
            return durations[-1]
        return -1.0
