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
