"""The XDP program itself, through BPF_PROG_TEST_RUN on the real compiled object (root only).

Expectations come from the frames we send (IP lengths read back from our own bytes), from the
ordering rule and ICMP table in bpf/shuntd.h / zeek-conn.md 4.3, and from hand calculation.
Invariants: a packet of no shunted flow/pair is never dropped; a packet of one always is, from
both directions, counted on the sender's side with its IP bytes.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import xdp_frames as fr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("needs root (BPF)", allow_module_level=True)
bcc = pytest.importorskip("bcc")

from shuntd.datapath import program as P  # noqa: E402
from shuntd.datapath.errors import KernelHeadersMissingError, NotPrivilegedError  # noqa: E402
from shuntd.datapath.program import (  # noqa: E402
    ENTRY_FLOW,
    ENTRY_PAIR,
    XDP_DROP,
    XDP_PASS,
    CompileError,
    EventType,
    StatIndex,
    XdpProgram,
)

S = StatIndex
TCP, UDP, ICMP, ICMP6 = 6, 17, 1, 58
A4, B4 = "10.0.0.1", "10.0.0.2"          # A4 < B4: A4 is side 1
A6, B6 = "2001:db8::1", "2001:db8::2"    # A6 < B6
CLOCK_MONOTONIC_COARSE = 6               # Linux clockid; Python's time module lacks the name


class Lab:
    """One compiled program plus what the tests need around it."""

    def __init__(self, prog: XdpProgram):
        self.prog = prog
        self.events: list[Any] = []
        self.pairs: list[Any] = []
        prog.events.open_ring_buffer(self._on_event)

    def _on_event(self, _ctx: Any, data: Any, _size: int) -> None:
        self.events.append(self.prog.parse_event(data))

    def run(self, frame: bytes) -> int:
        return self.prog.test_run(frame).retval

    def drain(self) -> list[Any]:
        self.prog.bpf.ring_buffer_consume()
        out, self.events = self.events, []
        return out

    def shunt(self, src: str, sport: int, dst: str, dport: int, proto: int, vlan: int = 0,
              inner: int = 0, lease_s: float = 60.0) -> tuple[Any, int]:
        key, side = self.prog.flow_key(src, sport, dst, dport, proto, vlan, inner)
        self.prog.flows[key] = self.prog.new_value(P.lease_deadline_ns(lease_s))
        return key, side

    def shunt_pair(self, a: str, b: str, vlan: int = 0, inner: int = 0,
                   lease_s: float = 60.0) -> tuple[Any, int]:
        key, side = self.prog.pair_key(a, b, vlan, inner)
        self.prog.ip_pairs[key] = self.prog.new_value(P.lease_deadline_ns(lease_s))
        self.prog.pair_added(key)
        self.pairs.append(key)
        return key, side

    def reset(self) -> None:
        self.prog.flows.clear()
        for key in self.pairs:
            self.prog.pair_removed(key)
        self.pairs.clear()
        self.prog.ip_pairs.clear()
        self.prog.write_config(flags=0, pairs_active=0)
        self.drain()

    def stats(self) -> dict[Any, int]:
        return self.prog.stats()


@pytest.fixture(scope="module")
def lab_module() -> Iterator[Lab]:
    prog = XdpProgram.compile(flows_max=4096, pairs_max=1024)
    try:
        yield Lab(prog)
    finally:
        prog.close()


@pytest.fixture
def lab(lab_module: Lab) -> Iterator[Lab]:
    lab_module.reset()
    yield lab_module
    lab_module.reset()


def delta(before: dict[Any, int], after: dict[Any, int]) -> dict[Any, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def value(lab: Lab, key: Any, pair: bool = False) -> Any:
    return (lab.prog.ip_pairs if pair else lab.prog.flows)[key]


# ---------------------------------------------------------------------------------------------
# header-derived names


def test_stat_and_event_names_come_from_the_header() -> None:
    for name in ("SEEN", "PASSED", "DROPPED_FLOW", "DROPPED_PAIR", "NOT_IP", "UNPARSEABLE",
                 "RINGBUF_RESERVE_FAIL", "LEASE_EXPIRED_PASS", "FRAG_NONFIRST"):
        assert name in StatIndex.__members__
    assert {"TCP_FIN", "TCP_RST", "LEASE_EXPIRED"} <= set(EventType.__members__)
    # zeek-conn.md 4.3, by hand
    assert dict(P.ICMP4_COUNTERPART) == {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 10: 9,
                                         9: 10, 17: 18, 18: 17}
    assert P.ICMP6_COUNTERPART[128] == 129 and P.ICMP6_COUNTERPART[136] == 135
    assert P.ICMP6_COUNTERPART[144] == 145 and 143 not in P.ICMP6_COUNTERPART


def test_ctypes_layouts_match_header_sizes(lab: Lab) -> None:
    p = lab.prog
    assert [ctypes.sizeof(t) for t in (p.FlowKey, p.PairKey, p.FlowValue, p.ShuntEvent)] == \
        [44, 36, 96, 88]
    assert p.stats_table.max_entries == P.STAT_COUNT
    assert p.flows.max_entries == 4096 and p.ip_pairs.max_entries == 1024


# ---------------------------------------------------------------------------------------------
# TCP/UDP over IPv4 and IPv6: both directions, sides, IP bytes


@pytest.mark.parametrize("a,b", [(A4, B4), (A6, B6)], ids=["v4", "v6"])
@pytest.mark.parametrize("proto", [TCP, UDP])
def test_shunted_flow_dropped_both_directions_counted_per_side(lab: Lab, a: str, b: str,
                                                               proto: int) -> None:
    build = fr.tcp if proto == TCP else fr.udp
    key, side = lab.shunt(b, 40000, a, 443, proto)  # orig b; a < b so b is side 2
    assert side == 2
    ab = build(a, 443, b, 40000, payload=b"r" * 100)
    ba = build(b, 40000, a, 443, payload=b"q" * 7)
    before = lab.stats()
    assert [lab.run(ba), lab.run(ba), lab.run(ab)] == [XDP_DROP] * 3
    v = value(lab, key)
    assert (v.pkts1, v.bytes1) == (1, fr.ip_len(ab))
    assert (v.pkts2, v.bytes2) == (2, 2 * fr.ip_len(ba))
    assert v.last_seen_ns > 0
    d = delta(before, lab.stats())
    assert d[S.DROPPED_FLOW] == 3 and d[S.SEEN] == 3
    assert d[S.BYTES_DROPPED_FLOW] == fr.ip_len(ab) + 2 * fr.ip_len(ba)
    assert S.PASSED not in d
    # same hosts, another port, another protocol: not shunted
    assert lab.run(build(a, 444, b, 40000)) == XDP_PASS
    other = fr.udp if proto == TCP else fr.tcp
    assert lab.run(other(a, 443, b, 40000)) == XDP_PASS
    assert lab.drain() == []


def test_ip_bytes_are_ip_lengths_not_frame_lengths(lab: Lab) -> None:
    key, _ = lab.shunt(A4, 1000, B4, 2000, UDP)
    frame = fr.udp(A4, 1000, B4, 2000, payload=b"")  # 14 + 20 + 8 = 42 bytes
    padded = frame + b"\0" * 18                      # Ethernet minimum-size padding
    assert lab.run(padded) == XDP_DROP
    assert value(lab, key).bytes1 == 28
    key6, _ = lab.shunt(A6, 1000, B6, 2000, UDP)
    assert lab.run(fr.udp(A6, 1000, B6, 2000, payload=b"x" * 30)) == XDP_DROP
    assert value(lab, key6).bytes1 == 40 + 8 + 30


def test_same_address_ordered_by_port(lab: Lab) -> None:
    key, side = lab.shunt(A4, 5000, A4, 80, TCP)
    assert side == 2 and key.port1 == 80 and key.port2 == 5000
    assert lab.run(fr.tcp(A4, 5000, A4, 80)) == XDP_DROP
    assert lab.run(fr.tcp(A4, 80, A4, 5000)) == XDP_DROP
    v = value(lab, key)
    assert (v.pkts1, v.pkts2) == (1, 1)


def test_ipv4_mapped_ordering_against_ipv6(lab: Lab) -> None:
    # ::ffff:10.0.0.1 sorts after 2001:db8::... only if its first byte is bigger: 0x00 < 0x20,
    # so the mapped IPv4 address is always side 1 against a global IPv6 address.
    _, side = lab.prog.flow_key(B6, 1, A4, 2, UDP)
    assert side == 2


@pytest.mark.parametrize("opt_len", [4, 8, 40])
def test_ipv4_options_are_skipped_by_ihl(lab: Lab, opt_len: int) -> None:
    key, _ = lab.shunt(A4, 1234, B4, 80, TCP)
    frame = fr.tcp_v4_options(A4, 1234, B4, 80, b"\x01" * (opt_len - 1) + b"\x00")
    assert frame[14] & 0x0F == 5 + opt_len // 4
    assert lab.run(frame) == XDP_DROP
    assert value(lab, key).bytes1 == fr.ip_len(frame) == 20 + opt_len + 20 + 10


@pytest.mark.parametrize("chain", [["hop"], ["routing"], ["dest"], ["frag_first"],
                                   ["hop", "dest", "routing", "dest", "frag_first"]],
                         ids=lambda c: "+".join(c))
def test_ipv6_extension_headers(lab: Lab, chain: list[str]) -> None:
    key, side = lab.shunt(B6, 5555, A6, 22, TCP)
    frame = fr.tcp_v6_ext(B6, 5555, A6, 22, chain)
    assert lab.run(frame) == XDP_DROP
    v = value(lab, key)
    assert side == 2 and (v.pkts2, v.bytes2) == (1, fr.ip_len(frame))
    assert lab.run(fr.tcp_v6_ext(B6, 5556, A6, 22, chain)) == XDP_PASS


def test_ipv6_chain_longer_than_the_walk_is_passed(lab: Lab) -> None:
    lab.shunt(A6, 1, B6, 2, TCP)
    frame = fr.tcp_v6_ext(A6, 1, B6, 2, ["dest"] * 7)
    before = lab.stats()
    assert lab.run(frame) == XDP_PASS
    assert delta(before, lab.stats())[S.L4_UNPARSEABLE] == 1


# ---------------------------------------------------------------------------------------------
# VLAN and QinQ


def test_vlan_id_is_part_of_the_key(lab: Lab) -> None:
    key, _ = lab.shunt(A4, 1, B4, 2, TCP, vlan=42)
    assert lab.run(fr.tcp(A4, 1, B4, 2, vlans=[42])) == XDP_DROP
    assert lab.run(fr.tcp(B4, 2, A4, 1, vlans=[42])) == XDP_DROP
    assert lab.run(fr.tcp(A4, 1, B4, 2, vlans=[43])) == XDP_PASS
    assert lab.run(fr.tcp(A4, 1, B4, 2)) == XDP_PASS
    v = value(lab, key)
    assert (v.pkts1, v.pkts2) == (1, 1)


@pytest.mark.parametrize("qinq", [True, False], ids=["88a8+8100", "8100+8100"])
def test_qinq_outer_and_inner(lab: Lab, qinq: bool) -> None:
    key, _ = lab.shunt(A6, 7, B6, 8, UDP, vlan=100, inner=200)
    frame = fr.ether(fr.ip(A6, B6) / fr.UDP(sport=7, dport=8), vlans=[100, 200], qinq=qinq)
    assert lab.run(frame) == XDP_DROP
    assert value(lab, key).bytes1 == fr.ip_len(frame, vlans=2)
    swapped = fr.ether(fr.ip(A6, B6) / fr.UDP(sport=7, dport=8), vlans=[200, 100], qinq=qinq)
    assert lab.run(swapped) == XDP_PASS


def test_ignore_vlans_flag(lab: Lab) -> None:
    lab.shunt(A4, 1, B4, 2, TCP)
    lab.prog.write_config(flags=P.CFG_IGNORE_VLANS)
    assert lab.run(fr.tcp(A4, 1, B4, 2, vlans=[5, 6])) == XDP_DROP


def test_third_vlan_tag_is_unparseable(lab: Lab) -> None:
    lab.shunt_pair(A4, B4)
    frame = fr.ether(fr.Dot1Q(vlan=3) / fr.IP(src=A4, dst=B4) / fr.UDP(), vlans=[1, 2])
    before = lab.stats()
    assert lab.run(frame) == XDP_PASS
    assert delta(before, lab.stats()) == {S.SEEN: 1, S.PASSED: 1, S.UNPARSEABLE: 1}


# ---------------------------------------------------------------------------------------------
# ICMP / ICMPv6 (Zeek's port convention)


def test_icmp_echo_request_and_reply_share_one_entry(lab: Lab) -> None:
    key, side = lab.shunt(B4, 8, A4, 0, ICMP)  # conn: orig B4 type 8, resp A4 counterpart 0
    assert side == 2 and (key.port1, key.port2) == (0, 8)
    req, rep = fr.icmp4(B4, A4, 8), fr.icmp4(A4, B4, 0)
    assert [lab.run(req), lab.run(rep), lab.run(req)] == [XDP_DROP] * 3
    v = value(lab, key)
    assert (v.pkts1, v.bytes1, v.pkts2, v.bytes2) == (1, fr.ip_len(rep), 2, 2 * fr.ip_len(req))
    # a timestamp request between the same hosts is another connection
    assert lab.run(fr.icmp4(B4, A4, 13)) == XDP_PASS


def test_icmpv6_paired_types(lab: Lab) -> None:
    echo, _ = lab.shunt(A6, 128, B6, 129, ICMP6)
    nd, _ = lab.shunt(A6, 135, B6, 136, ICMP6)
    assert lab.run(fr.icmp6(A6, B6, 128)) == XDP_DROP
    assert lab.run(fr.icmp6(B6, A6, 129)) == XDP_DROP
    assert lab.run(fr.icmp6(A6, B6, 135)) == XDP_DROP
    assert lab.run(fr.icmp6(B6, A6, 136)) == XDP_DROP
    assert (value(lab, echo).pkts1, value(lab, echo).pkts2) == (1, 1)
    assert (value(lab, nd).pkts1, value(lab, nd).pkts2) == (1, 1)


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_icmp_one_way_keyed_source_first(lab: Lab, family: str) -> None:
    # destination unreachable (3/3) and ICMPv6 dest unreachable (1/4): (type, code), not
    # ordered: the sender B is addr1 although A < B.
    if family == "v4":
        proto, build, a, b, t, code = ICMP, fr.icmp4, A4, B4, 3, 3
    else:
        proto, build, a, b, t, code = ICMP6, fr.icmp6, A6, B6, 1, 4
    assert P.icmp_ports(proto, t, code) == (t, code, True)
    key, side = lab.shunt(b, t, a, code, proto)
    assert side == 1 and P.key_endpoints(key)[0] == ipaddress.ip_address(b)
    frame = build(b, a, t, code)
    assert lab.run(frame) == XDP_DROP
    assert (value(lab, key).pkts1, value(lab, key).bytes1) == (1, fr.ip_len(frame))
    assert lab.run(build(a, b, t, code)) == XDP_PASS   # other direction: another connection
    assert lab.run(build(b, a, t, code + 1)) == XDP_PASS


def test_icmpv6_mld_report_is_one_way(lab: Lab) -> None:
    key, _ = lab.shunt(B6, 143, A6, 0, ICMP6)
    assert lab.run(fr.icmp6(B6, A6, 143, 0)) == XDP_DROP
    assert lab.run(fr.icmp6(A6, B6, 143, 0)) == XDP_PASS


# ---------------------------------------------------------------------------------------------
# fragments and other protocols


def test_ipv4_first_fragment_matches_flow_nonfirst_only_pairs(lab: Lab) -> None:
    key, _ = lab.shunt(A4, 1111, B4, 2222, TCP)
    first = fr.v4_fragment(A4, B4, TCP, 0, True, fr.tcp_header(1111, 2222) + b"a" * 12)
    later = fr.v4_fragment(A4, B4, TCP, 4, False, b"b" * 40)
    before = lab.stats()
    assert lab.run(first) == XDP_DROP
    assert lab.run(later) == XDP_PASS
    d = delta(before, lab.stats())
    assert d[S.FRAG_NONFIRST] == 1 and d[S.DROPPED_FLOW] == 1 and d[S.PASSED] == 1
    assert value(lab, key).bytes1 == fr.ip_len(first) == 52
    pkey, _ = lab.shunt_pair(A4, B4)
    assert lab.run(later) == XDP_DROP
    assert (value(lab, pkey, pair=True).pkts1, value(lab, pkey, pair=True).bytes1) == (1, 60)


def test_ipv6_fragments(lab: Lab) -> None:
    key, _ = lab.shunt(A6, 53, B6, 5353, UDP)
    first = fr.v6_fragment(A6, B6, UDP, 0, True, bytes(fr.UDP(sport=53, dport=5353))[:8] +
                           b"x" * 8)
    later = fr.v6_fragment(A6, B6, UDP, 2, False, b"y" * 24)
    assert lab.run(first) == XDP_DROP
    before = lab.stats()
    assert lab.run(later) == XDP_PASS
    assert delta(before, lab.stats())[S.FRAG_NONFIRST] == 1
    lab.shunt_pair(B6, A6)
    assert lab.run(later) == XDP_DROP


def test_tiny_first_fragment_without_l4_header_only_pairs(lab: Lab) -> None:
    lab.shunt(A4, 1111, B4, 2222, TCP)
    tiny = fr.v4_fragment(A4, B4, TCP, 0, True, fr.tcp_header(1111, 2222)[:8])
    before = lab.stats()
    assert lab.run(tiny) == XDP_PASS
    assert delta(before, lab.stats())[S.L4_UNPARSEABLE] == 1


@pytest.mark.parametrize("proto", [47, 50, 132], ids=["gre", "esp", "sctp"])
@pytest.mark.parametrize("a,b", [(A4, B4), (A6, B6)], ids=["v4", "v6"])
def test_other_protocols(lab: Lab, proto: int, a: str, b: str) -> None:
    frame = fr.other_proto(b, a, proto)
    assert lab.run(frame) == XDP_PASS
    # flow entry with ports 0 (Zeek's unknown_transport key) ...
    key, side = lab.shunt(b, 0, a, 0, proto)
    assert lab.run(frame) == XDP_DROP
    assert side == 2 and value(lab, key).bytes2 == fr.ip_len(frame)
    lab.prog.flows.clear()
    # ... or the IP pair
    pkey, pside = lab.shunt_pair(b, a)
    assert lab.run(frame) == XDP_DROP
    assert pside == 2 and value(lab, pkey, pair=True).pkts2 == 1
    assert lab.run(fr.other_proto(b, "10.0.0.3" if ":" not in a else "2001:db8::3",
                                  proto)) == XDP_PASS


def test_pair_covers_every_protocol_and_vlan_matters(lab: Lab) -> None:
    pkey, _ = lab.shunt_pair(B4, A4, vlan=9)
    frames = [fr.tcp(A4, 1, B4, 2, vlans=[9]), fr.udp(B4, 3, A4, 4, vlans=[9]),
              fr.icmp4(A4, B4, 8, vlans=[9]), fr.other_proto(B4, A4, 50, vlans=[9])]
    assert [lab.run(f) for f in frames] == [XDP_DROP] * 4
    v = value(lab, pkey, pair=True)
    assert (v.pkts1, v.pkts2) == (2, 2)
    assert v.bytes1 == fr.ip_len(frames[0], 1) + fr.ip_len(frames[2], 1)
    assert lab.run(fr.tcp(A4, 1, B4, 2)) == XDP_PASS


def test_pair_filter_false_positive_is_counted_and_passed(lab: Lab) -> None:
    key, _ = lab.prog.pair_key(A4, B4)
    lab.prog.pair_added(key)          # filter says "maybe", but no entry in ip_pairs
    lab.pairs.append(key)
    before = lab.stats()
    assert lab.run(fr.udp(A4, 1, B4, 2)) == XDP_PASS
    assert delta(before, lab.stats())[S.PAIR_FILTER_FALSE] == 1


# ---------------------------------------------------------------------------------------------
# truncated and malformed input: passed, counted, never dropped


def _malformed_cases() -> dict[str, tuple[bytes, StatIndex]]:
    good4 = fr.tcp(A4, 1, B4, 2)
    good6 = fr.tcp(A6, 1, B6, 2)
    return {
        "ihl_4": (fr.patch(good4, 14, b"\x44"), S.UNPARSEABLE),
        "ihl_beyond_frame": (fr.patch(good4, 14, b"\x4f")[:14 + 40], S.UNPARSEABLE),
        "ipv4_truncated": (good4[:14 + 12], S.UNPARSEABLE),
        "ipv4_version_6": (fr.patch(good4, 14, b"\x65"), S.UNPARSEABLE),
        "tot_len_below_ihl": (fr.patch(good4, 16, b"\x00\x10"), S.UNPARSEABLE),
        "ipv6_truncated": (good6[:14 + 39], S.UNPARSEABLE),
        "vlan_tag_truncated": (fr.raw_frame(0x8100, b"\x00"), S.UNPARSEABLE),
        "vlan_inner_truncated": (fr.raw_frame(0x88A8, b"\x00\x05\x81\x00\x00"),
                                 S.UNPARSEABLE),
        "arp": (fr.raw_frame(0x0806, b"\x00" * 28), S.NOT_IP),
        "ethernet_only": (fr.raw_frame(0x0800, b""), S.UNPARSEABLE),
        # F1: IP length cut with the frame (else wire < IP length: L3 UNPARSEABLE, as in Zeek)
        "tcp_truncated": (fr.patch(good4[:14 + 20 + 12], 16, b"\x00\x20"), S.L4_UNPARSEABLE),
        "tcp_doff_4": (fr.patch(good4, 14 + 20 + 12, b"\x40"), S.L4_UNPARSEABLE),
        "udp_truncated": (fr.patch(fr.udp(A4, 1, B4, 2)[:14 + 20 + 6], 16, b"\x00\x1a"),
                          S.L4_UNPARSEABLE),
        "icmp_truncated": (fr.patch(fr.icmp4(A4, B4, 8)[:14 + 20 + 3], 16, b"\x00\x17"),
                           S.L4_UNPARSEABLE),
        "ipv6_ext_chain_short": (fr.ether(fr.IPv6(src=A6, dst=B6, nh=0)), S.L4_UNPARSEABLE),
        "ipv6_frag_hdr_short": (fr.ether(fr.IPv6(src=A6, dst=B6, nh=44) / fr.Raw(b"\x06\x00")),
                                S.L4_UNPARSEABLE),
    }


@pytest.mark.parametrize("name", sorted(_malformed_cases()))
def test_malformed_is_passed_and_counted(lab: Lab, name: str) -> None:
    frame, stat = _malformed_cases()[name]
    lab.shunt(A4, 1, B4, 2, TCP)
    lab.shunt(A6, 1, B6, 2, TCP)
    lab.shunt(A4, 1, B4, 2, UDP)
    lab.shunt(A4, 8, B4, 0, ICMP)
    before = lab.stats()
    assert lab.run(frame) == XDP_PASS
    d = delta(before, lab.stats())
    assert d[stat] == 1 and d[S.PASSED] == 1 and d[S.SEEN] == 1
    assert S.DROPPED_FLOW not in d and S.DROPPED_PAIR not in d


def test_l3_parsed_but_l4_broken_still_matches_the_pair(lab: Lab) -> None:
    frame, _ = _malformed_cases()["tcp_doff_4"]
    lab.shunt_pair(A4, B4)
    assert lab.run(frame) == XDP_DROP
    frame, _ = _malformed_cases()["ipv6_ext_chain_short"]
    lab.shunt_pair(A6, B6)
    assert lab.run(frame) == XDP_DROP
    frame, _ = _malformed_cases()["ihl_4"]       # L3 broken: never matched
    assert lab.run(frame) == XDP_PASS


def test_zero_length_tcp_option_does_not_matter(lab: Lab) -> None:
    key, _ = lab.shunt(A4, 1, B4, 2, TCP)
    frame = fr.tcp(A4, 1, B4, 2, payload=b"z" * 5)
    # doff 6 with an option of kind 2 (MSS) and length 0, payload after it
    hdr = bytearray(frame[34:54])
    hdr[12] = 0x60
    frame = frame[:14] + fr.patch(frame[14:34], 2, (20 + 24 + 5).to_bytes(2, "big")) + \
        bytes(hdr) + b"\x02\x00\x00\x00" + frame[54:]
    assert lab.run(frame) == XDP_DROP
    assert value(lab, key).bytes1 == 49


# ---------------------------------------------------------------------------------------------
# FIN / RST events


@pytest.mark.parametrize("a,b", [(A4, B4), (A6, B6)], ids=["v4", "v6"])
def test_fin_and_rst_dropped_with_ring_event(lab: Lab, a: str, b: str) -> None:
    key, _ = lab.shunt(a, 443, b, 51000, TCP)
    t0 = time.monotonic_ns()
    fin = fr.tcp(b, 51000, a, 443, flags="FA", seq=123456789, ack=987654321,
                 payload=b"f" * 10)
    rst = fr.tcp(a, 443, b, 51000, flags="R", seq=42, ack=0)
    before = lab.stats()
    assert lab.run(fin) == XDP_DROP
    assert lab.run(rst) == XDP_DROP
    t1 = time.monotonic_ns()
    events = lab.drain()
    assert [e.type for e in events] == [EventType.TCP_FIN, EventType.TCP_RST]
    e_fin, e_rst = events
    assert (e_fin.side, e_fin.tcp_flags, e_fin.seq, e_fin.ack) == (2, 0x11, 123456789, 987654321)
    assert e_fin.ip_len == fr.ip_len(fin) and e_fin.payload_len == 10
    assert (e_rst.side, e_rst.tcp_flags, e_rst.seq, e_rst.payload_len) == (1, 0x04, 42, 0)
    for e, seq in ((e_fin, 1), (e_rst, 2)):
        assert bytes(e.key) == bytes(key)
        assert e.entry == ENTRY_FLOW and e.version == P.LAYOUT_VERSION and e.event_seq == seq
        assert t0 <= e.ts_ns <= t1
    v = value(lab, key)
    assert (v.pkts1, v.pkts2, v.event_seq) == (1, 1, 2)
    d = delta(before, lab.stats())
    assert d[S.EVENTS] == 2 and d[S.DROPPED_FLOW] == 2


def test_fin_rst_together_is_rst_event(lab: Lab) -> None:
    lab.shunt(A4, 1, B4, 2, TCP)
    assert lab.run(fr.tcp(A4, 1, B4, 2, flags="FR")) == XDP_DROP
    assert [e.type for e in lab.drain()] == [EventType.TCP_RST]


def test_fin_on_unshunted_flow_has_no_event(lab: Lab) -> None:
    lab.shunt(A4, 1, B4, 2, TCP)
    assert lab.run(fr.tcp(A4, 1, B4, 3, flags="FA")) == XDP_PASS
    assert lab.run(fr.udp(A4, 1, B4, 2)) == XDP_PASS
    assert lab.drain() == []


def test_fin_on_pair_shunted_tcp_carries_the_flow_key(lab: Lab) -> None:
    lab.shunt_pair(A4, B4)
    assert lab.run(fr.tcp(B4, 9, A4, 10, flags="FA", seq=5)) == XDP_DROP
    (e,) = lab.drain()
    fkey, fside = lab.prog.flow_key(B4, 9, A4, 10, TCP)
    assert e.type == EventType.TCP_FIN and e.entry == ENTRY_PAIR
    assert bytes(e.key) == bytes(fkey) and e.side == fside == 2 and e.seq == 5


def test_ring_full_is_counted(lab: Lab) -> None:
    small = XdpProgram.compile(flows_max=64, pairs_max=16, ring_pages=1, calibrate=False)
    try:
        assert small.flows.max_entries == 64 and small.ip_pairs.max_entries == 16
        key, _ = small.flow_key(A4, 1, B4, 2, TCP)
        small.flows[key] = small.new_value(P.lease_deadline_ns(60))
        fin = fr.tcp(A4, 1, B4, 2, flags="FA")
        for _ in range(100):   # 4 KiB ring, 96 bytes per record: about 42 fit
            assert small.test_run(fin).retval == XDP_DROP
        st_ = small.stats()
        assert st_[S.RINGBUF_RESERVE_FAIL] > 0
        assert st_[S.EVENTS] + st_[S.RINGBUF_RESERVE_FAIL] == 100
        assert small.flows[key].pkts1 == 100
    finally:
        small.close()


def test_counters_exact_with_two_cpus_on_one_flow(lab: Lab) -> None:
    """Two threads (test runs release the GIL) hammer one entry from both directions."""
    key, _ = lab.shunt(A4, 1, B4, 2, UDP)
    frames = [fr.udp(A4, 1, B4, 2), fr.udp(B4, 2, A4, 1)]
    n = 200_000
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(lambda f: lab.prog.test_run(f, repeat=n), frames * 2))
    assert all(r.retval == XDP_DROP for r in runs)
    v = value(lab, key)
    assert (v.pkts1, v.pkts2) == (2 * n, 2 * n)
    assert (v.bytes1, v.bytes2) == (2 * n * fr.ip_len(frames[0]), 2 * n * fr.ip_len(frames[1]))


# ---------------------------------------------------------------------------------------------
# leases (fail open)


def test_expired_lease_passes_with_one_event(lab: Lab) -> None:
    key, _ = lab.shunt(A4, 1, B4, 2, UDP)
    v = value(lab, key)
    v.lease_expiry_ns = P.monotonic_ns() - 1_000_000_000
    lab.prog.flows[key] = v
    before = lab.stats()
    frames = [fr.udp(B4, 2, A4, 1), fr.udp(A4, 1, B4, 2), fr.udp(B4, 2, A4, 1)]
    assert [lab.run(f) for f in frames] == [XDP_PASS] * 3
    (e,) = lab.drain()
    assert e.type == EventType.LEASE_EXPIRED and e.entry == ENTRY_FLOW
    assert bytes(e.key) == bytes(key) and e.side == 2
    d = delta(before, lab.stats())
    assert d[S.LEASE_EXPIRED_PASS] == 3 and d[S.PASSED] == 3 and d[S.EVENTS] == 1
    v = value(lab, key)
    assert (v.pkts1, v.pkts2) == (0, 0) and v.flags & P.F_LEASE_EVENT_SENT
    # renewed (new lease, flag cleared): dropped again
    v.lease_expiry_ns, v.flags = P.lease_deadline_ns(60), 0
    lab.prog.flows[key] = v
    assert lab.run(frames[0]) == XDP_DROP


def test_expired_pair_lease_event_carries_the_pair(lab: Lab) -> None:
    pkey, _ = lab.shunt_pair(B6, A6, lease_s=-1)
    assert lab.run(fr.other_proto(B6, A6, 50)) == XDP_PASS
    assert lab.run(fr.other_proto(A6, B6, 50)) == XDP_PASS
    (e,) = lab.drain()
    assert e.type == EventType.LEASE_EXPIRED and e.entry == ENTRY_PAIR and e.side == 2
    assert bytes(e.key.addr1) == bytes(pkey.addr1) and bytes(e.key.addr2) == bytes(pkey.addr2)
    assert (e.key.port1, e.key.port2, e.key.proto) == (0, 0, 0)


def test_pass_all_switch(lab: Lab) -> None:
    key, _ = lab.shunt(A4, 1, B4, 2, TCP)
    lab.prog.write_config(flags=P.CFG_PASS_ALL)
    before = lab.stats()
    assert lab.run(fr.tcp(A4, 1, B4, 2, flags="FA")) == XDP_PASS
    assert delta(before, lab.stats()) == {S.SEEN: 1, S.PASSED: 1, S.PASS_ALL: 1}
    assert value(lab, key).pkts1 == 0 and lab.drain() == []


# ---------------------------------------------------------------------------------------------
# clock


def test_clock_calibration_and_last_seen(lab: Lab) -> None:
    cal = lab.prog.calibrate_clock()
    assert cal.ns_per_jiffy in (10_000_000, 4_000_000, 3_333_333, 1_000_000)
    cfg = lab.prog.read_config()
    assert (cfg.ns_per_jiffy, cfg.clock_offset_ns) == cal
    tick = cal.ns_per_jiffy
    key, _ = lab.shunt(A4, 1, B4, 2, TCP)
    t0 = time.monotonic_ns()
    assert lab.run(fr.tcp(A4, 1, B4, 2)) == XDP_DROP
    t1 = time.monotonic_ns()
    assert t0 - 3 * tick <= value(lab, key).last_seen_ns <= t1 + tick
    assert abs(P.map_time_to_wall(value(lab, key).last_seen_ns) - time.time()) < 1.0


def test_uncalibrated_clock_falls_back_to_coarse(lab: Lab) -> None:
    saved = lab.prog.read_config()
    lab.prog.write_config(clock=P.ClockCalibration(0, 0))
    try:
        key, _ = lab.shunt(A4, 1, B4, 2, TCP)
        t0 = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
        assert lab.run(fr.tcp(A4, 1, B4, 2)) == XDP_DROP
        t1 = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)
        assert t0 <= value(lab, key).last_seen_ns <= t1
    finally:
        lab.prog.write_config(clock=P.ClockCalibration(saved.ns_per_jiffy,
                                                       saved.clock_offset_ns))


# ---------------------------------------------------------------------------------------------
# loading


def test_frags_aware_load_handles_jumbo_frames(lab: Lab) -> None:
    key, _ = lab.shunt(A4, 1, B4, 2, UDP)
    jumbo = fr.udp(A4, 1, B4, 2, payload=b"j" * 8972)   # 9000 IP bytes
    assert lab.prog.test_run(jumbo, frags=True).retval == XDP_DROP
    assert value(lab, key).bytes1 == 9000
    assert lab.prog.test_run(fr.udp(A4, 9, B4, 2), frags=True).retval == XDP_PASS
    assert lab.prog.prog_fd(frags=True) != lab.prog.prog_fd()


def test_pinned_maps_are_reused_across_compiles() -> None:
    pin_dir = Path(f"/sys/fs/bpf/d1-pin-{os.getpid()}")
    names = ("flows", "ip_pairs", "config", "stats", "pair_filter")
    pin_dir.mkdir()
    try:
        first = XdpProgram.compile(flows_max=128, pairs_max=16, pin_dir=str(pin_dir))
        try:
            key, _ = first.flow_key(A4, 1, B4, 2, TCP)
            first.flows[key] = first.new_value(P.lease_deadline_ns(60))
            pkey, _ = first.pair_key(A6, B6)
            first.ip_pairs[pkey] = first.new_value(P.lease_deadline_ns(60))
            first.pair_added(pkey)
            assert first.test_run(fr.tcp(B4, 2, A4, 1)).retval == XDP_DROP
        finally:
            first.close()
        assert sorted(p.name for p in pin_dir.iterdir()) == sorted(names)
        second = XdpProgram.compile(flows_max=128, pairs_max=16, pin_dir=str(pin_dir))
        try:
            assert second.flows[key].pkts2 == 1          # entry and counters survived
            assert second.stats()[S.DROPPED_FLOW] == 1
            assert second.test_run(fr.udp(A6, 1, B6, 2)).retval == XDP_DROP
        finally:
            second.close()
    finally:
        for name in names:
            (pin_dir / name).unlink(missing_ok=True)
        pin_dir.rmdir()


def test_compile_error_carries_the_compiler_message() -> None:
    with pytest.raises(CompileError) as err:
        XdpProgram.compile(extra_cflags=("-DSHUNTD_FLOWS_MAX=not_a_number",), calibrate=False)
    assert "not_a_number" in str(err.value)


def test_missing_kernel_headers_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BCC_KERNEL_SOURCE", f"/nonexistent-d1-{os.getpid()}")
    with pytest.raises(KernelHeadersMissingError, match="sudo make deps"):
        XdpProgram.compile(calibrate=False)


def test_not_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P.os, "geteuid", lambda: 1000)
    with pytest.raises(NotPrivilegedError, match="root"):
        XdpProgram.compile()


def test_bad_sizes_rejected_before_compiling() -> None:
    with pytest.raises(ValueError):
        XdpProgram.compile(ring_pages=3)
    with pytest.raises(ValueError):
        XdpProgram.compile(flows_max=0)


# ---------------------------------------------------------------------------------------------
# property: dropped iff shunted, from either direction, on the sender's side


def _packed16(addr: str) -> bytes:
    ip_ = ipaddress.ip_address(addr)
    return ip_.packed if ip_.version == 6 else b"\0" * 10 + b"\xff\xff" + ip_.packed


def _hand_side(src: str, sport: int, dst: str, dport: int) -> int:
    s, d = _packed16(src), _packed16(dst)
    return 1 if (s, sport) <= (d, dport) else 2


v4_hosts = st.sampled_from(["10.0.0.1", "10.0.0.2", "192.168.1.1", "172.16.5.4", "8.8.8.8"])
v6_hosts = st.sampled_from(["2001:db8::1", "2001:db8::2", "fe80::1", "::1", "2001:db8:1::9"])
endpoint_pairs = st.one_of(st.tuples(v4_hosts, v4_hosts), st.tuples(v6_hosts, v6_hosts))
flows = st.tuples(endpoint_pairs, st.sampled_from([1, 80, 443, 5000]),
                  st.sampled_from([1, 80, 443, 5000]), st.sampled_from([TCP, UDP]))


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shunted=st.lists(flows, max_size=6), probes=st.lists(
    st.tuples(flows, st.booleans()), min_size=1, max_size=12),
    pairs=st.lists(endpoint_pairs, max_size=3))
def test_property_dropped_iff_shunted(lab_module: Lab, shunted: list, probes: list,
                                      pairs: list) -> None:
    lab = lab_module
    lab.reset()
    shunted_set = set()
    for (a, b), pa, pb, proto in shunted:
        lab.shunt(a, pa, b, pb, proto)
        shunted_set.add((frozenset([(a, pa), (b, pb)]), proto))
    pair_set = set()
    for a, b in pairs:
        if frozenset([a, b]) not in pair_set:
            lab.shunt_pair(a, b)
            pair_set.add(frozenset([a, b]))
    for ((a, b), pa, pb, proto), reverse in probes:
        src, sport, dst, dport = (b, pb, a, pa) if reverse else (a, pa, b, pb)
        build = fr.tcp if proto == TCP else fr.udp
        frame = build(src, sport, dst, dport)
        in_flow = (frozenset([(a, pa), (b, pb)]), proto) in shunted_set
        in_pair = frozenset([a, b]) in pair_set
        verdict = lab.run(frame)
        assert verdict == (XDP_DROP if in_flow or in_pair else XDP_PASS)
        if in_flow:
            key, side = lab.prog.flow_key(src, sport, dst, dport, proto)
            assert side == _hand_side(src, sport, dst, dport)
            v = value(lab, key)
            assert (v.pkts1 if side == 1 else v.pkts2) >= 1
    st_ = lab.stats()
    assert st_[S.SEEN] == st_[S.PASSED] + st_[S.DROPPED_FLOW] + st_[S.DROPPED_PAIR]
    lab.reset()
