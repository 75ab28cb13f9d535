"""ICMP/ICMPv6 and unknown-IP-protocol flows (spec §4.3, §4.4): never flipped, always OTH."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shuntd.conn.size import SummedEndpoint

if TYPE_CHECKING:
    from shuntd.conn.connection import Connection


class ICMPEndpoint(SummedEndpoint):
    """One side of an ICMP flow: bytes = sum of (IP payload length - 8)."""

    __slots__ = ()


class ICMPAnalyzer:
    """ICMP session adapter (also used, without byte counting, for unknown IP protocols).
    Stateless like `UDPAnalyzer`: one instance serves a tracker's ICMP connections."""

    __slots__ = ()

    @staticmethod
    def make_endpoints() -> tuple[ICMPEndpoint, ICMPEndpoint]:
        return (ICMPEndpoint(), ICMPEndpoint())

    def attach(self, conn: Connection) -> None:
        """Nothing to keep."""

    def flipped(self, conn: Connection) -> None:
        """ICMP is never flipped by the engine; nothing is role-bound."""

    def bad_checksum(self, conn: Connection, side: int) -> None:
        """A bad ICMP checksum leaves no history letter."""

    @staticmethod
    def account(conn: Connection, side: int, l4_len: int) -> None:
        conn.endpoint(side).add(l4_len - 8)

    @staticmethod
    def conn_state(conn: Connection) -> str:
        return "OTH"
