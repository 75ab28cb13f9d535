"""Frame bytes -> `Packet`: the layer-3/4 facts the connection engine needs.

One `Packet` per frame, fields in `__slots__`, no object per header. Addresses stay packed
bytes (4 or 16) on the hot path; text forms are made only when a record is written.
This module knows nothing of connections, BPF or policies.

Interface contract (shared by capture/, conn/ and tests; change only with all three):

    decode(frame, linktype, ts, wire_len, ignore_checksums=False) -> Packet | None

returns None for frames that carry no IP packet the engine can use (and sets no exception);
callers count those. `DecodeError` is never raised out of `decode`. One exception to "one
IP packet per Packet": an 802.11 frame whose A-MSDU holds several IP packets (Zeek analyses
each) decodes to a carrier Packet with `proto == PROTO_AMSDU` and the frame in `payload`;
callers pass it to the tracker like any other, which processes every subframe.

The drop rules follow Zeek's IP analyzer (spec zeek-conn.md §0.3): a frame is dropped when the
IP header is not fully captured, the version is unknown, IPv4 `ip_len` is 0 (unless
`ignore_checksums`, then the captured length is used), the *wire* length is shorter than the IP
total length (snaplen truncation is tolerated), the header lengths are inconsistent, the IPv4
header checksum is bad (unless `ignore_checksums`), or the packet carries ESP, an IPv6
mobility header or IPv6 "no next header". Fragments are returned with `frag != 0` and no
transport fields; `shuntd.defrag.Defragmenter` turns them into one reassembled `Packet`.

Link layers follow Zeek's packet analyzers (scripts/base/packet-protocols): Ethernet (with
Cisco FabricPath, 802.2 SNAP), VLAN/QinQ (0x8100, 0x88a8, 0x9100; a third tag overwrites the
inner one, like Zeek), MPLS, PPPoE, VN-Tag, PBB, Linux SLL/SLL2, BSD null (either byte order),
OpenBSD loop (Zeek itself lacks it), PPP (9, 50), IEEE 802.11 (105) and radiotap (127) data
frames with LLC/SNAP, and raw IP (101, 228, 229; the IP version
comes from the header, as in Zeek's IP analyzer). Tunnels (GRE, UDP encapsulations, IP-in-IP)
are not decapsulated here: they arrive as their outer IP packet (after defragmentation) and
`shuntd.conn.tunnels` decodes the inner frame with `decode` again, so this path stays as fast
for the common untunnelled packet.
"""

from __future__ import annotations

import struct

# Link types (pcap LINKTYPE_* values) the decoder understands.
LINKTYPE_NULL = 0          # BSD loopback, host-order 4-byte family
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101         # raw IPv4/IPv6
LINKTYPE_LOOP = 108        # OpenBSD loopback, network-order family
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD

# Address families seen in DLT_NULL / DLT_LOOP headers (BSD, Linux, macOS, Windows values).
_AF_INET = 2
_AF_INET6 = frozenset((10, 24, 28, 30))

IPPROTO_HOPOPTS = 0
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_ICMPV6 = 58
IPPROTO_NONE = 59
IPPROTO_DSTOPTS = 60
IPPROTO_MOBILITY = 135

# Packet.proto of an 802.11 A-MSDU frame with several subframes (see _amsdu): not an IP
# protocol; the tracker hands such a carrier to conn/tunnels.py.
PROTO_AMSDU = -1

# Fragment kinds in Packet.frag.
FRAG_NONE = 0
FRAG_FIRST = 1
FRAG_LATER = 2

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBH")
_PORTS_LEN = struct.Struct("!HHH")
_U16 = struct.Struct("!H")
_FRAG6 = struct.Struct("!BBHI")
_U32_LE = struct.Struct("<I")
_U32_BE = struct.Struct("!I")
_EMPTY = memoryview(b"")


