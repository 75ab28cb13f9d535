"""ConnThreshold: bytes/packets per direction and duration thresholds (spec §7).

Zeek semantics kept: "bytes" are IP-level bytes (ConnSize's num_bytes_ip), crossing tests are
`>=` for bytes/packets and strictly `>` for duration (`network_time - start_time`), a threshold
already crossed when set fires at once, only the smallest pending threshold per kind/direction
is checked, and after it fires the next smallest is installed (and checked) immediately.
Generic packet thresholds fire when `orig_pkts + resp_pkts == n`, each once, ascending.

State per connection lives in the connection's `thresholds` slot (None until one is set).
A policy such as `bulk` sets a packets threshold on EVERY connection, and most connections
never reach it: so the smallest pending bytes and packets threshold of each direction is a
plain int in one small object (setting one costs that object, the per-packet check two
compares), and anything more (a second threshold of the same kind and direction, durations,
generic thresholds) lives in `ConnThresholds.more`, made when first needed.
Setting a packets threshold on both directions of a connection that has none yet (the bulk
policy, on every connection) makes no object at all: the connection shares one read-only
`ConnThresholds` per value with every other such connection, and gets its own copy the first
time anything changes (a crossing, another threshold). Every change goes through `_own`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

BYTES = "bytes"
PACKETS = "packets"
DURATION = "duration"

_NEVER = 1 << 62  # the limit of a direction with no threshold pending

# fire(kind, conn, threshold, is_orig); kind is BYTES / PACKETS / DURATION
FireCallback = Callable[[str, Any, float, bool], None]
GenericCallback = Callable[[Any, int], None]


class ConnThresholds:
    """Pending thresholds of one connection: the smallest of each kind and direction as an
    int (`_NEVER` when none); the rest in `more`."""

    __slots__ = ("next_bytes_orig", "next_bytes_resp", "next_pkts_orig", "next_pkts_resp",
                 "more", "shared")

    def __init__(self, pkts: int = _NEVER, shared: bool = False) -> None:
        self.next_bytes_orig = self.next_bytes_resp = _NEVER
        self.next_pkts_orig = self.next_pkts_resp = pkts
        self.more: MoreThresholds | None = None
        # Read-only, shared by connections (ThresholdManager.set_packets_thresholds): never
        # changed in place; `_own` gives the connection a copy first.
        self.shared = shared

    def add(self, name: str, value: int) -> None:
        """Install `value` as pending threshold `name` (e.g. "pkts_orig"). Pending values are a
        set, as in Zeek's ConnThreshold: setting one that is pending already changes nothing."""
        attr = "next_" + name
        nxt = getattr(self, attr)
        if nxt == _NEVER:
            setattr(self, attr, value)
            return
        if value == nxt:
            return
        later: list[int] = getattr(self._more(), name)
        if value < nxt:
            later.insert(0, nxt)
            setattr(self, attr, value)
        else:
            i = bisect.bisect_left(later, value)
            if i == len(later) or later[i] != value:
                later.insert(i, value)

    def advance(self, name: str) -> int:
        """Remove the smallest pending threshold `name` (returned); install the next one."""
        attr = "next_" + name
        value: int = getattr(self, attr)
        later = getattr(self.more, name) if self.more is not None else None
        setattr(self, attr, later.pop(0) if later else _NEVER)
        return value

    def remove(self, name: str, value: float) -> bool:
        if getattr(self, "next_" + name) == value:
            self.advance(name)
            return True
        later = getattr(self.more, name) if self.more is not None else None
        if later and value in later:
            later.remove(value)
            return True
        return False

    def _more(self) -> MoreThresholds:
        more = self.more
        if more is None:
            more = self.more = MoreThresholds()
        return more


def _own(conn: Any) -> ConnThresholds:
    """`conn`'s thresholds, made or copied from the shared state so they can be changed."""
    st = conn.thresholds
    if st is None:
        st = conn.thresholds = ConnThresholds()
    elif st.shared:
        # Shared states only ever hold the two packets thresholds (nothing in `more`).
        st = conn.thresholds = ConnThresholds(st.next_pkts_orig)
    return st


