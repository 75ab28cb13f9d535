"""Tunnel decapsulation the way Zeek's packet analyzers do it, and `tunnel_parents`.

Zeek (src/packet_analysis/protocol/{iptunnel,gre,vxlan,geneve,teredo,ayiya,gtpv1}) has two kinds
of encapsulating "connection":

* IP tunnels (IP-in-IP 4in4/6in4/4in6/6in6, GRE incl. ERSPAN I/II/III, transparent Ethernet and
  PPTP's enhanced GRE): the outer packet makes no conn.log row at all; the tunnel is an IP pair
  (either direction) with its own uid, kept while active (`Tunnel::ip_tunnel_timeout`, 24 h).
* UDP tunnels (VXLAN 4789, Geneve 6081, GTPv1-U 2152/2123, Teredo 3544, AYIYA 5072): the outer
  UDP connection is an ordinary conn.log row; its analyzer's confirmation puts `vxlan`,
  `geneve`, `gtpv1`, `teredo` or `ayiya` into its `service`. The UDP analyzer forwards by the
  *responder* port; when no port matches, Teredo and AYIYA are found by content
  (`DetectProtocol`).

The inner packet is decoded by `shuntd.packet.decode` and fed back into the tracker; the
connection it lands in gets the uid of the innermost encapsulation added to `tunnel_parents`
(conn/main.zeek's `set_conn` plus `tunnel_changed`: the union over all encapsulations seen)
before any event is raised for the packet (`Tunnels.check`), so new_connection handlers and
the shunting layer already see it.
At most `MAX_DEPTH` (Tunnel::max_depth) encapsulations are undone, as in Zeek. Inner IP
fragments are reassembled by a Defragmenter of their own.

Everything here runs only for UDP packets, IP protocols 4, 41 and 47, and 802.11 frames whose
A-MSDU holds several IP packets (`amsdu`: link-layer subframes, no encapsulation); a plain TCP
packet never enters this module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from shuntd.conn.record import addr_text
from shuntd.defrag import Defragmenter
from shuntd.packet import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IEEE802_11,
    LINKTYPE_RAW,
    amsdu_subframes,
    decode,
)

if TYPE_CHECKING:
    from shuntd.conn.connection import Connection
    from shuntd.conn.tracker import ConnTracker
    from shuntd.packet import Packet

log = logging.getLogger(__name__)

MAX_DEPTH = 2                  # Tunnel::max_depth
MAX_TUNNEL_CHANGES = 5         # tunnel_max_changes_per_connection
IP_TUNNEL_TIMEOUT = 86400.0    # Tunnel::ip_tunnel_timeout
MAX_IP_TUNNELS = 65536         # bound on remembered IP pairs (oldest forgotten first)
INNER_FRAG_BYTES = 16 * 1024 * 1024   # bound on pending inner fragments

VXLAN = "vxlan"
GENEVE = "geneve"
GTPV1 = "gtpv1"
TEREDO = "teredo"
AYIYA = "ayiya"

# Responder port -> UDP tunnel analyzer (base/packet-protocols/*/main.zeek).
UDP_TUNNEL_PORTS: dict[int, str] = {
    4789: VXLAN, 6081: GENEVE, 2152: GTPV1, 2123: GTPV1, 3544: TEREDO, 5072: AYIYA,
}

# Tunnel::Type names in tunnel.log.
TUNNEL_TYPES = {VXLAN: "Tunnel::VXLAN", GENEVE: "Tunnel::GENEVE", GTPV1: "Tunnel::GTPv1",
                TEREDO: "Tunnel::TEREDO", AYIYA: "Tunnel::AYIYA"}
EXPIRATION_INTERVAL = 3600.0   # Tunnel::expiration_interval

# tunnel.log (base/frameworks/tunnels/main.zeek): (name, Zeek type) in Zeek's order.
TUNNEL_FIELDS: list[tuple[str, str]] = [
    ("ts", "time"), ("uid", "string"), ("id.orig_h", "addr"), ("id.orig_p", "port"),
    ("id.resp_h", "addr"), ("id.resp_p", "port"), ("tunnel_type", "enum"), ("action", "enum"),
]

IPPROTO_IPIP = 4
IPPROTO_IPV6 = 41
IPPROTO_GRE = 47
_IPPROTO_NONE = 59

# Per-connection tunnel state bits, kept in conn.ext["tunnel"] (outer connections); inner
# connections keep [current encapsulation stack (tuple of uids), changes] in conn.ext["encap"].
_VIOLATED = {VXLAN: 0x01, GENEVE: 0x02, GTPV1: 0x04, TEREDO: 0x08, AYIYA: 0x10}
_TEREDO_ORIG = 0x100
_TEREDO_RESP = 0x200
_GTP_ORIG = 0x400
_GTP_RESP = 0x800

# Geneve/GRE protocol types -> link type of the inner frame.
_ETHER_INNER = {0x0800: LINKTYPE_RAW, 0x86DD: LINKTYPE_RAW, 0x6558: LINKTYPE_ETHERNET}


# ---- header parsers: bytes -> (inner offset, link type) or None; never raise ------------------

def parse_vxlan(p: memoryview) -> int | None:
    """VXLAN: 8 bytes, the I flag must be set; the inner frame is Ethernet. None = violation."""
    if len(p) < 8 or not p[0] & 0x08:
        return None
    return 8


def parse_geneve(p: memoryview) -> tuple[int, int] | None | bool:
    """Geneve: (inner offset, link type); None = violation (truncated); False = version weird
    or a protocol type we do not forward (still confirmed when the header parsed)."""
    if len(p) < 8:
        return None
    if p[0] >> 6 != 0:
        return False
    hdr = 8 + ((p[0] & 0x3F) << 2)
    if hdr > len(p):
        return None
    link = _ETHER_INNER.get((p[2] << 8) | p[3])
    if link is None:
        return (hdr, -1)
    return (hdr, link)


def parse_gtpv1(p: memoryview) -> int | None | bool:
    """GTPv1-U G-PDU: offset of the inner IP packet. None = violation, False = not a G-PDU
    (control messages and GTP' are ignored, not violations)."""
    n = len(p)
    if n < 8:
        return None
    flags = p[0]
    if flags >> 5 != 1:
        return None                       # "GTPv1 bad Version"
    if not flags & 0x10:
        return False                      # PT = 0: GTP'
    if p[1] != 0xFF:
        return False                      # not a T-PDU
    hdr = 8
    if flags & 0x07:                      # E, S or PN: seq, N-PDU, next extension type
        hdr = 12
        if n < hdr:
            return None
        nxt = p[11] if flags & 0x04 else 0
        while nxt:
            if hdr >= n:
                return None
            ext_len = p[hdr] << 2
            if ext_len == 0 or hdr + ext_len > n:
                return None
            nxt = p[hdr + ext_len - 1]
            hdr += ext_len
    if n - hdr < 20:
        return None                       # "Truncated GTPv1"
    version = p[hdr] >> 4
    if version != 4 and version != 6:
        return None                       # "non-IP packet in GTPv1"
    return hdr


def inner_ip_exact(p: memoryview, at: int) -> int:
    """Zeek's IP::ParsePacket on p[at:]: 0 ok, 1 too small/bad version, 2 captured > total."""
    n = len(p) - at
    if n < 20:
        return 1
    version = p[at] >> 4
    if version == 4:
        total = (p[at + 2] << 8) | p[at + 3]
    elif version == 6:
        if n < 40:
            return 1
        total = ((p[at + 4] << 8) | p[at + 5]) + 40
    else:
        return 1
    if n < total:
        return 1
    return 2 if n > total else 0


def parse_teredo(p: memoryview) -> int | None:
    """Teredo: offset of the inner IPv6 header after optional authentication and origin
    indication headers (TeredoEncapsulation::DoParse); None = bad encapsulation."""
    n = len(p)
    at = 0
    found_origin = found_auth = False
    while True:
        if n - at < 2:
            return None
        tag = (p[at] << 8) | p[at + 1]
        if tag == 0:
            if found_origin or n - at < 8:
                return None
            found_origin = True
            at += 8
        elif tag == 1:
            if found_origin or found_auth or n - at < 4:
                return None
            total = 4 + p[at + 2] + p[at + 3] + 8 + 1
            if n - at < total:
                return None
            found_auth = True
            at += total
        elif tag >> 12 == 6:
            return at if n - at >= 40 else None
        else:
            return None


def _teredo_regex(p: memoryview) -> bool:
    """The old dpd_teredo signature, anchored at the start and matched as a prefix (Zeek's
    MATCH_EXACTLY matcher): an IPv6 header whose source (offset 8) or destination (offset
    24) is a Teredo address (2001:0::/32); '.' excludes newline, as in Zeek's regexes."""
    if len(p) < 40 or p[0] >> 4 != 6:
        return False
    b = bytes(p[:40])
    if b[8:12] == b"\x20\x01\x00\x00" and b"\n" not in b[1:8] and b"\n" not in b[12:40]:
        return True
    return b[24:28] == b"\x20\x01\x00\x00" and b"\n" not in b[1:24] and b"\n" not in b[28:40]


def detect_teredo(p: memoryview) -> bool:
    """TeredoAnalyzer::DetectProtocol."""
    n = len(p)
    if n < 40 or (p[0] >> 4 != 6 and (p[0] != 0 or (p[1] != 0 and p[1] != 1))):
        return False
    if _teredo_regex(p):
        return True
    val = p[1]
    at = 0
    if val == 1:
        skip = 13 + p[2] + p[3]
        if n < skip:
            return False
        at = skip
        if n - at < 40:
            return False
        val = (p[at] << 8) | p[at + 1]
    if val == 0:
        at += 8
        return n - at >= 40 and p[at] >> 4 == 6
    return False


def detect_ayiya(p: memoryview) -> bool:
    """AYIYAAnalyzer::DetectProtocol."""
    return len(p) >= 3 and p[1] == 0x52 and p[2] == 0x11


def parse_ayiya(p: memoryview) -> tuple[int, int] | None | bool:
    """AYIYA: (inner offset, next header); None = violation (truncated); False = not a
    'forward' message (ignored)."""
    n = len(p)
    if n < 8:
        return None
    hdr = 8 + (1 << (p[0] >> 4)) + ((p[1] >> 4) << 2)
    if hdr > n:
        return None
    if p[2] & 0x0F != 1:
        return False
    return (hdr, p[3])


def _gre_header_len(flags: int) -> int:
    n = 4
    if flags & 0x8000:
        n += 4
    if flags & 0x2000:
        n += 4
    if flags & 0x1000:
        n += 4
    if flags & 0x0080:
        n += 4
    return n


def parse_gre(p: memoryview) -> tuple[int, int, bool] | None:
    """GRE (GREAnalyzer): (inner offset, link type, exact) or None when Zeek drops it.
    `exact` = PPTP: the inner IP packet must fill the rest exactly (IP::ParsePacket)."""
    n = len(p)
    if n < 4:
        return None
    flags = (p[0] << 8) | p[1]
    ptype = (p[2] << 8) | p[3]
    version = flags & 0x07
    hdr = _gre_header_len(flags)
    extra = 0
    if version == 0:
        if ptype == 0x6558:
            if n <= hdr + 14:
                return None
            link = LINKTYPE_ETHERNET
        elif ptype == 0x88BE:                 # ERSPAN I (no sequence) / II (8-byte header)
            if n <= hdr + 14:
                return None
            if flags & 0x1000:
                extra = 8
            link = LINKTYPE_ETHERNET
        elif ptype == 0x22EB:                 # ERSPAN III, optional 8-byte subheader
            if n <= hdr + 14 + 12:
                return None
            extra = 12
            if p[hdr + extra - 1] & 0x01:
                if n <= hdr + extra + 8 + 14:
                    return None
                extra += 8
            link = LINKTYPE_ETHERNET
        elif ptype == 0x0800 or ptype == 0x86DD:
            link = LINKTYPE_RAW
        elif ((ptype & 0x8200 == 0x8200 and ptype & 0x0F == 0)
              or (ptype & 0x8300 == 0x8300 and ptype & 0x0F == 0 and ptype <= 0x8370)
              or ptype == 0x9000):
            if n <= hdr:
                return None
            link = LINKTYPE_IEEE802_11        # Aruba: 802.11 frames inside GRE
        else:
            # MPLS (0x8847) and every other type: Zeek's GRE analyzer forwards by the type,
            # finds no analyzer registered for it (at the reference commit; zeek/zeek#5829)
            # and falls back to IPTunnel, which gives the IP pair its tunnel uid and hands
            # the payload on as raw IP: an MPLS label stack then fails as an unknown IP
            # version, so no connection is made, but the tunnel uid is allocated.
            link = LINKTYPE_RAW
    elif version == 1:
        if ptype != 0x880B:
            return None
        extra = 4                             # PPP address/control + protocol
        link = LINKTYPE_RAW
    else:
        return None
    if flags & 0x4000 or flags & 0x0078:      # routing present, reserved flags
        return None
    if n < hdr + extra:
        return None
    if version == 1:
        proto = (p[hdr + 2] << 8) | p[hdr + 3]
        if proto != 0x0021 and proto != 0x0057:
            return None
    return hdr + extra, link, version == 1


# ---- the stateful part: uids of IP tunnels, confirmations, feeding the tracker ------------


class Tunnels:
    """Decapsulates for one `ConnTracker` (which calls `ip` and `udp`)."""

    __slots__ = ("tracker", "depth", "ip_tunnels", "ignore_checksums", "delay_teredo",
                 "delay_gtp", "write_log", "log_errors", "stack", "active", "defrag")

    def __init__(self, tracker: ConnTracker) -> None:
        self.tracker = tracker
        self.depth = 0                # encapsulations around the packet being processed
        # pair -> [uid, last seen, tunnel.log id, tunnel type]
        self.ip_tunnels: dict[tuple[bytes, bytes], list] = {}
        # tunnel.log: set `write_log` to get rows; `stack` is the encapsulation chain of the
        # packet being processed, `active` Tunnel::active (id -> [uid, type, last read]).
        self.write_log: Callable[[tuple], None] | None = None
        self.log_errors = 0   # tunnel.log rows that could not be written
        self.stack: list[tuple[str, tuple, str]] = []
        self.active: dict[tuple, list] = {}
        self.defrag: Defragmenter | None = None   # made by the first inner fragment
        s = tracker.settings
        self.ignore_checksums = s.ignore_checksums
        self.delay_teredo = s.delay_teredo_confirmation
        self.delay_gtp = s.delay_gtp_confirmation

    def _inner(self, data: memoryview, link: int, outer: Packet,
               enc: tuple[str, tuple, str] | None, same_len: bool = False) -> bool:
        """Decode and process one inner frame inside tunnel `enc` (uid, id, type; None: an
        A-MSDU subframe at the link layer, no encapsulation). The inner wire length keeps the
        outer frame's truncation (build_inner_packet), except for IP tunnels and A-MSDU
        subframes, whose inner packet Zeek builds with wire length = captured length.
        False when the frame does not decode (Zeek's IP analyzer fails on it)."""
        cap = len(data)
        wire = cap if same_len else outer.wire_len - (outer.cap_len - cap)
        inner = decode(data, link, outer.ts, wire, self.ignore_checksums)
        if inner is None:
            return False
        if inner.frag:                  # inner IP fragments are reassembled, as in Zeek
            if self.defrag is None:
                self.defrag = Defragmenter(ignore_checksums=self.ignore_checksums,
                                           max_bytes=INNER_FRAG_BYTES)
            inner = self.defrag.add(inner)
            if inner is None:
                return True
        if enc is None:
            self.tracker.process(inner)
            return True
        self.depth += 1
        self.stack.append(enc)
        try:
            # The tracker calls `check` for the inner packet's connection before it raises
            # any event for it (new_connection included), as Zeek's IP analyzer does.
            self.tracker.process(inner)
        finally:
            self.depth -= 1
            self.stack.pop()
        return True

    def amsdu(self, pkt: Packet) -> None:
        """An 802.11 frame whose A-MSDU holds several IP packets (packet.py's carrier, at
        the link layer): each subframe is a packet of its own, in order; the walk stops at
        the first that does not decode (IEEE802_11Analyzer: invalid inner packet)."""
        self.tracker.stats.packets -= 1     # the carrier itself is no IP packet
        for sub in amsdu_subframes(pkt.payload):
            if not self._inner(sub, LINKTYPE_RAW, pkt, None, True):
                break

    def check(self, conn: Connection) -> None:
        """Connection::CheckEncapsulation + conn/main.zeek, for a packet that came out of a
        tunnel (`depth` > 0); the tracker calls it before the packet's events.

        The encapsulation is the whole stack (EncapsulationStack ==): a change anywhere in
        it, not only in the innermost tunnel, is a tunnel_changed. An encapsulation is
        identified by its uid (a UDP tunnel's connection or an IP pair's tunnel, each with
        one type), so the stack compares as the tuple of its uids. The first encapsulation
        (new_connection) and every change (at most MAX_TUNNEL_CHANGES) add the innermost uid
        to tunnel_parents; a change past the limit adds none and marks history 'X'. Each of
        these registers the stack's tunnels in tunnel.log (Tunnel::register_all)."""
        stack = tuple([e[0] for e in self.stack])
        ext = conn.ext
        if ext is None:
            conn.ext = ext = {}
        enc = ext.get("encap")
        if enc is None:
            ext["encap"] = [stack, 0]
        elif enc[0] == stack:
            return
        else:
            enc[0] = stack
            if enc[1] >= MAX_TUNNEL_CHANGES:
                conn.mark_limit_reached()
                return
            enc[1] += 1
        parent = stack[-1]
        parents = conn.tunnel_parents
        if parents is None:
            conn.tunnel_parents = {parent}
        else:
            parents.add(parent)
        if self.write_log is not None:
            self._register_all()

    # ---- tunnel.log (Tunnel::register_all, close, expire) --------------------------------
    def _register_all(self) -> None:
        now = self.tracker.network_time
        for uid, cid, ttype in self.stack:
            entry = self.active.get(cid)
            if entry is not None:
                entry[2] = now               # a lookup refreshes &read_expire
                continue
            self.active[cid] = [uid, ttype, now]
            self._log(now, uid, cid, ttype, "Tunnel::DISCOVER")
            self.tracker.timers.schedule(now + EXPIRATION_INTERVAL, self._expire, arg=cid)

    def _expire(self, cid: tuple, t: float) -> None:
        entry = self.active.get(cid)
        if entry is None:
            return
        if entry[2] + EXPIRATION_INTERVAL <= t:
            del self.active[cid]
            self._log(t, entry[0], cid, entry[1], "Tunnel::EXPIRE")
        else:
            self.tracker.timers.schedule(entry[2] + EXPIRATION_INTERVAL, self._expire, arg=cid)

    def removed(self, conn: Connection) -> None:
        """Tunnel::finalize_tunnel: a UDP tunnel's own connection ends (CLOSE)."""
        cid = (conn.orig_h, conn.orig_p, conn.resp_h, conn.resp_p, conn.ip_proto)
        entry = self.active.pop(cid, None)
        if entry is not None:
            self._log(self.tracker.network_time, entry[0], cid, entry[1], "Tunnel::CLOSE")

    def _log(self, ts: float, uid: str, cid: tuple, ttype: str, action: str) -> None:
        if self.write_log is not None:
            row = (ts, uid, addr_text(cid[0]), cid[1], addr_text(cid[2]), cid[3], ttype, action)
            try:
                self.write_log(row)
            except OSError as exc:  # tunnel.log unwritable: conn.log must not suffer for it
                self.log_errors += 1
                if self.log_errors == 1:
                    log.error("tunnel.log: %s; further tunnel.log errors are counted", exc)

    def _ip_tunnel(self, pkt: Packet) -> tuple[str, tuple, str]:
        """The IP pair's tunnel (uid, tunnel.log id, type), made by its first packet."""
        src = pkt.src
        dst = pkt.dst
        pair = (src, dst) if src < dst else (dst, src)
        entry = self.ip_tunnels.get(pair)
        ts = pkt.ts
        if entry is None or ts - entry[1] > IP_TUNNEL_TIMEOUT:
            if entry is None and len(self.ip_tunnels) >= MAX_IP_TUNNELS:
                del self.ip_tunnels[next(iter(self.ip_tunnels))]
            ttype = "Tunnel::GRE" if pkt.proto == IPPROTO_GRE else "Tunnel::IP"
            entry = [self.tracker.uids.next(), ts, (src, 0, dst, 0, 0), ttype]
            self.ip_tunnels[pair] = entry
        else:
            entry[1] = ts
        return entry[0], entry[2], entry[3]

    def ip(self, pkt: Packet) -> None:
        """IP protocols 4, 41, 47: never a connection of their own (Zeek's IP analyzer hands
        them to the IPTunnel/GRE analyzers); decapsulate when the header allows."""
        if self.depth >= MAX_DEPTH:
            return
        data = pkt.payload
        if pkt.proto == IPPROTO_GRE:
            gre = parse_gre(data)
            if gre is None:
                return
            at, link, exact = gre
            if exact and inner_ip_exact(data, at) != 0:
                return
            data = data[at:]
        else:
            link = LINKTYPE_RAW
        if not len(data):
            return
        enc = self._ip_tunnel(pkt)
        if link == LINKTYPE_IEEE802_11:
            for sub in amsdu_subframes(data):   # Aruba: every A-MSDU subframe, in order
                if not self._inner(sub, LINKTYPE_RAW, pkt, enc, True):
                    break
            return
        self._inner(data, link, pkt, enc, True)

    def udp(self, conn: Connection, pkt: Packet, is_orig: bool) -> None:
        """After the UDP analyzer: forward by responder port, else detect Teredo/AYIYA."""
        if conn.removed or (pkt.checksum_ok is False and not self.ignore_checksums):
            return
        data = pkt.payload
        name = UDP_TUNNEL_PORTS.get(conn.key[4 - 2 * conn.orig_side])   # (conn.resp_p)
        if name is None:
            # Content detection; the first-byte tests are detect_teredo's own fast rejects,
            # inlined so ordinary UDP (DNS, QUIC, ...) costs no further call.
            n = len(data)
            if n < 3:
                return
            b0 = data[0]
            if n >= 40 and (b0 >> 4 == 6 or (b0 == 0 and data[1] <= 1)) and detect_teredo(data):
                name = TEREDO
            elif data[1] == 0x52 and data[2] == 0x11:     # detect_ayiya
                name = AYIYA
            else:
                return
        ext = conn.ext
        if ext is None:
            conn.ext = ext = {}
        state = ext.get("tunnel", 0)
        if state & _VIOLATED[name]:
            return
        if self.depth >= MAX_DEPTH:
            return
        enc = (conn.uid, (conn.orig_h, conn.orig_p, conn.resp_h, conn.resp_p, 17),
               TUNNEL_TYPES[name])
        if name == VXLAN:
            at = parse_vxlan(data)
            if at is None:
                ext["tunnel"] = state | _VIOLATED[name]
                return
            _confirm(conn, name)
            if len(data) > at:
                self._inner(data[at:], LINKTYPE_ETHERNET, pkt, enc)
        elif name == GENEVE:
            gen = parse_geneve(data)
            if gen is None:
                ext["tunnel"] = state | _VIOLATED[name]
                return
            if gen is False:
                return
            at, link = gen  # type: ignore[misc]
            _confirm(conn, name)
            if link >= 0 and len(data) > at:
                self._inner(data[at:], link, pkt, enc)
        elif name == GTPV1:
            at = parse_gtpv1(data)
            if at is False:
                return
            if at is None or inner_ip_exact(data, at) != 0:
                ext["tunnel"] = state | _VIOLATED[name]
                return
            _confirm_both_sides(conn, name, ext, state, is_orig, _GTP_ORIG, _GTP_RESP,
                                self.delay_gtp)
            self._inner(data[at:], LINKTYPE_RAW, pkt, enc)
        elif name == TEREDO:
            at = parse_teredo(data)
            if at is None:
                ext["tunnel"] = state | _VIOLATED[name]
                return
            fit = inner_ip_exact(data, at)
            if fit == 2:
                # Bubble with trailing bytes: fine only for "no next header" and no payload.
                if not (data[at + 6] == _IPPROTO_NONE and data[at + 4] == 0
                        and data[at + 5] == 0):
                    ext["tunnel"] = state | _VIOLATED[name]
                    return
            elif fit != 0 or data[at] >> 4 != 6:
                ext["tunnel"] = state | _VIOLATED[name]
                return
            _confirm_both_sides(conn, name, ext, state, is_orig, _TEREDO_ORIG, _TEREDO_RESP,
                                self.delay_teredo)
            self._inner(data[at:], LINKTYPE_RAW, pkt, enc)
        else:  # AYIYA
            ay = parse_ayiya(data)
            if ay is None:
                ext["tunnel"] = state | _VIOLATED[name]
                return
            if ay is False:
                return
            at, next_header = ay  # type: ignore[misc]
            _confirm(conn, name)
            if (next_header == IPPROTO_IPIP or next_header == IPPROTO_IPV6) and len(data) > at:
                self._inner(data[at:], LINKTYPE_RAW, pkt, enc)


def _confirm_both_sides(conn: Connection, name: str, ext: dict, state: int, is_orig: bool,
                        orig_bit: int, resp_bit: int, delay: bool) -> None:
    """Record this direction's valid header; confirm once both directions sent one (Zeek's
    Tunnel::delay_teredo_confirmation / delay_gtp_confirmation), or at once without `delay`."""
    state |= orig_bit if is_orig else resp_bit
    ext["tunnel"] = state
    if not delay or state & (orig_bit | resp_bit) == orig_bit | resp_bit:
        _confirm(conn, name)


def _confirm(conn: Connection, name: str) -> None:
    """AnalyzerConfirmation of a packet analyzer: its name joins the connection's services."""
    if name not in conn.service:
        conn.service = [*conn.service, name]
