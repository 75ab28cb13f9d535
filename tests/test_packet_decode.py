"""decode(): every field checked against the values put into scapy-built frames."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    fragment6,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import GRE, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw
from shuntd.capture.pcapfile import open_trace
from shuntd.defrag import Defragmenter
from shuntd.packet import (
    LINKTYPE_ETHERNET,
    LINKTYPE_IPV4,
    LINKTYPE_IPV6,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP,
    LINKTYPE_NULL,
    LINKTYPE_RAW,
    PROTO_AMSDU,
    decode,
)

ETH = LINKTYPE_ETHERNET
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "zeek"
A4 = "10.1.2.3"
B4 = "192.168.200.9"
A6 = "2001:db8::1"
B6 = "2001:db8:ffff::2"


def eth(**kw: int) -> Ether:
    """Ethernet with fixed MACs (scapy would otherwise resolve IPv6 neighbours: slow)."""
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", **kw)


def v4(a: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, a)


def v6(a: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, a)


def dec(frame: bytes, linktype: int = ETH, ts: float = 12.5, wire_len: int | None = None,
        ignore_checksums: bool = False):
    return decode(frame, linktype, ts, len(frame) if wire_len is None else wire_len,
                  ignore_checksums)


def corrupt(frame: bytes, at: int) -> bytes:
    b = bytearray(frame)
    b[at] ^= 0xFF
    return bytes(b)


def test_ethernet_ipv4_tcp_every_field() -> None:
    payload = b"hello, world\x00\x01"
    frame = bytes(
        Ether(src="00:11:22:33:44:55", dst="66:77:88:99:aa:bb")
        / IP(src=A4, dst=B4, ttl=37, id=4242, options=b"\x01\x01\x01\x00")  # 4 bytes options
        / TCP(sport=40000, dport=443, seq=3_000_000_000, ack=123456, flags="PA", window=29200,
              options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))])
        / Raw(payload)
    )
    p = dec(frame, ts=1700000000.123456)
    assert p is not None
    assert p.ts == 1700000000.123456
    assert p.wire_len == len(frame) and p.cap_len == len(frame)
    assert (p.vlan, p.inner_vlan) == (0, 0)
    assert p.ip_version == 4
    assert p.src == v4(A4) and p.dst == v4(B4)
    assert p.proto == 6 and p.ttl == 37 and p.frag == 0
    assert p.ip_hdr_len == 24
    assert p.tcp_hdr_len == 32
    assert p.ip_len == 24 + 32 + len(payload)
    assert p.l4_len == 32 + len(payload)
    assert p.l4_ok and p.tcp_hdr_ok
    assert (p.sport, p.dport) == (40000, 443)
    assert (p.seq, p.ack, p.window) == (3_000_000_000, 123456, 29200)
    assert p.tcp_flags == 0x18
    assert p.payload_len == len(payload)
    assert bytes(p.payload) == payload
    assert p.checksum_ok is True
    assert p.udp_len == 0


def test_tcp_bad_checksum_and_ignore() -> None:
    frame = bytes(eth() / IP(src=A4, dst=B4) / TCP(sport=1, dport=2, flags="S", chksum=0x1234))
    assert dec(frame).checksum_ok is False
    assert dec(frame, ignore_checksums=True).checksum_ok is None
    # Corrupting one payload byte breaks a correct checksum.
    good = bytes(eth() / IP(src=A4, dst=B4) / TCP(sport=1, dport=2) / Raw(b"abcde"))
    assert dec(good).checksum_ok is True
    assert dec(corrupt(good, len(good) - 1)).checksum_ok is False


def test_bad_ipv4_header_checksum_dropped_unless_ignored() -> None:
    frame = bytes(eth() / IP(src=A4, dst=B4, chksum=0xBEEF) / UDP(sport=5, dport=6))
    assert dec(frame) is None
    p = dec(frame, ignore_checksums=True)
    assert p is not None and p.sport == 5


def test_vlan_and_qinq() -> None:
    inner = IP(src=A4, dst=B4) / UDP(sport=53, dport=5353) / Raw(b"x" * 10)
    p = dec(bytes(eth() / Dot1Q(vlan=100) / inner))
    assert (p.vlan, p.inner_vlan, p.sport, p.udp_len) == (100, 0, 53, 18)
    p = dec(bytes(eth() / Dot1AD(vlan=13) / Dot1Q(vlan=10) / inner))
    assert (p.vlan, p.inner_vlan) == (13, 10)
    # 0x9100 outer tag, built by hand.
    frame = bytes(eth(type=0x9100)) + struct.pack("!HH", 0x2007, 0x8100)
    frame += struct.pack("!HH", 0x0FFF, 0x0800) + bytes(inner)
    p = dec(frame)
    assert (p.vlan, p.inner_vlan, p.payload_len) == (7, 0xFFF, 10)


def test_udp_fields_and_checksums() -> None:
    frame = bytes(eth() / IP(src=A4, dst=B4) / UDP(sport=1234, dport=53) / Raw(b"q" * 33))
    p = dec(frame)
    assert (p.proto, p.sport, p.dport, p.udp_len, p.payload_len) == (17, 1234, 53, 41, 33)
    assert bytes(p.payload) == b"q" * 33 and p.checksum_ok is True
    zero = bytes(eth() / IP(src=A4, dst=B4) / UDP(sport=1, dport=2, chksum=0) / Raw(b"zz"))
    assert dec(zero).checksum_ok is None  # IPv4 UDP checksum 0 = "none"
    zero6 = bytes(eth() / IPv6(src=A6, dst=B6) / UDP(sport=1, dport=2, chksum=0) / Raw(b"zz"))
    assert dec(zero6).checksum_ok is False  # IPv6 UDP checksum is mandatory
    assert dec(corrupt(frame, len(frame) - 1)).checksum_ok is False


def test_icmp_and_icmpv6() -> None:
    frame = bytes(eth() / IP(src=A4, dst=B4) / ICMP(type=8, code=0) / Raw(b"ping" * 5))
    p = dec(frame)
    assert (p.proto, p.sport, p.dport, p.payload_len, p.l4_len) == (1, 8, 0, 20, 28)
    assert p.checksum_ok is True
    assert dec(corrupt(frame, len(frame) - 1)).checksum_ok is False
    frame6 = bytes(eth() / IPv6(src=A6, dst=B6, hlim=3) / ICMPv6EchoRequest(data=b"abc"))
    p = dec(frame6)
    assert (p.ip_version, p.proto, p.sport, p.dport, p.ttl) == (6, 58, 128, 0, 3)
    assert p.ip_len == 40 + 8 + 3 and p.checksum_ok is True
    assert dec(corrupt(frame6, len(frame6) - 1)).checksum_ok is False


def test_ipv6_extension_headers() -> None:
    l4 = TCP(sport=2000, dport=80, flags="S", seq=7) / Raw(b"abc")
    pkt = (IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
           / AH(nh=6, payloadlen=4, spi=1, seq=1, icv=b"\x00" * 12) / l4)
    frame = bytes(eth() / pkt)
    p = dec(frame)
    assert p is not None
    ext = 8 + 8 + 24
    assert (p.proto, p.ip_hdr_len, p.ip_len) == (6, 40 + ext, 40 + ext + 20 + 3)
    assert (p.sport, p.dport, p.seq, p.tcp_flags) == (2000, 80, 7, 0x02)
    assert p.src == v6(A6) and p.dst == v6(B6)
    assert bytes(p.payload) == b"abc"


def test_ipv6_routing_type0_keys_on_final_destination() -> None:
    final = "2001:db8:9::99"
    # scapy's IPv6 sets the pseudo-header dst from the routing header; send the final hop.
    pkt = IPv6(src=A6, dst=B6) / IPv6ExtHdrRouting(type=0, segleft=1, addresses=[final])
    pkt = pkt / UDP(sport=9, dport=10)
    p = dec(bytes(eth() / pkt))
    assert p.dst == v6(final)
    assert p.proto == 17 and p.checksum_ok is True
    # Segments left 0: the header dst is the final destination.
    pkt0 = IPv6(src=A6, dst=B6) / IPv6ExtHdrRouting(type=0, segleft=0, addresses=[final])
    p = dec(bytes(eth() / pkt0 / UDP(sport=9, dport=10)))
    assert p.dst == v6(B6)


@pytest.mark.parametrize("nh", [50, 135, 59])
def test_ipv6_esp_mobility_nonext_dropped(nh: int) -> None:
    frame = bytes(eth() / IPv6(src=A6, dst=B6, nh=nh) / Raw(b"\x00" * 24))
    assert dec(frame) is None


def test_ipv4_esp_dropped() -> None:
    assert dec(bytes(eth() / IP(src=A4, dst=B4, proto=50) / Raw(b"\x00" * 24))) is None


def test_unknown_transport_and_gre() -> None:
    p = dec(bytes(eth() / IP(src=A4, dst=B4) / GRE() / Raw(b"abcd")))
    assert (p.proto, p.l4_ok, p.sport, p.dport, p.l4_len, p.checksum_ok) == (47, True, 0, 0, 8,
                                                                           None)


def test_truncated_transport_header() -> None:
    frame = bytes(eth() / IP(src=A4, dst=B4, proto=6) / Raw(b"\x00" * 10))
    p = dec(frame)
    assert p is not None and p.l4_ok is False and p.sport == 0
    # TCP data offset beyond the segment: key can be built, header is not valid.
    seg = bytes(TCP(sport=1, dport=2, dataofs=15))
    p = dec(bytes(eth() / IP(src=A4, dst=B4, proto=6) / Raw(seg)))
    assert p.l4_ok is True and p.tcp_hdr_ok is False and p.tcp_hdr_len == 60
    p = dec(bytes(eth() / IP(src=A4, dst=B4, proto=6) / Raw(bytes(TCP(dataofs=4)))))
    assert p.tcp_hdr_ok is False


def test_snaplen_truncation_tolerated_wire_shortfall_dropped() -> None:
    payload = b"D" * 1000
    frame = bytes(eth() / IP(src=A4, dst=B4) / TCP(sport=5, dport=6) / Raw(payload))
    cut = frame[:96]
    p = dec(cut, wire_len=len(frame))
    assert p is not None
    assert p.cap_len == 96 and p.wire_len == len(frame)
    assert p.ip_len == 20 + 20 + 1000 and p.payload_len == 1000
    assert bytes(p.payload) == payload[:96 - 54]
    assert p.checksum_ok is None  # not checkable: the segment is not complete
    # Wire length shorter than the IP total length: Zeek's truncated_IP_len drop.
    assert dec(frame[:96], wire_len=96) is None


def test_ethernet_padding_excluded() -> None:
    frame = bytes(eth() / IP(src=A4, dst=B4) / TCP(sport=5, dport=6, flags="A"))
    padded = frame + b"\xee" * (60 - len(frame))
    p = dec(padded)
    assert p.ip_len == 40 and p.payload_len == 0 and bytes(p.payload) == b""
    assert p.checksum_ok is True


def test_ip_len_zero() -> None:
    raw = bytearray(bytes(IP(src=A4, dst=B4) / UDP(sport=1, dport=2) / Raw(b"abcd")))
    raw[2:4] = b"\x00\x00"
    frame = bytes(eth(type=0x0800)) + bytes(raw)
    assert dec(frame) is None
    p = dec(frame, ignore_checksums=True)
    assert p is not None and p.ip_len == len(raw)


def test_ipv4_header_inconsistencies() -> None:
    good = bytes(IP(src=A4, dst=B4) / UDP(sport=1, dport=2))
    bad_ihl = bytearray(good)
    bad_ihl[0] = 0x44
    assert dec(bytes(bad_ihl), LINKTYPE_RAW, ignore_checksums=True) is None
    short_total = bytearray(good)
    short_total[2:4] = (12).to_bytes(2, "big")
    assert dec(bytes(short_total), LINKTYPE_RAW, ignore_checksums=True) is None
    assert dec(b"\x45\x00", LINKTYPE_RAW) is None
    assert dec(b"\x75" + good[1:], LINKTYPE_RAW) is None


def test_non_ip_frames() -> None:
    from scapy.layers.l2 import ARP
    assert dec(bytes(eth() / ARP())) is None
    assert dec(bytes(eth(type=0x0020) / Raw(b"\x00" * 40))) is None  # 802.3 length
    assert dec(b"") is None and dec(b"\x00" * 13) is None
    assert decode(b"\x45" * 60, 9999, 0.0, 60) is None  # unknown link type


def _inner4() -> bytes:
    return bytes(IP(src=A4, dst=B4, ttl=9) / TCP(sport=11, dport=22, flags="S") / Raw(b"hi"))


def _inner6() -> bytes:
    return bytes(IPv6(src=A6, dst=B6) / UDP(sport=33, dport=44) / Raw(b"hey"))


def _check4(p) -> None:
    assert p is not None and p.ip_version == 4 and p.src == v4(A4) and p.dst == v4(B4)
    assert (p.sport, p.dport, p.ttl, p.payload_len, p.checksum_ok) == (11, 22, 9, 2, True)


def _check6(p) -> None:
    assert p is not None and p.ip_version == 6 and p.src == v6(A6) and p.dst == v6(B6)
    assert (p.sport, p.dport, p.payload_len, p.checksum_ok) == (33, 44, 3, True)


def test_link_types() -> None:
    i4, i6 = _inner4(), _inner6()
    # Linux cooked v1: packet type, ARPHRD, addr len, 8-byte addr, protocol.
    sll = struct.pack("!HHH8sH", 0, 1, 6, b"\x00" * 8, 0x0800)
    _check4(dec(sll + i4, LINKTYPE_LINUX_SLL))
    sll = struct.pack("!HHH8sH", 4, 1, 6, b"\x00" * 8, 0x86DD)
    _check6(dec(sll + i6, LINKTYPE_LINUX_SLL))
    # SLL2: protocol, reserved, ifindex, ARPHRD, packet type, addr len, 8-byte addr.
    sll2 = struct.pack("!HHIHBB8s", 0x0800, 0, 3, 1, 0, 6, b"\x00" * 8)
    _check4(dec(sll2 + i4, LINKTYPE_LINUX_SLL2))
    sll2 = struct.pack("!HHIHBB8s", 0x86DD, 0, 3, 1, 0, 6, b"\x00" * 8)
    _check6(dec(sll2 + i6, LINKTYPE_LINUX_SLL2))
    _check4(dec(i4, LINKTYPE_RAW))
    _check6(dec(i6, LINKTYPE_RAW))
    _check4(dec(i4, LINKTYPE_IPV4))
    _check6(dec(i6, LINKTYPE_IPV6))
    # Zeek has no analyzer for 228/229: its root default (raw IP) picks the version nibble.
    _check6(dec(i6, LINKTYPE_IPV4))
    _check4(dec(i4, LINKTYPE_IPV6))
    # BSD null: host byte order (either), IPv6 family 24/28/30 or Linux 10.
    _check4(dec(struct.pack("<I", 2) + i4, LINKTYPE_NULL))
    _check4(dec(struct.pack(">I", 2) + i4, LINKTYPE_NULL))
    for fam in (24, 28, 30):
        _check6(dec(struct.pack("<I", fam) + i6, LINKTYPE_NULL))
    assert dec(struct.pack("<I", 7) + i4, LINKTYPE_NULL) is None
    # OpenBSD loop: network order.
    _check4(dec(struct.pack(">I", 2) + i4, LINKTYPE_LOOP))
    _check6(dec(struct.pack(">I", 24) + i6, LINKTYPE_LOOP))


def test_ipv4_fragments_reassembled_at_last_fragment() -> None:
    payload = bytes(range(256)) * 12
    whole = IP(src=A4, dst=B4, id=777) / UDP(sport=5000, dport=6000) / Raw(payload)
    frags = fragment(whole, fragsize=1000)
    assert len(frags) == 4
    defrag = Defragmenter()
    decoded = [dec(bytes(eth() / f), ts=100.0 + i) for i, f in enumerate(frags)]
    assert [p.frag for p in decoded] == [1, 2, 2, 2]
    assert decoded[0].l4_ok is False and decoded[1].sport == 0
    # Out of order: last fragment first, then the rest; completes at the last arrival.
    order = [3, 1, 0, 2]
    out = [defrag.add(decoded[i]) for i in order]
    assert out[:3] == [None, None, None]
    p = out[3]
    assert p is not None and p.frag == 0
    assert p.ts == 102.0  # time of the fragment that completed the datagram
    assert p.ip_len == 20 + 8 + len(payload)
    assert (p.sport, p.dport, p.udp_len, p.payload_len) == (5000, 6000, 8 + len(payload),
                                                           len(payload))
    assert bytes(p.payload) == payload and p.checksum_ok is True
    assert len(defrag) == 0


def test_ipv6_fragments_reassembled() -> None:
    payload = b"0123456789abcdef" * 100
    whole = IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(id=99) / TCP(sport=7, dport=8) / Raw(payload)
    frags = fragment6(whole, 600)
    assert len(frags) >= 3
    defrag = Defragmenter()
    decoded = [dec(bytes(eth() / f), ts=5.0 + i) for i, f in enumerate(frags)]
    assert decoded[0].frag == 1 and all(p.frag == 2 for p in decoded[1:])
    results = [defrag.add(p) for p in decoded]
    assert all(r is None for r in results[:-1])
    p = results[-1]
    assert p is not None and p.frag == 0
    assert p.ts == 5.0 + len(frags) - 1
    assert p.ip_len == 40 + 20 + len(payload)  # fragment header removed
    assert (p.proto, p.sport, p.dport, p.payload_len) == (6, 7, 8, len(payload))
    assert bytes(p.payload) == payload and p.checksum_ok is True


def test_ipv6_atomic_fragment_is_whole() -> None:
    frame = bytes(eth() / IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(offset=0, m=0, id=5)
                  / UDP(sport=1, dport=2) / Raw(b"abc"))
    p = dec(frame)
    assert p.frag == 0 and p.proto == 17 and p.ip_hdr_len == 48 and p.checksum_ok is True


def test_decode_accepts_bytes_bytearray_memoryview() -> None:
    frame = bytes(eth() / IP(src=A4, dst=B4) / UDP(sport=1, dport=2))
    for f in (frame, bytearray(frame), memoryview(frame)):
        assert dec(f).sport == 1


# ---- corpus: decoded fields cross-checked with tshark (an independent dissector) ----------

_TSHARK_FIELDS = ["vlan.id", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "ip.len", "ipv6.plen",
                  "tcp.srcport", "tcp.dstport", "udp.srcport", "udp.dstport", "tcp.seq_raw",
                  "tcp.ack_raw", "tcp.flags", "tcp.len", "udp.length", "icmp.type",
                  "icmpv6.type"]
_TSHARK_TRACES = ["core/ftp.ftp-ipv6", "core/ssh.basic", "core/q-in-q",
                  "core/http.http-connect-with-header", "core/irc.starttls", "core/tcp-padding",
                  "core/dhcp.dhcp-all-msg-types", "core/redis.django-cloud",
                  "core/rdp.rdpeudp-handshake-fail",
                  "core/modbus.modbus_and_non_modbus_on_port_502"]


def _tshark_rows(trace: Path) -> list[dict[str, str]]:
    cmd = ["tshark", "-r", str(trace), "-T", "fields", "-E", "separator=/t"]
    for f in _TSHARK_FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout
    rows = []
    for line in out.split("\n")[:-1]:
        # First occurrence of each field: the outer header (ICMP errors quote an inner one).
        rows.append({k: v.split(",")[0] for k, v in zip(_TSHARK_FIELDS, line.split("\t"),
                                                        strict=True)})
    return rows


@pytest.mark.corpus
@pytest.mark.skipif(not CORPUS.is_dir() or shutil.which("tshark") is None,
                    reason="needs ../shared/corpus and tshark")
@pytest.mark.parametrize("name", _TSHARK_TRACES)
def test_corpus_fields_match_tshark(name: str) -> None:
    trace = next((CORPUS / name).glob("trace.pcap*"))
    rows = _tshark_rows(trace)
    recs = list(open_trace(trace))
    assert len(rows) == len(recs)
    for i, ((ts, frame, wire_len, linktype), t) in enumerate(zip(recs, rows, strict=True)):
        p = decode(frame, linktype, ts, wire_len, ignore_checksums=True)
        where = f"{name} frame {i + 1}"
        if not t["ip.src"] and not t["ipv6.src"]:
            assert p is None, where
            continue
        assert p is not None, where
        if t["ip.src"]:
            assert (p.src, p.dst, p.ip_len) == (v4(t["ip.src"]), v4(t["ip.dst"]),
                                                int(t["ip.len"])), where
        else:
            assert (p.src, p.dst, p.ip_len) == (v6(t["ipv6.src"]), v6(t["ipv6.dst"]),
                                                int(t["ipv6.plen"]) + 40), where
        assert p.vlan == int(t["vlan.id"] or 0), where
        if t["tcp.srcport"]:
            assert (p.proto, p.sport, p.dport, p.seq, p.ack, p.tcp_flags, p.payload_len) == (
                6, int(t["tcp.srcport"]), int(t["tcp.dstport"]), int(t["tcp.seq_raw"]),
                int(t["tcp.ack_raw"]), int(t["tcp.flags"], 16), int(t["tcp.len"])), where
        elif t["udp.srcport"]:
            assert (p.proto, p.sport, p.dport, p.udp_len) == (
                17, int(t["udp.srcport"]), int(t["udp.dstport"]), int(t["udp.length"])), where
        elif t["icmp.type"] or t["icmpv6.type"]:
            assert p.sport == int(t["icmp.type"] or t["icmpv6.type"]), where


@pytest.mark.corpus
@pytest.mark.skipif(not CORPUS.is_dir() or shutil.which("tshark") is None,
                    reason="needs ../shared/corpus and tshark")
def test_corpus_outer_ip_fragments_reassembled() -> None:
    """GTP trace with fragmented outer IPv4: one packet per datagram, at its last fragment."""
    trace = CORPUS / "stretch" / "tunnels.gtp.outer_ip_frag" / "trace.pcap"
    out = subprocess.run(
        ["tshark", "-r", str(trace), "-Y", "ip.reassembled.length", "-T", "fields",
         "-e", "frame.number", "-e", "ip.reassembled.length"],
        capture_output=True, text=True, check=True, timeout=60).stdout
    expected = {int(n): 20 + int(length) for n, length in
                (line.split("\t") for line in out.split("\n") if line)}
    assert expected
    defrag = Defragmenter()
    got = {}
    for i, (ts, frame, wire_len, linktype) in enumerate(open_trace(trace), start=1):
        p = decode(frame, linktype, ts, wire_len, ignore_checksums=True)
        if p is not None and p.frag:
            whole = defrag.add(p)
            if whole is not None:
                assert whole.ts == ts and whole.frag == 0
                got[i] = whole.ip_len
    assert got == expected   # (a few datagrams in this trace never complete; tshark agrees)


def test_encapsulations_zeek_skips() -> None:
    """MPLS, PPPoE, VN-Tag, PBB, FabricPath, SNAP, PPP: Zeek's packet analyzers skip them."""
    i4, i6 = _inner4(), _inner6()
    mac = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01"
    labels = struct.pack("!II", 0x00010000 | 64, 0x00020100 | 64)   # second label: bottom
    _check4(dec(mac + b"\x88\x47" + labels + i4))
    p = dec(mac + b"\x81\x00" + struct.pack("!HH", 42, 0x8847) + labels + i6)
    _check6(p)
    assert p.vlan == 42
    pppoe = struct.pack("!BBHH", 0x11, 0, 0x1234, len(i6) + 2)
    _check6(dec(mac + b"\x88\x64" + pppoe + b"\x00\x57" + i6))
    assert dec(mac + b"\x88\x64" + pppoe + b"\xc0\x21" + i4) is None   # LCP: no IP
    vntag = b"\x80\x01\x00\x02" + struct.pack("!H", 0x8100)
    p = dec(mac + b"\x89\x26" + vntag + struct.pack("!HH", 7, 0x0800) + i4)
    _check4(p)
    assert p.vlan == 7
    assert dec(mac + b"\x89\x26" + b"\x80\x01\x00\x02\x08\x00" + i4) is None  # VN-Tag->IP
    pbb = b"\x00\x00\x00\x01" + mac + b"\x08\x00"
    _check4(dec(mac + b"\x88\xe7" + pbb + i4))
    fabricpath = mac + b"\x89\x03" + b"\x00" * 2   # 16 bytes, then the inner frame
    _check4(dec(fabricpath + mac + b"\x08\x00" + i4))
    snap = b"\xaa\xaa\x03\x00\x00\x00\x08\x00"
    _check4(dec(mac + struct.pack("!H", len(snap) + len(i4)) + snap + i4))
    assert dec(mac + struct.pack("!H", 8 + len(i4)) + b"\xaa\xaa\x03\x00\x00\x0c\x08\x00"
               + i4) is None                                      # non-zero OUI
    # Triple tagging: Zeek keeps the first tag and overwrites the inner one with the last.
    tags = struct.pack("!HHHHHH", 1, 0x8100, 2, 0x8100, 3, 0x0800)
    p = dec(mac + b"\x81\x00" + tags + i4)
    assert (p.vlan, p.inner_vlan) == (1, 3)
    # PPP link type 9: HDLC framing or bare protocol.
    _check4(dec(b"\xff\x03\x00\x21" + i4, 9))
    _check6(dec(b"\x00\x57" + i6, 9))
    _check4(dec(b"\xff\x03\x02\x81" + labels + i4, 9))