class MoreThresholds:
    """What few connections have: further pending thresholds beyond the smallest of their
    kind and direction (sorted), durations (sorted) and the generic thresholds' index."""

    __slots__ = ("bytes_orig", "bytes_resp", "pkts_orig", "pkts_resp", "duration",
                 "generic_next")

    def __init__(self) -> None:
        self.bytes_orig: list[int] = []
        self.bytes_resp: list[int] = []
        self.pkts_orig: list[int] = []
        self.pkts_resp: list[int] = []
        self.duration: list[float] = []
        self.generic_next = 0          # index of the next generic packet threshold


class ThresholdManager:
    """Sets, checks and fires thresholds; `fire` receives every crossing."""

    __slots__ = ("fire", "fire_generic", "generic", "_shared")

    def __init__(self, fire: FireCallback, fire_generic: GenericCallback | None = None,
                 generic_packet_thresholds: Sequence[int] = ()) -> None:
        self.fire = fire
        self.fire_generic = fire_generic
        self.generic = sorted(set(int(n) for n in generic_packet_thresholds))
        # The shared read-only states of set_packets_thresholds, by threshold.
        self._shared: dict[int, ConnThresholds] = {}

    # -- API for policies --------------------------------------------------------------

    def set_bytes_threshold(self, conn: Any, threshold: int, is_orig: bool) -> bool:
        """IP-level bytes sent by that direction; False for 0 (rejected, like Zeek)."""
        if threshold <= 0:
            return False
        threshold = int(threshold)
        st = conn.thresholds
        if st is None or st.shared:
            st = _own(conn)
        # _check_if_due inline (the bulk policy sets two on every connection it watches)
        if is_orig:
            if st.next_bytes_orig == _NEVER:   # the common case (bulk: one per direction)
                st.next_bytes_orig = threshold
            else:
                st.add("bytes_orig", threshold)
            ep = conn.side1 if conn.orig_side else conn.side0
            if ep.num_bytes_ip >= st.next_bytes_orig or ep.num_pkts >= st.next_pkts_orig:
                self._check_direction(conn, st, True)
        else:
            if st.next_bytes_resp == _NEVER:
                st.next_bytes_resp = threshold
            else:
                st.add("bytes_resp", threshold)
            ep = conn.side0 if conn.orig_side else conn.side1
            if ep.num_bytes_ip >= st.next_bytes_resp or ep.num_pkts >= st.next_pkts_resp:
                self._check_direction(conn, st, False)
        return True

    def set_packets_threshold(self, conn: Any, threshold: int, is_orig: bool) -> bool:
        if threshold <= 0:
            return False
        threshold = int(threshold)
        st = conn.thresholds
        if st is None or st.shared:
            st = _own(conn)
        # The common case (no packets threshold pending in this direction) inline; a bytes
        # threshold pending here is not due (it would have fired when set or counted).
        if is_orig:
            if st.next_pkts_orig == _NEVER:
                st.next_pkts_orig = threshold
                ep = conn.side1 if conn.orig_side else conn.side0
                if ep.num_pkts >= threshold:
                    self._check_direction(conn, st, True)
                return True
            st.add("pkts_orig", threshold)
        else:
            if st.next_pkts_resp == _NEVER:
                st.next_pkts_resp = threshold
                ep = conn.side0 if conn.orig_side else conn.side1
                if ep.num_pkts >= threshold:
                    self._check_direction(conn, st, False)
                return True
            st.add("pkts_resp", threshold)
        self._check_if_due(conn, st, is_orig)
        return True

    def set_packets_thresholds(self, conn: Any, threshold: int) -> bool:
        """set_packets_threshold for both directions (orig first), as the bulk policy does
        on every connection: on one with no thresholds and fewer packets than `threshold`
        in each direction, nothing can fire, and it shares a read-only state."""
        if threshold > 0 and conn.thresholds is None:
            n = int(threshold)
            if conn.side0.num_pkts < n and conn.side1.num_pkts < n:
                st = self._shared.get(n)
                if st is None:
                    st = self._shared[n] = ConnThresholds(n, shared=True)
                conn.thresholds = st
                return True
        a = self.set_packets_threshold(conn, threshold, True)
        b = self.set_packets_threshold(conn, threshold, False)
        return a or b

    def set_duration_threshold(self, conn: Any, seconds: float, now: float | None = None) -> bool:
        """Fires on the first counted packet with `now - start_time > seconds`; a threshold
        already exceeded at `now` (default: the connection's last packet) fires at once."""
        if seconds <= 0:
            return False
        pending = _own(conn)._more().duration
        bisect.insort(pending, float(seconds))
        self._check_duration(conn, pending, conn.last_time if now is None else now)
        return True

    def delete_bytes_threshold(self, conn: Any, threshold: int, is_orig: bool) -> bool:
        return self._delete(conn, "bytes_orig" if is_orig else "bytes_resp", threshold)

    def delete_packets_threshold(self, conn: Any, threshold: int, is_orig: bool) -> bool:
        return self._delete(conn, "pkts_orig" if is_orig else "pkts_resp", threshold)

    def delete_duration_threshold(self, conn: Any, seconds: float) -> bool:
        st = conn.thresholds  # (a shared state has no durations: nothing changed here)
        pending = st.more.duration if st is not None and st.more is not None else None
        if pending and seconds in pending:
            pending.remove(seconds)
            return True
        return False

    # -- engine entry point ----------------------------------------------------------------

    def packet(self, conn: Any, pkt: Any, is_orig: bool) -> None:
        """After packet `pkt` was counted for `is_orig` (the engine's `packet` hook)."""
        st = conn.thresholds
        if st is not None:
            # conn.orig / conn.resp without the property calls
            if is_orig:
                ep = conn.side1 if conn.orig_side else conn.side0
                if ep.num_bytes_ip >= st.next_bytes_orig or ep.num_pkts >= st.next_pkts_orig:
                    st = self._check_direction(conn, st, True)
            else:
                ep = conn.side0 if conn.orig_side else conn.side1
                if ep.num_bytes_ip >= st.next_bytes_resp or ep.num_pkts >= st.next_pkts_resp:
                    st = self._check_direction(conn, st, False)
            if st.more is not None:
                more = st.more
                if more.duration:
                    self._check_duration(conn, more.duration, pkt.ts)
        if self.generic:
            self._check_generic(conn)

    # -- internals -----------------------------------------------------------------------

    def _check_if_due(self, conn: Any, st: ConnThresholds, is_orig: bool) -> None:
        """_check_direction, only called when a limit says it has something to do."""
        if is_orig:
            ep = conn.side1 if conn.orig_side else conn.side0
            due = ep.num_bytes_ip >= st.next_bytes_orig or ep.num_pkts >= st.next_pkts_orig
        else:
            ep = conn.side0 if conn.orig_side else conn.side1
            due = ep.num_bytes_ip >= st.next_bytes_resp or ep.num_pkts >= st.next_pkts_resp
        if due:
            self._check_direction(conn, st, is_orig)

    def _check_direction(self, conn: Any, st: ConnThresholds, is_orig: bool) -> ConnThresholds:
        """Fire what the direction has crossed: bytes, then packets, each ascending.
        Returns the connection's state (its own copy, if `st` was shared)."""
        if st.shared:
            st = _own(conn)
        fire = self.fire
        side1 = conn.orig_side if is_orig else not conn.orig_side  # conn.orig / conn.resp
        endpoint = conn.side1 if side1 else conn.side0
        if is_orig:
            while endpoint.num_bytes_ip >= st.next_bytes_orig:
                fire(BYTES, conn, st.advance("bytes_orig"), True)
            while endpoint.num_pkts >= st.next_pkts_orig:
                fire(PACKETS, conn, st.advance("pkts_orig"), True)
        else:
            while endpoint.num_bytes_ip >= st.next_bytes_resp:
                fire(BYTES, conn, st.advance("bytes_resp"), False)
            while endpoint.num_pkts >= st.next_pkts_resp:
                fire(PACKETS, conn, st.advance("pkts_resp"), False)
        return st

    def _check_duration(self, conn: Any, pending: list[float], now: float) -> None:
        while pending and now - conn.start_time > pending[0]:
            # Zeek reports duration crossings with is_orig of the packet; no direction here.
            self.fire(DURATION, conn, pending.pop(0), True)

    def _check_generic(self, conn: Any) -> None:
        more = _own(conn)._more()
        total = conn.orig.num_pkts + conn.resp.num_pkts
        generic = self.generic
        while more.generic_next < len(generic) and generic[more.generic_next] <= total:
            n = generic[more.generic_next]
            more.generic_next += 1
            if n == total and self.fire_generic is not None:
                self.fire_generic(conn, n)

    @staticmethod
    def _delete(conn: Any, name: str, value: float) -> bool:
        if conn.thresholds is None:
            return False
        return _own(conn).remove(name, value)
