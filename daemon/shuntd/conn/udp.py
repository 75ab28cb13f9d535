"""UDP flows (spec §4.2): bytes from the UDP length field, `D`/`d`, ACTIVE endpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shuntd.conn.connection import history_plus
from shuntd.conn.size import SummedEndpoint

if TYPE_CHECKING:
    from shuntd.conn.connection import Connection

# Session history masks for UDP (role-based bits, never swapped).
HIST_ORIG_DATA_PKT = 0x1
HIST_RESP_DATA_PKT = 0x2


class UDPEndpoint(SummedEndpoint):
    """One side of a UDP flow. `nbytes` is role-bound (Zeek's request_len/reply_len): an
    application-layer flip swaps it back so it stays with the role (spec §3.4)."""

    __slots__ = ("chk_cnt", "chk_thresh")

    def __init__(self) -> None:
        self.num_pkts = 0          # the base classes' fields, set here without the calls
        self.num_bytes_ip = 0
        self.nbytes = None
        self.chk_cnt = 0
        self.chk_thresh = 1


class UDPAnalyzer:
    """Zeek's UDP session adapter. Stateless (the state is in the endpoints): one instance
    serves every UDP connection of a tracker, and a connection holds no reference cycle
    through it, so a removed one is freed at once instead of by a full collection."""

    __slots__ = ()

    @staticmethod
    def make_endpoints() -> tuple[UDPEndpoint, UDPEndpoint]:
        return (UDPEndpoint(), UDPEndpoint())

    def attach(self, conn: Connection) -> None:
        """Nothing to keep (see the class docstring)."""

    def flipped(self, conn: Connection) -> None:
        a, b = conn.sides
        a.nbytes, b.nbytes = b.nbytes, a.nbytes
        a.chk_cnt, b.chk_cnt = b.chk_cnt, a.chk_cnt
        a.chk_thresh, b.chk_thresh = b.chk_thresh, a.chk_thresh

    def bad_checksum(self, conn: Connection, side: int) -> None:
        """`C`/`c`, logarithmic (role-bound counters)."""
        ep = conn.endpoint(side)
        ep.chk_cnt += 1
        if ep.chk_cnt == ep.chk_thresh:
            conn.history = history_plus(conn.history, "C" if side == conn.orig_side else "c")
            if ep.chk_thresh < 0xFFFFFFFF // 10:
                ep.chk_thresh *= 10

    @staticmethod
    def conn_state(conn: Connection) -> str:
        # (SummedEndpoint.state of each role, read from the slots: once per logged row)
        if conn.orig_side:
            o_bytes, r_bytes = conn.side1.nbytes, conn.side0.nbytes
        else:
            o_bytes, r_bytes = conn.side0.nbytes, conn.side1.nbytes
        o = o_bytes is not None and o_bytes >= 0
        r = r_bytes is not None and r_bytes >= 0
        if o and r:
            return "SF"
        if o:
            return "S0"
        if r:
            return "SHR"
        return "OTH"