class Packet:
    """Decoded facts of one IP packet (after link layer, VLANs and IPv6 extension headers).

    The `frag_*` and `l3` slots are set only when `frag != 0`; they exist for the
    `Defragmenter` and nobody else should read them.
    """

    __slots__ = (
        "ts",           # float: capture time, sec + usec / 1e6 (Zeek's network time)
        "wire_len",     # int: frame length on the wire (pcap orig_len)
        "cap_len",      # int: bytes captured of the frame
        "vlan",         # int: outer VLAN id, 0 if none
        "inner_vlan",   # int: inner VLAN id (QinQ), 0 if none
        "ip_version",   # int: 4 or 6
        "src",          # bytes: source address, packed (4 or 16 bytes)
        "dst",          # bytes: destination address, packed
        "proto",        # int: transport protocol number (after IPv6 extension headers)
        "ip_len",       # int: IP-level length: IPv4 total length; IPv6 payload length + 40
        "ip_hdr_len",   # int: bytes from IP header start to transport header
        "ttl",          # int: TTL / hop limit
        "frag",         # int: 0 = not a fragment; 1 = first fragment; 2 = non-first fragment
        "l4_ok",        # bool: fixed transport header present (TCP 20, UDP 8, ICMP 8 bytes) both
                        #   per the IP length and captured: Zeek's condition to build a key
                        #   (else weird truncated_header, no connection). Always True for
                        #   other protocols, False for fragments.
        "sport",        # int: TCP/UDP source port; ICMP type
        "dport",        # int: TCP/UDP destination port; ICMP code
        "tcp_flags",    # int: TCP flag byte (FIN 1, SYN 2, RST 4, PSH 8, ACK 0x10, URG 0x20 ...)
        "seq",          # int: TCP sequence number
        "ack",          # int: TCP acknowledgement number
        "window",       # int: TCP window (unscaled)
        "tcp_hdr_len",  # int: TCP data offset in bytes
        "udp_len",      # int: UDP header length field
        "l4_len",       # int: transport bytes per the IP header (ip payload length)
        "payload_len",  # int: L4 payload bytes per the headers (may exceed captured bytes)
        "payload",      # memoryview: captured L4 payload (may be shorter than payload_len)
        "checksum_ok",  # bool | None: L4 (and IPv4 header) checksum verdict; None = not checkable
        # Added by E1 for reassembly (set only when frag != 0):
        "l3",           # memoryview: the IP packet as captured, capped at ip_len
        "frag_id",      # int: IPv4 identification / IPv6 fragment identification
        "frag_offset",  # int: fragment offset in bytes
        "frag_more",    # bool: more-fragments flag
        "frag_nh_at",   # int: IPv6: offset in l3 of the next-header byte naming the frag header
        "tcp_hdr_ok",   # bool: TCP only: 20 <= data offset <= IP payload and captured bytes;
                        #   Zeek ignores a TCP packet failing this AFTER the connection exists
                        #   (weird bad_TCP_header_len / truncated_header). False for non-TCP.
    )

    def __repr__(self) -> str:
        return (
            f"Packet(ts={self.ts!r}, v{self.ip_version}, proto={self.proto}, "
            f"{self.src.hex()}:{self.sport} -> {self.dst.hex()}:{self.dport}, "
            f"ip_len={self.ip_len}, frag={self.frag})"
        )


_new_packet = object.__new__


# Checksums: summing big-endian 16-bit words in one's complement is the same as taking the
# whole byte string as one integer modulo 0xffff (2**16 == 1 mod 0xffff), so a checksum
# verifies when `int.from_bytes(data) % 0xffff == 0`: one C-level operation per packet, no
# Python loop. (A fold of 0 instead of 0xffff needs all-zero input, impossible here: the
# pseudo header is never zero and an all-zero ICMP message fails anyway.) An odd-length
# segment is padded with a zero byte: a left shift by 8 bits.


# What each link-layer analyzer hands on, per Zeek's scripts/base/packet-protocols/*:
# ethertype -> next step. "ip" = the IP analyzer (version from the header's first nibble).
_FROM_ETHERNET = {0x0800: "ip", 0x86DD: "ip", 0x8100: "vlan", 0x88A8: "vlan", 0x9100: "vlan",
                  0x8847: "mpls", 0x88E7: "pbb", 0x8864: "pppoe", 0x8926: "vntag"}
