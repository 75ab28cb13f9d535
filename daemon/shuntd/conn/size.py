"""ConnSize: packets and IP-level bytes per endpoint (spec §1.11).

Counters live on the endpoint object of a side (host), so a flip swaps them with the roles,
as Zeek's ConnSize::FlipRoles does. Every protocol's endpoint class derives from this one.
"""

from __future__ import annotations


class EndpointCounters:
    """Base for endpoints: `num_pkts` and `num_bytes_ip` (IPv4 total length / IPv6 + 40)."""

    __slots__ = ("num_pkts", "num_bytes_ip")

    def __init__(self) -> None:
        self.num_pkts = 0
        self.num_bytes_ip = 0

    def count(self, ip_len: int) -> None:
        self.num_pkts += 1
        self.num_bytes_ip += ip_len


class SummedEndpoint(EndpointCounters):
    """An endpoint whose size is a running sum of per-packet lengths (UDP: `uh_ulen - 8`,
    ICMP: IP payload - 8). `nbytes` is None until the first valid packet; the endpoint is
    active once it has one (and the sum is not negative, spec §1.6)."""

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

    def add(self, n: int) -> None:
        self.nbytes = n if self.nbytes is None else self.nbytes + n
