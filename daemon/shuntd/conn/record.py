"""The conn.log record: Zeek's `Conn::Info` schema and how a `Connection` fills it (spec §1)."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from shuntd.conn.connection import PROTO_NAMES

if TYPE_CHECKING:
    from shuntd.conn.connection import Connection
    from shuntd.conn.site import LocalNets

# (name, Zeek type) in Zeek's default #fields order.
CONN_FIELDS: list[tuple[str, str]] = [
    ("ts", "time"),                   # start_time: first packet of the connection
    ("uid", "string"),                # 'C' + base62 of 96 random bits
    ("id.orig_h", "addr"),            # post-flip originator address
    ("id.orig_p", "port"),            # ICMP: type of the first packet
    ("id.resp_h", "addr"),
    ("id.resp_p", "port"),            # ICMP: counterpart type or code
    ("proto", "enum"),                # tcp / udp / icmp / unknown_transport
    ("service", "string"),            # confirmed analyzers, confirmation order, lower case
    ("duration", "interval"),         # last_time - start_time, only if > 0
    ("orig_bytes", "count"),          # payload bytes (TCP: from sequence numbers)
    ("resp_bytes", "count"),
    ("conn_state", "string"),         # one of the 13 states of §1.7
    ("local_orig", "bool"),           # orig_h in Site::local_nets
    ("local_resp", "bool"),
    ("missed_bytes", "count"),        # content gaps
    ("history", "string"),            # state letters (orig upper case, resp lower case)
    ("orig_pkts", "count"),           # ConnSize: packets
    ("orig_ip_bytes", "count"),       # ConnSize: IP-level bytes
    ("resp_pkts", "count"),
    ("resp_ip_bytes", "count"),
    ("tunnel_parents", "set[string]"),  # uids of enclosing tunnels (unset without tunnels)
    ("ip_proto", "count"),            # IP protocol number
]


def addr_text(addr: bytes) -> str:
    """Zeek's text form (IPv4 dotted quad; IPv6 compressed, IPv4-mapped as ::ffff:a.b.c.d)."""
    if len(addr) == 4:
        return socket.inet_ntop(socket.AF_INET, addr)
    return socket.inet_ntop(socket.AF_INET6, addr)


_TEXT_MEMO_MAX = 65536


def memo_addr_text(texts: dict[bytes, str], addr: bytes) -> str:
    """`addr_text(addr)` kept in `texts` (bounded: emptied when full); a busy server's
    address is then formatted once, not once per connection."""
    text = texts.get(addr)
    if text is None:
        if len(texts) >= _TEXT_MEMO_MAX:
            texts.clear()
        text = texts[addr] = addr_text(addr)
    return text


def conn_record(conn: Connection, local_nets: LocalNets | None,
                texts: dict[bytes, str] | None = None) -> tuple:
    """Values in CONN_FIELDS order (None = unset), computed as Zeek's set_conn(c, T).
    `texts`: a memo of address texts (see memo_addr_text), if the caller keeps one.

    Reads the connection's slots directly (not its orig/resp/duration views): one record per
    connection is a measurable share of an offline run."""
    ip_proto, a, pa, b, pb = conn.key
    if conn.orig_side:
        orig, resp = conn.side1, conn.side0
        orig_h, orig_p, resp_h, resp_p = b, pb, a, pa
    else:
        orig, resp = conn.side0, conn.side1
        orig_h, orig_p, resp_h, resp_p = a, pa, b, pb
    duration: float | None = conn.last_time - conn.start_time
    if duration > 0:  # type: ignore[operator]
        orig_bytes: int | None = orig.size
        resp_bytes: int | None = resp.size
    else:
        duration = orig_bytes = resp_bytes = None   # Zeek sets these only when positive
    if local_nets is not None and not local_nets.empty:
        local_orig: bool | None = local_nets.contains(orig_h)
        local_resp: bool | None = local_nets.contains(resp_h)
    else:
        local_orig = local_resp = None
    service = ",".join(conn.service).lower() if conn.service else None
    if texts is None:
        orig_text = addr_text(orig_h)
        resp_text = addr_text(resp_h)
    else:
        orig_text = texts.get(orig_h) or memo_addr_text(texts, orig_h)
        resp_text = texts.get(resp_h) or memo_addr_text(texts, resp_h)
    rare = conn.rare
    if rare is None:
        missed = 0
        parents = None
    else:
        missed = rare.missed_bytes
        parents = set(rare.tunnel_parents) if rare.tunnel_parents else None
    uid = conn._uid   # (Connection.uid without the property call: mostly drawn here)
    if uid is None:
        uid = conn._uid = conn.tracker.uids.next()
    return (
        conn.start_time,
        uid,
        orig_text,
        orig_p,
        resp_text,
        resp_p,
        PROTO_NAMES.get(ip_proto, "unknown_transport"),
        service,
        duration,
        orig_bytes,
        resp_bytes,
        conn.analyzer.conn_state(conn),
        local_orig,
        local_resp,
        missed,
        conn.history or None,
        orig.num_pkts,
        orig.num_bytes_ip,
        resp.num_pkts,
        resp.num_bytes_ip,
        parents,
        ip_proto,
    )

# -- L1 (live daemon): extra conn.log columns after Zeek's, only when shunting is possible --
SHUNT_CONN_FIELDS: list[tuple[str, str]] = [
    ("is_shunted", "bool"),
    ("shunt_trigger", "string"),
    ("orig_shunted_pkts", "count"),   # packets XDP dropped (not in orig_pkts)
    ("orig_shunted_bytes", "count"),  # their IP bytes (not in orig_ip_bytes)
    ("resp_shunted_pkts", "count"),
    ("resp_shunted_bytes", "count"),
]
