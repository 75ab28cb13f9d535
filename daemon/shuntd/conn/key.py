"""Endpoint-neutral flow keys (spec §4.1).

A `FlowKey` is a plain tuple `(ip_proto, addr_a, port_a, addr_b, port_b)` with the endpoint
that sorts lower by (address, port) first, so both directions of a flow find the same
connection. A key carries no notion of originator: which side is the orig is an attribute of
the `Connection`. ICMP one-way messages keep the sender first (Zeek does not canonicalise
them). Ports of ICMP keys are (type, counterpart type or code).
"""

from __future__ import annotations

FlowKey = tuple  # (ip_proto: int, addr_a: bytes, port_a: int, addr_b: bytes, port_b: int)

# ICMP request/reply pairs (spec §4.3): type -> counterpart type.
ICMP4_COUNTERPART: dict[int, int] = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 10: 9, 9: 10,
                                     17: 18, 18: 17}
ICMP6_COUNTERPART: dict[int, int] = {128: 129, 129: 128, 133: 134, 134: 133, 135: 136,
                                     136: 135, 130: 131, 131: 130, 139: 140, 140: 139,
                                     144: 145, 145: 144}


def icmp_ports(ip_proto: int, icmp_type: int, icmp_code: int) -> tuple[int, int, bool]:
    """(src port, dst port, one_way) for an ICMP message, as Zeek builds its conn id."""
    table = ICMP6_COUNTERPART if ip_proto == 58 else ICMP4_COUNTERPART
    counterpart = table.get(icmp_type)
    if counterpart is None:
        return icmp_type, icmp_code, True
    return icmp_type, counterpart, False


def make_key(ip_proto: int, src: bytes, sport: int, dst: bytes, dport: int,
             one_way: bool = False) -> tuple[FlowKey, int]:
    """Return (key, side of the sender): side 0 = the key's first endpoint."""
    if one_way or src < dst or (src == dst and sport <= dport):
        return (ip_proto, src, sport, dst, dport), 0
    return (ip_proto, dst, dport, src, sport), 1
