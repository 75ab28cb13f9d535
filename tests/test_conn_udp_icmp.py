"""UDP, ICMP/ICMPv6 and unknown-IP flows: zeek-conn.md §10.6-10.7 cases from built packets."""

from __future__ import annotations

import logging

import pytest
from conn_packets import (
    T0,
    decode_ip,
    icmp_packet,
    raw_ip_packet,
    run_packets,
    summary,
    udp_packet,
)
from scapy.layers.inet import IP, UDP
from scapy.packet import Raw
from shuntd.conn.hooks import EngineHooks
from shuntd.conn.settings import EngineSettings

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

C = "10.0.0.1"
S = "10.0.0.2"


def ends(row: dict) -> tuple:
    return (row["id.orig_h"], row["id.orig_p"], row["id.resp_h"], row["id.resp_p"])


def test_case64_dns_query_and_answer() -> None:
    pkts = [udp_packet(C, 40000, S, 53, bytes(38), T0),
            udp_packet(S, 53, C, 40000, bytes(89), T0 + 0.1)]
    (row,) = run_packets(pkts)
    assert summary(row) == "SF Dd 38/89 1(66)/1(117)"
    assert row["proto"] == "udp" and row["ip_proto"] == 17
    assert ends(row) == (C, 40000, S, 53)


def test_case65_lone_query() -> None:
    (row,) = run_packets([udp_packet(C, 40000, S, 53, bytes(38), T0)])
    assert summary(row) == "S0 D -/- 1(66)/0(0)"


def test_case66_lone_answer_flips_on_first_packet() -> None:
    (row,) = run_packets([udp_packet(S, 53, C, 40000, bytes(89), T0)])
    assert summary(row) == "SHR ^d -/- 0(0)/1(117)"
    assert ends(row) == (C, 40000, S, 53)


def test_case67_no_likely_ports_first_sender_is_orig() -> None:
    a, b = "10.0.0.5", "10.0.0.6"
    rows = run_packets([udp_packet(a, 40000, b, 50000, b"x" * 10, T0),
                        udp_packet(b, 50000, a, 40000, b"y" * 20, T0 + 0.1)])
    assert [summary(r) for r in rows] == ["SF Dd 10/20 1(38)/1(48)"]
    rows = run_packets([udp_packet(b, 50000, a, 40000, b"y" * 20, T0),
                        udp_packet(a, 40000, b, 50000, b"x" * 10, T0 + 0.1)])
    assert ends(rows[0]) == (b, 50000, a, 40000)


def test_case68_broadcast_destination_suppresses_flip() -> None:
    (row,) = run_packets([udp_packet(S, 67, "255.255.255.255", 68, bytes(300), T0)])
    assert summary(row).split()[:2] == ["S0", "D"]
    assert ends(row) == (S, 67, "255.255.255.255", 68)
    (row,) = run_packets([udp_packet(S, 67, C, 68, bytes(300), T0)])
    assert summary(row).split()[:2] == ["SHR", "^d"]
    assert ends(row) == (C, 68, S, 67)


@pytest.mark.parametrize(("second", "lines"), [(61.0, 2), (60.0, 2), (59.0, 1)])
def test_case69_udp_inactivity_boundary_is_inclusive(second: float, lines: int) -> None:
    rows = run_packets([udp_packet(C, 40000, S, 5000, b"a", T0),
                        udp_packet(C, 40000, S, 5000, b"b", T0 + second)])
    assert len(rows) == lines
    if lines == 1:
        assert rows[0]["duration"] == pytest.approx(59.0, abs=1e-6)
        assert summary(rows[0]) == "S0 D 2/0 2(58)/0(0)"
    else:
        assert [summary(r) for r in rows] == ["S0 D -/- 1(29)/0(0)"] * 2


def test_case70_bad_udp_checksum() -> None:
    pkt = udp_packet(C, 40000, S, 5000, b"abc", T0, bad_checksum=True)
    (row,) = run_packets([pkt])
    assert summary(row) == "OTH C -/- 0(0)/0(0)"
    raw = bytes(IP(src=C, dst=S) / UDP(sport=40000, dport=5000, chksum=0xDEAD) / Raw(b"abc"))
    pkt = decode_ip(raw, T0, ignore_checksums=True)
    (row,) = run_packets([pkt], EngineSettings(ignore_checksums=True))
    assert summary(row) == "S0 D -/- 1(31)/0(0)"