_FROM_VLAN = {0x0800: "ip", 0x86DD: "ip", 0x8100: "vlan", 0x8847: "mpls", 0x88E7: "pbb",
              0x8864: "pppoe"}
_FROM_VNTAG = {0x8100: "vlan", 0x88A8: "vlan", 0x9100: "vlan"}
_FROM_SNAP = {0x0800: "ip", 0x86DD: "ip"}
_FROM_PPP = {0x0021: "ip", 0x0057: "ip", 0x0281: "mpls"}
_FROM_PPPOE = {0x0021: "ip", 0x0057: "ip"}
_FROM_SLL = {0x0800: "ip", 0x86DD: "ip", 0x8100: "vlan", 0x88A8: "vlan", 0x9100: "vlan"}
_MAX_LINK_STEPS = 16
LINKTYPE_PPP = 9
LINKTYPE_PPP_SERIAL = 50
LINKTYPE_IEEE802_11 = 105
LINKTYPE_RADIOTAP = 127


def wlan_header(mv: memoryview, caplen: int, off: int) -> tuple[int, bool]:
    """Zeek's IEEE802_11 analyzer up to the payload: (offset after the 802.11 data header,
    A-MSDU?) or (-1, False) for non-data, protected or truncated frames."""
    rest = caplen - off
    hdr = 24
    if rest <= hdr:
        return -1, False
    fc = mv[off]
    flags = mv[off + 1]
    if not (fc >> 2) & 0x02 or (fc >> 4) & 0x04:    # not a data frame, or no data
        return -1, False
    if flags & 0x03 == 0x03:                        # To DS + From DS: a 4th address
        hdr += 6
        if rest <= hdr:
            return -1, False
    amsdu = False
    if (fc >> 4) & 0x08:                            # QoS data
        amsdu = bool(mv[off + hdr] & 0x80)
        if flags & 0x40:                            # protected: nothing to decode
            return -1, False
        hdr += 2
        if rest <= hdr:
            return -1, False
    return off + hdr, amsdu


def llc_snap_ip(mv: memoryview, off: int, end: int) -> int:
    """Offset of the IP header after an LLC/SNAP header carrying IPv4/IPv6, or -1."""
    if (end - off < 8 or mv[off] != 0xAA or mv[off + 1] != 0xAA or mv[off + 2] != 0x03
            or mv[off + 3] or mv[off + 4] or mv[off + 5]):
        return -1
    etype = (mv[off + 6] << 8) | mv[off + 7]
    if etype != 0x0800 and etype != 0x86DD:
        return -1
    return off + 8


def amsdu_subframes(p: memoryview) -> list[memoryview]:
    """The IP packets of an 802.11 data frame `p` carrying an A-MSDU, in order, as Zeek's
    IEEE802_11 analyzer walks them (its padding rule, `len % 4`, kept): the walk ends at a
    truncated subframe or one without LLC/SNAP + IPv4/IPv6. Frames without an A-MSDU give
    their single IP packet."""
    n = len(p)
    at, amsdu = wlan_header(p, n, 0)
    if at < 0:
        return []
    if not amsdu:
        ip_at = llc_snap_ip(p, at, n)
        return [p[ip_at:]] if ip_at >= 0 else []
    out = []
    while at < n:
        if n - at < 14:
            break
        sub_len = (p[at + 12] << 8) | p[at + 13]
        if n - at < sub_len + 14:
            break
        at += 14
        ip_at = llc_snap_ip(p, at, at + sub_len)
        if ip_at < 0:
            break
        out.append(p[ip_at:at + sub_len])
        at += sub_len
        pad = sub_len % 4
        if n - at >= pad:
            at += pad
    return out