def test_defragmenter_bounds_and_timeout() -> None:
    def frags(ident: int) -> list:
        whole = IP(src=A4, dst=B4, id=ident) / UDP(sport=ident, dport=53) / Raw(b"p" * 100)
        return [dec(bytes(eth() / f), ts=float(ident)) for f in fragment(whole, fragsize=64)]

    d = Defragmenter(max_pending=2)
    a, b, c = frags(1), frags(2), frags(3)
    assert d.add(a[0]) is None and d.add(b[0]) is None and d.add(c[0]) is None
    assert (len(d), d.dropped) == (2, 1)           # the oldest (id 1) was evicted
    assert d.add(a[1]) is None                     # its rest starts a new, incomplete one
    assert (len(d), d.dropped) == (2, 2)
    assert d.add(c[1]).sport == 3                  # id 3 still completes
    # Byte bound: a tiny budget keeps at most one datagram pending.
    d = Defragmenter(max_bytes=10)
    d.add(a[0])
    d.add(b[0])
    assert len(d) == 1 and d.add(b[1]).sport == 2
    # Timeout in network time, counted from the first fragment.
    d = Defragmenter(timeout=30.0)
    d.add(a[0])
    assert d.expire(30.5) == 0 and d.expire(31.0) == 1 and len(d) == 0
    # Non-fragments pass through unchanged.
    whole = dec(bytes(eth() / IP(src=A4, dst=B4) / UDP(sport=9, dport=9)))
    assert d.add(whole) is whole