class _NtpLikeFlip(EngineHooks):
    """Acts as Zeek's NTP analyzer: a server-mode message from the orig flips once."""

    def __init__(self) -> None:
        self.done: set[str] = set()

    def udp_payload(self, conn, is_orig, payload) -> None:
        if conn.uid not in self.done and is_orig and payload[0] & 7 == 4:
            self.done.add(conn.uid)
            conn.flip_roles()


def test_case71_application_flip_keeps_bytes_with_role() -> None:
    server_mode = bytes([0x24]) + bytes(47)   # LI 0, VN 4, mode 4
    client_mode = bytes([0x23]) + bytes(47)   # mode 3
    a, b = "10.0.0.7", "10.0.0.8"
    rows = run_packets([udp_packet(a, 123, b, 123, server_mode, T0),
                        udp_packet(b, 123, a, 123, client_mode, T0 + 0.1)], hooks=_NtpLikeFlip())
    (row,) = rows
    assert summary(row) == "S0 D^ 96/0 2(152)/0(0)"
    assert ends(row) == (b, 123, a, 123)


def test_case72_empty_datagram_counts() -> None:
    (row,) = run_packets([udp_packet(C, 40000, S, 5000, b"", T0)])
    assert summary(row) == "S0 D -/- 1(28)/0(0)"


def test_case73_echo_request_reply() -> None:
    rows = run_packets([icmp_packet(C, S, 8, 0, bytes(56), T0),
                        icmp_packet(S, C, 0, 0, bytes(56), T0 + 0.1)])
    (row,) = rows
    assert summary(row) == "OTH - 56/56 1(84)/1(84)"
    assert ends(row) == (C, 8, S, 0)
    assert row["proto"] == "icmp" and row["ip_proto"] == 1


def test_case74_reply_first_makes_replier_orig() -> None:
    (row,) = run_packets([icmp_packet(S, C, 0, 0, bytes(56), T0),
                          icmp_packet(C, S, 8, 0, bytes(56), T0 + 0.1)])
    assert ends(row) == (S, 0, C, 8)
    assert summary(row) == "OTH - 56/56 1(84)/1(84)"


def test_case75_unreachable_is_one_way() -> None:
    r = "10.0.0.9"
    (row,) = run_packets([icmp_packet(r, C, 3, 3, bytes(61), T0),
                          icmp_packet(r, C, 3, 3, bytes(61), T0 + 5)])
    assert ends(row) == (r, 3, C, 3)
    assert summary(row) == "OTH - 122/0 2(178)/0(0)"


def test_case76_icmpv6_types_as_ports() -> None:
    from scapy.layers.inet6 import (
        ICMPv6EchoReply,
        ICMPv6EchoRequest,
        ICMPv6MLReport2,
        ICMPv6ND_NS,
        IPv6,
    )
    a, b = "fe80::1", "fe80::2"
    pkts = [
        decode_ip(bytes(IPv6(src=a, dst="ff02::1:ff00:2") / ICMPv6ND_NS(tgt=b)), T0),
        decode_ip(bytes(IPv6(src=a, dst="ff02::16") / ICMPv6MLReport2()), T0 + 0.1),
        decode_ip(bytes(IPv6(src=a, dst=b) / ICMPv6EchoRequest(data=b"x" * 8)), T0 + 0.2),
        decode_ip(bytes(IPv6(src=b, dst=a) / ICMPv6EchoReply(data=b"x" * 8)), T0 + 0.3),
    ]
    rows = run_packets(pkts)
    got = sorted((r["id.orig_p"], r["id.resp_p"], r["ip_proto"], r["proto"]) for r in rows)
    assert got == [(128, 129, 58, "icmp"), (135, 136, 58, "icmp"), (143, 0, 58, "icmp")]
    echo = next(r for r in rows if r["id.orig_p"] == 128)
    assert summary(echo) == "OTH - 8/8 1(56)/1(56)"


def test_case77_bad_icmp_checksum_leaves_no_letter() -> None:
    (row,) = run_packets([icmp_packet(C, S, 8, 0, bytes(56), T0, bad_checksum=True)])
    assert summary(row) == "OTH - -/- 0(0)/0(0)"
    assert ends(row) == (C, 8, S, 0)


def test_case78_unknown_ip_protocol() -> None:
    rows = run_packets([raw_ip_packet(C, "224.0.0.5", 89, bytes(40), T0),
                        raw_ip_packet(C, "224.0.0.5", 89, bytes(40), T0 + 10)])
    (row,) = rows
    assert ends(row) == (C, 0, "224.0.0.5", 0)
    assert row["proto"] == "unknown_transport" and row["ip_proto"] == 89
    assert summary(row) == "OTH - 0/0 2(120)/0(0)"
