"""Frame builders for the XDP program tests and benches (scapy), plus byte-level breakers for
the malformed cases. Every builder returns wire bytes; `ip_len()` reads the IP length back
from those bytes by hand (the expectation comes from what was sent, not from the program)."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.packet import Packet, Raw

MACS = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}
ETH_LEN = 14
VLAN_TAG_LEN = 4


def ether(l3: Packet | bytes, vlans: Sequence[int] = (), qinq: bool = True) -> bytes:
    """Ethernet frame around an IP packet. vlans = (outer, inner) VIDs; with two tags the outer
    is 802.1ad (0x88a8) unless qinq=False (then both 0x8100)."""
    frame: Packet = Ether(**MACS)
    for i, vid in enumerate(vlans):
        tag = Dot1AD(vlan=vid) if (i == 0 and len(vlans) > 1 and qinq) else Dot1Q(vlan=vid)
        frame = frame / tag
    payload = l3 if isinstance(l3, Packet) else Raw(l3)
    return bytes(frame / payload)


def l3_offset(vlans: int = 0) -> int:
    return ETH_LEN + VLAN_TAG_LEN * vlans


def ip_len(frame: bytes, vlans: int = 0) -> int:
    """IP bytes of the packet in `frame`: IPv4 total length or IPv6 payload length + 40."""
    off = l3_offset(vlans)
    version = frame[off] >> 4
    if version == 4:
        return struct.unpack_from("!H", frame, off + 2)[0]
    return struct.unpack_from("!H", frame, off + 4)[0] + 40


def ip(src: str, dst: str) -> Packet:
    """IPv4 or IPv6 header by the address family of src."""
    return IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)


def tcp(src: str, sport: int, dst: str, dport: int, flags: str = "A", seq: int = 1000,
        ack: int = 2000, payload: bytes = b"", vlans: Sequence[int] = (),
        options: list | None = None) -> bytes:
    seg = TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack,
              options=options or [])
    return ether(ip(src, dst) / seg / Raw(payload) if payload else ip(src, dst) / seg, vlans)


def udp(src: str, sport: int, dst: str, dport: int, payload: bytes = b"x" * 8,
        vlans: Sequence[int] = ()) -> bytes:
    return ether(ip(src, dst) / UDP(sport=sport, dport=dport) / Raw(payload), vlans)


def icmp4(src: str, dst: str, icmp_type: int, code: int = 0, payload: bytes = b"p" * 16,
          vlans: Sequence[int] = ()) -> bytes:
    return ether(IP(src=src, dst=dst) / ICMP(type=icmp_type, code=code) / Raw(payload), vlans)


def icmp6(src: str, dst: str, icmp_type: int, code: int = 0, payload: bytes = b"p" * 16,
          vlans: Sequence[int] = ()) -> bytes:
    layer: Packet
    if icmp_type == 128:
        layer = ICMPv6EchoRequest(data=payload)
    elif icmp_type == 129:
        layer = ICMPv6EchoReply(data=payload)
    elif icmp_type == 135:
        layer = ICMPv6ND_NS(tgt=dst)
    elif icmp_type == 136:
        layer = ICMPv6ND_NA(tgt=src)
    else:  # any other type: raw header (type, code, checksum 0, 4 bytes rest) + payload
        return ether(IPv6(src=src, dst=dst, nh=58) / Raw(bytes([icmp_type, code]) + b"\0" * 6
                                                         + payload), vlans)
    return ether(IPv6(src=src, dst=dst) / layer, vlans)


def other_proto(src: str, dst: str, proto: int, payload: bytes = b"\0" * 24,
                vlans: Sequence[int] = ()) -> bytes:
    """IP packet of an arbitrary protocol number (ESP 50, GRE 47, SCTP 132, ...)."""
    l3 = IPv6(src=src, dst=dst, nh=proto) if ":" in src else IP(src=src, dst=dst, proto=proto)
    return ether(l3 / Raw(payload), vlans)


def tcp_v4_options(src: str, sport: int, dst: str, dport: int, option_bytes: bytes,
                   flags: str = "A") -> bytes:
    """IPv4 with header options (len must make the header a multiple of 4 bytes)."""
    l3 = IP(src=src, dst=dst, options=[IPOption(option_bytes)])
    return ether(l3 / TCP(sport=sport, dport=dport, flags=flags) / Raw(b"d" * 10))


EXT_HEADERS = {
    "hop": lambda: IPv6ExtHdrHopByHop(),
    "routing": lambda: IPv6ExtHdrRouting(),
    "dest": lambda: IPv6ExtHdrDestOpt(),
    "frag_first": lambda: IPv6ExtHdrFragment(offset=0, m=1, id=7),
}


def tcp_v6_ext(src: str, sport: int, dst: str, dport: int, chain: Sequence[str],
               flags: str = "A", payload: bytes = b"d" * 10) -> bytes:
    """IPv6 TCP behind a chain of extension headers named in EXT_HEADERS."""
    pkt: Packet = IPv6(src=src, dst=dst)
    for name in chain:
        pkt = pkt / EXT_HEADERS[name]()
    return ether(pkt / TCP(sport=sport, dport=dport, flags=flags) / Raw(payload))


def v4_fragment(src: str, dst: str, proto: int, offset8: int, more: bool,
                payload: bytes) -> bytes:
    """One IPv4 fragment; offset8 in 8-byte units, payload = whatever that fragment carries."""
    l3 = IP(src=src, dst=dst, proto=proto, id=99, frag=offset8, flags="MF" if more else 0)
    return ether(l3 / Raw(payload))


def v6_fragment(src: str, dst: str, nh: int, offset8: int, more: bool, payload: bytes) -> bytes:
    l3 = IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(nh=nh, offset=offset8, m=int(more), id=9)
    return ether(l3 / Raw(payload))


def tcp_header(sport: int, dport: int, flags: str = "A") -> bytes:
    """20 bytes of a TCP header, for fragments that carry one."""
    return bytes(TCP(sport=sport, dport=dport, flags=flags))[:20]


def patch(frame: bytes, offset: int, new: bytes) -> bytes:
    """frame with bytes at offset replaced (to break headers on purpose)."""
    return frame[:offset] + new + frame[offset + len(new):]


def raw_frame(ethertype: int, body: bytes) -> bytes:
    """Ethernet header with any ethertype and body (ARP, truncated tags, ...)."""
    dst = bytes.fromhex(MACS["dst"].replace(":", ""))
    src = bytes.fromhex(MACS["src"].replace(":", ""))
    return dst + src + struct.pack("!H", ethertype) + body