def test_defragmenter_overlap_keeps_first_arrival_and_size_grows() -> None:
    udp = bytes(UDP(sport=7, dport=7, len=8 + 32, chksum=0)) + b"A" * 32   # 40 bytes
    def frag(off: int, data: bytes, more: bool, ts: float):
        ip = IP(src=A4, dst=B4, id=55, proto=17, frag=off // 8, flags="MF" if more else 0)
        return dec(bytes(eth() / ip / Raw(data)), ts=ts)

    d = Defragmenter()
    assert d.add(frag(16, b"X" * 16, True, 1.0)) is None       # bytes 16..32: X
    assert d.add(frag(24, b"Y" * 16, False, 2.0)) is None      # 24..40: overlaps, last
    p = d.add(frag(0, udp[:24], True, 3.0))                     # 0..24 completes
    assert p is not None and p.ts == 3.0
    assert p.ip_len == 20 + 40 and p.udp_len == 40
    # Bytes 16..24 came first as X (kept over the offset-0 copy), 24..32 X kept over Y.
    assert bytes(p.payload) == b"A" * 8 + b"X" * 16 + b"Y" * 8


# ---- IEEE 802.11 and radiotap (Zeek's IEEE802_11 / Radiotap analyzers) -----------------------

def _wlan_data(payload: bytes, qos: bool = False, amsdu: bool = False, protected: bool = False,
               four_addr: bool = False) -> bytes:
    from scapy.layers.dot11 import Dot11, Dot11QoS
    fcfield = (0x40 if protected else 0) | (0x03 if four_addr else 0x01)
    hdr = Dot11(type=2, subtype=8 if qos else 0, FCfield=fcfield, addr1="02:00:00:00:00:01",
                addr2="02:00:00:00:00:02", addr3="02:00:00:00:00:03",
                addr4="02:00:00:00:00:04" if four_addr else None)
    if qos:
        hdr = hdr / Dot11QoS(A_MSDU_Present=1 if amsdu else 0)
    return bytes(hdr) + payload


def _snap_ip(ip: bytes) -> bytes:
    return b"\xaa\xaa\x03\x00\x00\x00\x08\x00" + ip


def test_ieee802_11_and_radiotap_data_frames() -> None:
    from scapy.layers.dot11 import RadioTap
    ip = bytes(IP(src=A4, dst=B4) / UDP(sport=1234, dport=53) / Raw(b"q" * 12))
    for frame, linktype in [
        (_wlan_data(_snap_ip(ip)), 105),
        (_wlan_data(_snap_ip(ip), qos=True), 105),
        (_wlan_data(_snap_ip(ip), four_addr=True), 105),
        (bytes(RadioTap()) + _wlan_data(_snap_ip(ip)), 127),
    ]:
        p = decode(frame, linktype, 1.0, len(frame))
        assert p is not None, frame.hex()
        assert (socket.inet_ntoa(p.src), p.sport, socket.inet_ntoa(p.dst), p.dport) == (
            A4, 1234, B4, 53)
        assert p.ip_len == len(ip) and bytes(p.payload) == b"q" * 12
    # A-MSDU of one subframe: 14-byte subframe header (DA, SA, length) before LLC.
    sub = _snap_ip(ip)
    amsdu = b"\x02" * 12 + struct.pack("!H", len(sub)) + sub
    p = decode(_wlan_data(amsdu, qos=True, amsdu=True), 105, 1.0, 200)
    assert p is not None and p.dport == 53


def test_ieee802_11_frames_without_usable_ip_are_dropped() -> None:
    from scapy.layers.dot11 import Dot11, Dot11Beacon
    ip = bytes(IP(src=A4, dst=B4) / UDP(sport=1, dport=2))
    beacon = bytes(Dot11(type=0, subtype=8) / Dot11Beacon())
    null_data = bytes(Dot11(type=2, subtype=4, FCfield=0x01)) + _snap_ip(ip)
    protected = _wlan_data(_snap_ip(ip), qos=True, protected=True)
    not_snap = _wlan_data(b"\x42\x42\x03" + ip)
    arp = _wlan_data(b"\xaa\xaa\x03\x00\x00\x00\x08\x06" + b"\x00" * 28)
    for frame in (beacon, null_data, protected, not_snap, arp, _wlan_data(b"")[:20]):
        assert decode(frame, 105, 1.0, len(frame)) is None
    assert decode(b"\x00\x00\xff\x00" + _wlan_data(_snap_ip(ip)), 127, 1.0, 100) is None


def test_ieee802_11_arbitrary_bytes_never_raise() -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    seed = _wlan_data(_snap_ip(bytes(IP(src=A4, dst=B4) / UDP(sport=1, dport=2))), qos=True)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=st.binary(max_size=120), cut=st.integers(0, 120), linktype=st.sampled_from(
        [105, 127]), flips=st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)),
                                    max_size=6))
    def run(body: bytes, cut: int, linktype: int, flips: list[tuple[int, int]]) -> None:
        for frame in (body, bytearray(seed[:cut] + body)):
            for at, val in flips:
                if isinstance(frame, bytearray) and at < len(frame):
                    frame[at] = val
            p = decode(bytes(frame), linktype, 1.0, len(frame))
            # An A-MSDU of several IP packets decodes to a carrier for the tracker.
            assert p is None or p.ip_version in (4, 6) or p.proto == PROTO_AMSDU

    run()