def _amsdu(wlan: memoryview, ts: float, ignore_checksums: bool) -> Packet | None:
    """A link-layer 802.11 frame with an A-MSDU: every subframe is an IP packet of its own
    (Zeek's IEEE802_11 analyzer), each fully captured. One subframe is decoded here; several
    make a carrier Packet (proto PROTO_AMSDU, payload = the 802.11 frame) that the tracker
    hands to conn/tunnels.py, which decodes and processes the subframes in order."""
    subs = amsdu_subframes(wlan)
    if not subs:
        return None
    if len(subs) == 1:
        return _decode(subs[0], LINKTYPE_RAW, ts, len(subs[0]), ignore_checksums)
    pkt = _new_packet(Packet)
    pkt.ts = ts
    pkt.wire_len = pkt.cap_len = pkt.l4_len = pkt.payload_len = len(wlan)
    pkt.vlan = pkt.inner_vlan = pkt.ip_len = pkt.ip_hdr_len = pkt.ttl = pkt.frag = 0
    pkt.ip_version = 0
    pkt.src = pkt.dst = b""
    pkt.proto = PROTO_AMSDU
    pkt.l4_ok = True
    pkt.sport = pkt.dport = pkt.tcp_flags = pkt.seq = pkt.ack = pkt.window = 0
    pkt.tcp_hdr_len = pkt.udp_len = 0
    pkt.tcp_hdr_ok = False
    pkt.payload = wlan
    pkt.checksum_ok = None
    return pkt


def _link_layer(mv: memoryview, caplen: int, linktype: int) -> tuple[int, int, int] | None:
    """Walk the link layer like Zeek's packet analyzers: (IP offset, vlan, inner vlan)."""
    vlan = inner_vlan = tags = 0
    off = 0
    if linktype == LINKTYPE_ETHERNET:
        step = "ether"
    elif linktype == LINKTYPE_LINUX_SLL or linktype == LINKTYPE_LINUX_SLL2:
        hdr = 16 if linktype == LINKTYPE_LINUX_SLL else 20
        if caplen <= hdr:
            return None
        at = 14 if linktype == LINKTYPE_LINUX_SLL else 0
        step = _FROM_SLL.get((mv[at] << 8) | mv[at + 1])
        off = hdr
    elif linktype == LINKTYPE_NULL or linktype == LINKTYPE_LOOP:
        if caplen <= 4:
            return None
        if linktype == LINKTYPE_LOOP:
            family = _U32_BE.unpack_from(mv, 0)[0]
        else:
            # Host byte order of the capturing machine (Zeek reads little-endian): accept both.
            family = _U32_LE.unpack_from(mv, 0)[0]
            if family != _AF_INET and family not in _AF_INET6:
                family = _U32_BE.unpack_from(mv, 0)[0]
        step = "ip" if family == _AF_INET or family in _AF_INET6 else None
        off = 4
    elif linktype == LINKTYPE_IEEE802_11:
        step = "wlan"
    elif linktype == LINKTYPE_RADIOTAP:
        if caplen < 4:
            return None
        off = mv[2] | (mv[3] << 8)     # radiotap header length (little endian)
        if off > caplen:
            return None
        step = "wlan"
    elif linktype == LINKTYPE_PPP or linktype == LINKTYPE_PPP_SERIAL:
        if caplen <= 2:
            return None
        if mv[0] == 0xFF and mv[1] == 0x03:
            if caplen <= 4:
                return None
            step = _FROM_PPP.get((mv[2] << 8) | mv[3])
            off = 4
        else:
            step = _FROM_PPP.get((mv[0] << 8) | mv[1])
            off = 2
    else:
        # LINKTYPE_RAW, IPV4, IPV6 and anything unknown: Zeek's root default is raw IP.
        step = "ip" if linktype in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6) else None

    for _ in range(_MAX_LINK_STEPS):
        if step == "ip":
            return off, vlan, inner_vlan
        if step is None:
            return None
        rest = caplen - off
        if step == "ether":
            if rest <= 16:
                return None
            if mv[off + 12] == 0x89 and mv[off + 13] == 0x03:   # Cisco FabricPath
                if rest <= 30:
                    return None
                off += 16
                rest -= 16
            etype = (mv[off + 12] << 8) | mv[off + 13]
            off += 14
            if etype >= 1536:
                step = _FROM_ETHERNET.get(etype)
            elif etype <= 1500 and rest - 14 >= etype:
                step = "llc"
            else:
                return None
        elif step == "vlan":
            if rest <= 4:
                return None
            vid = ((mv[off] << 8) | mv[off + 1]) & 0x0FFF
            if tags == 0:
                vlan = vid
            else:
                inner_vlan = vid      # Zeek overwrites the inner tag on triple tagging
            tags += 1
            etype = (mv[off + 2] << 8) | mv[off + 3]
            off += 4
            if etype >= 1536:
                step = _FROM_VLAN.get(etype)
            elif etype <= 1500:
                step = "llc"
            else:
                return None
        elif step == "llc":
            # 802.2 SNAP with a zero OUI carries an ethertype; other LLC carries no IP for us.
            if rest < 3 or mv[off] != 0xAA or mv[off + 1] != 0xAA:
                return None
            llc = 3 if mv[off + 2] & 0x03 == 0x03 else 4
            if rest < llc + 5:
                return None
            at = off + llc
            if mv[at] or mv[at + 1] or mv[at + 2]:
                return None
            step = _FROM_SNAP.get((mv[at + 3] << 8) | mv[at + 4])
            off = at + 5
        elif step == "mpls":
            while True:
                if caplen - off <= 4:
                    return None
                bottom = mv[off + 2] & 0x01
                off += 4
                if bottom:
                    break
            step = "ip"
        elif step == "pppoe":
            if rest <= 8:
                return None
            step = _FROM_PPPOE.get((mv[off + 6] << 8) | mv[off + 7])
            off += 8
        elif step == "vntag":
            if rest <= 6:
                return None
            step = _FROM_VNTAG.get((mv[off + 4] << 8) | mv[off + 5])
            off += 6
        elif step == "wlan":
            at, amsdu = wlan_header(mv, caplen, off)
            if at < 0:
                return None
            if amsdu:
                return -1 - off, 0, 0     # an A-MSDU at `off`: _decode hands it to _amsdu
            off = llc_snap_ip(mv, at, caplen)
            if off < 0:
                return None
            step = "ip"
        elif step == "pbb":
            if rest <= 18:
                return None
            off += 4
            step = "ether"
        else:
            return None
    return None


