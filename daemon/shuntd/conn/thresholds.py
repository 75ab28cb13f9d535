"""ConnThreshold: bytes/packets per direction and duration thresholds (spec §7).

Zeek semantics kept: "bytes" are IP-level bytes (ConnSize's num_bytes_ip), crossing tests are
`>=` for bytes/packets and strictly `>` for duration (`network_time - start_time`), a threshold
already crossed when set fires at once, only the smallest pending threshold per kind/direction
is checked, and after it fires the next smallest is installed (and checked) immediately.
Generic packet thresholds fire when `orig_pkts + resp_pkts == n`, each once, ascending.
State per connection lives in `conn.ext["thresholds"]` and exists only if one was set.
Every packet of such a connection is checked (a policy such as `bulk` sets one on every
connection), so each direction's smallest pending bytes and packets thresholds are kept as
plain ints: the per-packet check is two compares.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import Any

STATE_KEY = "thresholds"

BYTES = "bytes"
PACKETS = "packets"
DURATION = "duration"

_NEVER = 1 << 62  # the cached limit of a direction with no threshold pending

# fire(kind, conn, threshold, is_orig); kind is BYTES / PACKETS / DURATION
FireCallback = Callable[[str, Any, float, bool], None]
GenericCallback = Callable[[Any, int], None]


class ConnThresholds:
    """Pending thresholds of one connection, each list kept sorted ascending."""

    __slots__ = ("bytes_orig", "bytes_resp", "pkts_orig", "pkts_resp", "duration",
                 "generic_next", "next_bytes_orig", "next_bytes_resp", "next_pkts_orig",
                 "next_pkts_resp")

    def __init__(self) -> None:
        self.bytes_orig: list[int] = []
        self.bytes_resp: list[int] = []
        self.pkts_orig: list[int] = []
        self.pkts_resp: list[int] = []
        self.duration: list[float] = []
        self.generic_next = 0          # index of the next generic packet threshold
        # The first element of each list above (_NEVER when empty): see refresh().
        self.next_bytes_orig = self.next_bytes_resp = _NEVER
        self.next_pkts_orig = self.next_pkts_resp = _NEVER

    def refresh(self) -> None:
        """Cache the smallest pending thresholds (after every change of the lists)."""
        self.next_bytes_orig = self.bytes_orig[0] if self.bytes_orig else _NEVER
        self.next_bytes_resp = self.bytes_resp[0] if self.bytes_resp else _NEVER
        self.next_pkts_orig = self.pkts_orig[0] if self.pkts_orig else _NEVER
        self.next_pkts_resp = self.pkts_resp[0] if self.pkts_resp else _NEVER


class ThresholdManager:
    """Sets, checks and fires thresholds; `fire` receives every crossing."""

    __slots__ = ("fire", "fire_generic", "generic")

    def __init__(self, fire: FireCallback, fire_generic: GenericCallback | None = None,
                 generic_packet_thresholds: Sequence[int] = ()) -> None:
        self.fire = fire
        self.fire_generic = fire_generic
        self.generic = sorted(set(int(n) for n in generic_packet_thresholds))

    # -- API for policies --------------------------------------------------------------

    def set_bytes_threshold(self, conn: Any, threshold: int, is_orig: bool) -> bool:
        """IP-level bytes sent by that direction; False for 0 (rejected, like Zeek)."""
        if threshold <= 0:
            return False
        st = self._state(conn)
        if is_orig:
            bisect.insort(st.bytes_orig, int(threshold))
            st.next_bytes_orig = st.bytes_orig[0]
        else:
            bisect.insort(st.bytes_resp, int(threshold))
            st.next_bytes_resp = st.bytes_resp[0]
        self._check_if_due(conn, st, is_orig)
        return True

    def set_packets_threshold(self, conn: Any, threshold: int, is_orig: bool) -> bool:
        if threshold <= 0:
            return False
        st = self._state(conn)
        if is_orig:
            bisect.insort(st.pkts_orig, int(threshold))
            st.next_pkts_orig = st.pkts_orig[0]
        else:
            bisect.insort(st.pkts_resp, int(threshold))
            st.next_pkts_resp = st.pkts_resp[0]
        self._check_if_due(conn, st, is_orig)
        return True

    def set_duration_threshold(self, conn: Any, seconds: float, now: float | None = None) -> bool:
        """Fires on the first counted packet with `now - start_time > seconds`; a threshold
        already exceeded at `now` (default: the connection's last packet) fires at once."""
        if seconds <= 0:
            return False
        st = self._state(conn)
        bisect.insort(st.duration, float(seconds))
        self._check_duration(conn, st, conn.last_time if now is None else now)
        return True

    def delete_bytes_threshold(self, conn: Any, threshold: int, is_orig: bool) -> bool:
        return self._delete(conn, "bytes_orig" if is_orig else "bytes_resp", threshold)

    def delete_packets_threshold(self, conn: Any, threshold: int, is_orig: bool) -> bool:
        return self._delete(conn, "pkts_orig" if is_orig else "pkts_resp", threshold)

    def delete_duration_threshold(self, conn: Any, seconds: float) -> bool:
        return self._delete(conn, "duration", seconds)

    # -- engine entry point ----------------------------------------------------------------

    def packet(self, conn: Any, pkt: Any, is_orig: bool) -> None:
        """After packet `pkt` was counted for `is_orig` (the engine's `packet` hook)."""
        ext = conn.ext
        if ext:
            st = ext.get(STATE_KEY)
            if st is not None:
                # conn.orig / conn.resp without the property calls
                if is_orig:
                    ep = conn.side1 if conn.orig_side else conn.side0
                    if ep.num_bytes_ip >= st.next_bytes_orig or ep.num_pkts >= st.next_pkts_orig:
                        self._check_direction(conn, st, True)
                else:
                    ep = conn.side0 if conn.orig_side else conn.side1
                    if ep.num_bytes_ip >= st.next_bytes_resp or ep.num_pkts >= st.next_pkts_resp:
                        self._check_direction(conn, st, False)
                if st.duration:
                    self._check_duration(conn, st, pkt.ts)
        if self.generic:
            self._check_generic(conn)

    # -- internals -----------------------------------------------------------------------

    @staticmethod
    def _state(conn: Any) -> ConnThresholds:
        ext = conn.ext
        if ext is None:
            conn.ext = ext = {}
        st = ext.get(STATE_KEY)
        if st is None:
            st = ext[STATE_KEY] = ConnThresholds()
        return st

    def _check_if_due(self, conn: Any, st: ConnThresholds, is_orig: bool) -> None:
        """_check_direction, only called when a cached limit says it has something to do."""
        if is_orig:
            ep = conn.orig
            due = ep.num_bytes_ip >= st.next_bytes_orig or ep.num_pkts >= st.next_pkts_orig
        else:
            ep = conn.resp
            due = ep.num_bytes_ip >= st.next_bytes_resp or ep.num_pkts >= st.next_pkts_resp
        if due:
            self._check_direction(conn, st, is_orig)

    def _check_direction(self, conn: Any, st: ConnThresholds, is_orig: bool) -> None:
        endpoint = conn.orig if is_orig else conn.resp
        pending = st.bytes_orig if is_orig else st.bytes_resp
        while pending and endpoint.num_bytes_ip >= pending[0]:
            threshold = pending.pop(0)
            st.refresh()
            self.fire(BYTES, conn, threshold, is_orig)
        pending = st.pkts_orig if is_orig else st.pkts_resp
        while pending and endpoint.num_pkts >= pending[0]:
            threshold = pending.pop(0)
            st.refresh()
            self.fire(PACKETS, conn, threshold, is_orig)

    def _check_duration(self, conn: Any, st: ConnThresholds, now: float) -> None:
        pending = st.duration
        while pending and now - conn.start_time > pending[0]:
            # Zeek reports duration crossings with is_orig of the packet; no direction here.
            self.fire(DURATION, conn, pending.pop(0), True)

    def _check_generic(self, conn: Any) -> None:
        st = self._state(conn) if conn.ext is None or STATE_KEY not in conn.ext \
            else conn.ext[STATE_KEY]
        total = conn.orig.num_pkts + conn.resp.num_pkts
        generic = self.generic
        while st.generic_next < len(generic) and generic[st.generic_next] <= total:
            n = generic[st.generic_next]
            st.generic_next += 1
            if n == total and self.fire_generic is not None:
                self.fire_generic(conn, n)

    def _delete(self, conn: Any, attr: str, value: float) -> bool:
        ext = conn.ext
        st = ext.get(STATE_KEY) if ext else None
        if st is None:
            return False
        pending = getattr(st, attr)
        if value in pending:
            pending.remove(value)
            st.refresh()
            return True
        return False
