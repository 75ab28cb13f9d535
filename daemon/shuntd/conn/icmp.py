"""ICMP/ICMPv6 and unknown-IP-protocol flows (spec §4.3, §4.4): never flipped, always OTH."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shuntd.conn.size import EndpointCounters

if TYPE_CHECKING:
    from shuntd.conn.connection import Connection


class ICMPEndpoint(EndpointCounters):
    """One side of an ICMP flow: bytes = sum of (IP payload length - 8)."""

    __slots__ = ("nbytes",)

    def __init__(self) -> None:
        super().__init__()
        self.nbytes: int | None = None

    @property
    def state(self) -> int:
        return 1 if self.nbytes is not None and self.nbytes >= 0 else 0

    @property
    def size(self) -> int:
        return self.nbytes if self.nbytes is not None and self.nbytes > 0 else 0


class ICMPAnalyzer:
    """ICMP session adapter (also used, without byte counting, for unknown IP protocols)."""

    __slots__ = ("conn",)

    def __init__(self) -> None:
        self.conn: Connection = None  # type: ignore[assignment]

    @staticmethod
    def make_endpoints() -> list[ICMPEndpoint]:
        return [ICMPEndpoint(), ICMPEndpoint()]

    def attach(self, conn: Connection) -> None:
        self.conn = conn

    def flipped(self, conn: Connection) -> None:
        """ICMP is never flipped by the engine; nothing is role-bound."""

    def bad_checksum(self, conn: Connection, side: int) -> None:
        """A bad ICMP checksum leaves no history letter."""

    @staticmethod
    def account(conn: Connection, side: int, l4_len: int) -> None:
        ep = conn.sides[side]
        n = l4_len - 8
        ep.nbytes = n if ep.nbytes is None else ep.nbytes + n

    @staticmethod
    def conn_state(conn: Connection) -> str:
        return "OTH"