def decode(
    frame: bytes | bytearray | memoryview,
    linktype: int,
    ts: float,
    wire_len: int,
    ignore_checksums: bool = False,
) -> Packet | None:
    """Decode one link-layer frame; None when it carries nothing the engine can use."""
    try:
        return _decode(frame, linktype, ts, wire_len, ignore_checksums)
    except (struct.error, IndexError, ValueError, TypeError):
        return None


def _decode(
    frame: bytes | bytearray | memoryview,
    linktype: int,
    ts: float,
    wire_len: int,
    ignore_checksums: bool,
) -> Packet | None:
    mv = frame if type(frame) is memoryview else memoryview(frame)
    caplen = len(mv)
    vlan = 0
    inner_vlan = 0

    # ---- link layer -> offset of the IP header (Ethernet + IP is the fast path)
    if (
        linktype == LINKTYPE_ETHERNET
        and caplen > 16
        and (mv[12] == 0x08 and mv[13] == 0x00 or mv[12] == 0x86 and mv[13] == 0xDD)
    ):
        off = 14
    else:
        link = _link_layer(mv, caplen, linktype)
        if link is None:
            return None
        off, vlan, inner_vlan = link
        if off < 0:
            return _amsdu(mv[-1 - off:], ts, ignore_checksums)
        if off >= caplen:
            return None

    # ---- IP layer
    frag = FRAG_NONE
    frag_id = frag_offset = frag_nh_at = 0
    frag_more = False
    version = mv[off] >> 4
    if version == 4:
        if caplen - off < 20:
            return None
        (b0, _tos, ip_len, frag_id, frag_field, ttl, proto, _hcs, src, dst) = _IPV4.unpack_from(
            mv, off
        )
        hdr_len = (b0 & 0x0F) << 2
        if hdr_len < 20 or caplen - off < hdr_len:
            return None
        if ip_len == 0:
            if not ignore_checksums:
                return None
            ip_len = caplen - off
        if ip_len < hdr_len or wire_len - off < ip_len:
            return None
        if not ignore_checksums and int.from_bytes(mv[off:off + hdr_len], "big") % 0xFFFF:
            return None   # bad IPv4 header checksum
        if proto == IPPROTO_ESP:
            return None
        frag_offset = (frag_field & 0x1FFF) << 3
        frag_more = bool(frag_field & 0x2000)
        if frag_offset or frag_more:
            frag = FRAG_LATER if frag_offset else FRAG_FIRST
        ip_version = 4
        l4_at = off + hdr_len
    elif version == 6:
        if caplen - off < 40:
            return None
        (_vtcfl, plen, proto, ttl, src, dst) = _IPV6.unpack_from(mv, off)
        ip_len = plen + 40
        if wire_len - off < ip_len:
            return None
        ip_version = 6
        end = off + ip_len
        if end > caplen:
            end = caplen
        pos = off + 40
        nh_at = off + 6
        # Walk the extension headers (Zeek's IPv6_Hdr_Chain).
        while True:
            if (
                proto == IPPROTO_HOPOPTS
                or proto == IPPROTO_DSTOPTS
                or proto == IPPROTO_ROUTING
                or proto == IPPROTO_AH
            ):
                if pos + 2 > end:
                    return None
                nxt = mv[pos]
                hl = mv[pos + 1]
                ext_len = (hl + 2) << 2 if proto == IPPROTO_AH else (hl + 1) << 3
                if pos + ext_len > end:
                    return None
                if proto == IPPROTO_ROUTING and ext_len >= 8:
                    # Type 0 with segments left: Zeek keys the flow on the final destination.
                    rtype = mv[pos + 2]
                    segleft = mv[pos + 3]
                    if rtype == 0 and segleft > 0 and hl >= 2 and hl % 2 == 0:
                        last = pos + 8 + (hl // 2 - 1) * 16
                        dst = bytes(mv[last:last + 16])
                nh_at = pos
                pos += ext_len
                proto = nxt
            elif proto == IPPROTO_FRAGMENT:
                if pos + 8 > end:
                    return None
                nxt, _res, offlg, ident = _FRAG6.unpack_from(mv, pos)
                f_off = offlg & 0xFFF8
                f_more = bool(offlg & 1)
                if f_off or f_more:
                    frag = FRAG_LATER if f_off else FRAG_FIRST
                    frag_id = ident
                    frag_offset = f_off
                    frag_more = f_more
                    frag_nh_at = nh_at - off
                    pos += 8
                    proto = nxt
                    break
                # Atomic fragment: a whole datagram, keep walking.
                nh_at = pos
                pos += 8
                proto = nxt
            elif proto == IPPROTO_ESP or proto == IPPROTO_MOBILITY or proto == IPPROTO_NONE:
                return None
            else:
                break
        hdr_len = pos - off
        l4_at = pos
    else:
        return None

    pkt = _new_packet(Packet)
    pkt.ts = ts
    pkt.wire_len = wire_len
    pkt.cap_len = caplen
    pkt.vlan = vlan
    pkt.inner_vlan = inner_vlan
    pkt.ip_version = ip_version
    pkt.src = src
    pkt.dst = dst
    pkt.proto = proto
    pkt.ip_len = ip_len
    pkt.ip_hdr_len = hdr_len
    pkt.ttl = ttl
    pkt.frag = frag

    ip_end = off + ip_len
    cap_end = ip_end if ip_end < caplen else caplen
    l4_len = ip_len - hdr_len
    cap_l4 = cap_end - l4_at
    pkt.l4_len = l4_len
    pkt.tcp_flags = pkt.seq = pkt.ack = pkt.window = pkt.tcp_hdr_len = pkt.udp_len = 0
    pkt.tcp_hdr_ok = False

    if frag:
        pkt.l3 = mv[off:cap_end]
        pkt.frag_id = frag_id
        pkt.frag_offset = frag_offset
        pkt.frag_more = frag_more
        pkt.frag_nh_at = frag_nh_at
        pkt.l4_ok = False
        pkt.sport = pkt.dport = 0
        pkt.payload_len = l4_len
        pkt.payload = mv[l4_at:cap_end] if cap_l4 > 0 else _EMPTY
        pkt.checksum_ok = None
        return pkt

    check = not ignore_checksums and cap_l4 >= l4_len
    if proto == IPPROTO_TCP:
        if l4_len >= 20 and cap_l4 >= 20:
            sport, dport, seq, ack, offres, flags, win = _TCP.unpack_from(mv, l4_at)
            thl = (offres >> 4) << 2
            pkt.l4_ok = True
            pkt.sport = sport
            pkt.dport = dport
            pkt.seq = seq
            pkt.ack = ack
            pkt.tcp_flags = flags
            pkt.window = win
            pkt.tcp_hdr_len = thl
            pkt.tcp_hdr_ok = 20 <= thl <= l4_len and thl <= cap_l4
            pkt.payload_len = l4_len - thl if l4_len > thl else 0
            data_at = l4_at + thl
            pkt.payload = mv[data_at:cap_end] if data_at < cap_end else _EMPTY
            if check:
                pkt.checksum_ok = (
                    int.from_bytes(src, "big") + int.from_bytes(dst, "big") + 6 + l4_len
                    + (int.from_bytes(mv[l4_at:ip_end], "big") << ((l4_len & 1) << 3))
                ) % 0xFFFF == 0
            else:
                pkt.checksum_ok = None
            return pkt
    elif proto == IPPROTO_UDP:
        if l4_len >= 8 and cap_l4 >= 8:
            sport, dport, ulen = _PORTS_LEN.unpack_from(mv, l4_at)
            pkt.l4_ok = True
            pkt.sport = sport
            pkt.dport = dport
            pkt.udp_len = ulen
            pkt.payload_len = l4_len - 8
            pkt.payload = mv[l4_at + 8:cap_end]
            # Zeek also wants the frame untruncated (wire length <= captured) for UDP.
            if check and wire_len <= caplen and (ip_version == 6 or mv[l4_at + 6] | mv[l4_at + 7]):
                pkt.checksum_ok = (
                    int.from_bytes(src, "big") + int.from_bytes(dst, "big") + 17 + l4_len
                    + (int.from_bytes(mv[l4_at:ip_end], "big") << ((l4_len & 1) << 3))
                ) % 0xFFFF == 0
            else:
                pkt.checksum_ok = None
            return pkt
    elif proto == IPPROTO_ICMP or proto == IPPROTO_ICMPV6:
        if l4_len >= 8 and cap_l4 >= 8:
            pkt.l4_ok = True
            pkt.sport = mv[l4_at]
            pkt.dport = mv[l4_at + 1]
            pkt.payload_len = l4_len - 8
            pkt.payload = mv[l4_at + 8:cap_end]
            if check:
                total = int.from_bytes(mv[l4_at:ip_end], "big") << ((l4_len & 1) << 3)
                if proto == IPPROTO_ICMPV6:
                    total += int.from_bytes(src, "big") + int.from_bytes(dst, "big") + 58 + l4_len
                pkt.checksum_ok = total % 0xFFFF == 0
            else:
                pkt.checksum_ok = None
            return pkt
    else:
        # Other IP protocols: no ports, nothing to check (Zeek's unknown-transport analyzer).
        pkt.l4_ok = True
        pkt.sport = pkt.dport = 0
        pkt.payload_len = l4_len
        pkt.payload = mv[l4_at:cap_end] if cap_l4 > 0 else _EMPTY
        pkt.checksum_ok = None
        return pkt

    # TCP/UDP/ICMP without a complete fixed header: Zeek weirds `truncated_header`, no connection.
    pkt.l4_ok = False
    pkt.sport = pkt.dport = 0
    pkt.payload_len = 0
    pkt.payload = _EMPTY
    pkt.checksum_ok = None
    return pkt
