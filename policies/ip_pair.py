"""Shunt everything between configured address pairs, by IP pair (trigger `ip_pair`).

Backups and replication between two known hosts are the classic case. Set the pairs in the
config file (`[policy.ip_pair] pairs = [["10.0.0.5", "10.0.1.0/24"], ...]`) or edit `PAIRS`.
Each side is an address or a CIDR; the first connection between matching hosts shunts the
pair in XDP, whatever the protocol or port.
"""

import ipaddress

from shuntd.policy import shunt_ip_pair

PAIRS: list[tuple[str, str]] = []
_nets: list[tuple] = []


def configure(options):
    """Called by the loader with this policy's table from the config file."""
    global PAIRS
    PAIRS = [tuple(p) for p in options.get("pairs", PAIRS)]
    _nets.clear()
    for a, b in PAIRS:
        _nets.append((ipaddress.ip_network(a, strict=False), ipaddress.ip_network(b, strict=False)))


def new_connection(conn):
    if not _nets and PAIRS:
        configure({})
    orig, resp = ipaddress.ip_address(conn.id.orig_h), ipaddress.ip_address(conn.id.resp_h)
    for a, b in _nets:
        if (orig in a and resp in b) or (orig in b and resp in a):
            shunt_ip_pair(conn.id.orig_h, conn.id.resp_h, "ip_pair")
            return
