"""A corpus of malformed frames through the XDP program (BPF_PROG_TEST_RUN) and the engine.

Every case is a frame broken on purpose, plus what the rules say about it:
* XDP: which stat counts it, and whether it belongs to its own (shunted) flow by the parser's
  rules. Those rules follow Zeek (zeek-conn.md §0.3-0.5): a packet Zeek drops before any
  connection exists (L3 broken, wire length < IP length, fixed transport header missing per the
  IP length) must never be dropped-and-counted into a flow, or the merged conn record would
  carry bytes Zeek never counts. With the sibling flows shunted, nothing malformed is dropped.
* engine (offline path, `zeek -C` so that only the malformation matters): how many conn records
  the frame makes, and that no record carries an id other than the frame's own.
Expected values come from the bytes sent and from the spec, never from the code under test.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import xdp_frames as fr
from e1_trace_helpers import pcap_bytes
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw
from shuntd.conn.record import CONN_FIELDS
from shuntd.conn.settings import EngineSettings
from shuntd.conn.tracker import ConnTracker
from shuntd.offline import run_trace

A4, B4 = "10.0.0.1", "10.0.0.2"
A6, B6 = "2001:db8::1", "2001:db8::2"
TCP_P, UDP_P, ICMP_P = 6, 17, 1
FIELDS = [f for f, _t in CONN_FIELDS]


class Case(NamedTuple):
    frames: tuple[bytes, ...]   # all go through the engine; the last one through XDP
    stat: str | None            # XDP stat counting it besides SEEN/PASSED (None: no extra stat)
    own_flow_drops: bool        # with its own flow shunted, the parser's rules drop it
    records: int                # conn records the engine writes for `frames` (-1: 0 or 1)
    own_id: tuple | None        # (orig_h, orig_p, resp_h, resp_p, proto) every record must have


def _v4_csum(frame: bytes, off: int = 14) -> bytes:
    """frame with its IPv4 header checksum recomputed (so only the intended defect remains)."""
    hl = (frame[off] & 0x0F) * 4
    hdr = bytearray(frame[off:off + min(hl, len(frame) - off)])
    if len(hdr) < 20:
        return frame
    hdr[10:12] = b"\0\0"
    s = sum(struct.unpack(f"!{len(hdr) // 2}H", bytes(hdr[:len(hdr) // 2 * 2])))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    hdr[10:12] = struct.pack("!H", ~s & 0xFFFF)
    return frame[:off] + bytes(hdr) + frame[off + len(hdr):]


def _set_v4_len(frame: bytes, tot: int) -> bytes:
    return _v4_csum(fr.patch(frame, 16, struct.pack("!H", tot)))


def _cases() -> dict[str, Case]:
    tcp4 = fr.tcp(A4, 1, B4, 2, flags="S", payload=b"d" * 10)
    tcp6 = fr.tcp(A6, 1, B6, 2, flags="S", payload=b"d" * 10)
    udp4 = fr.udp(A4, 1, B4, 2)
    icmp4 = fr.icmp4(A4, B4, 8)
    tcp_id4 = (A4, 1, B4, 2, "tcp")
    udp_id4 = (A4, 1, B4, 2, "udp")
    cases = {
        # --- L2/L3 broken: UNPARSEABLE, never a record
        "ethernet_short": Case((b"\x02" * 13,), "UNPARSEABLE", False, 0, None),
        "vlan_tag_truncated": Case((fr.raw_frame(0x8100, b"\x00\x05"),), "UNPARSEABLE",
                                   False, 0, None),
        "ihl_3": Case((_v4_csum(fr.patch(tcp4, 14, b"\x43")),), "UNPARSEABLE", False, 0, None),
        "ihl_beyond_frame": Case((_v4_csum(fr.patch(tcp4, 14, b"\x4f"))[:14 + 40],),
                                 "UNPARSEABLE", False, 0, None),
        "ipv4_version_7": Case((_v4_csum(fr.patch(tcp4, 14, b"\x75")),), "UNPARSEABLE",
                               False, 0, None),
        "ipv4_tot_len_below_ihl": Case((_set_v4_len(tcp4, 16),), "UNPARSEABLE", False, 0, None),
        # wire length < IP total length: Zeek's truncated_IP_len, dropped before any conn
        "ipv4_tot_len_beyond_frame": Case((_set_v4_len(tcp4, fr.ip_len(tcp4) + 100),),
                                          "UNPARSEABLE", False, 0, None),
        "ipv6_payload_len_beyond_frame": Case(
            (fr.patch(tcp6, 18, struct.pack("!H", fr.ip_len(tcp6) - 40 + 100)),),
            "UNPARSEABLE", False, 0, None),
        "ipv6_truncated_header": Case((tcp6[:14 + 30],), "UNPARSEABLE", False, 0, None),
        # --- L3 fine, L4 not usable: L4_UNPARSEABLE (ip_pairs only), never a record
        "tcp_header_truncated": Case((_set_v4_len(tcp4[:14 + 20 + 12], 32),),
                                     "L4_UNPARSEABLE", False, 0, None),
        # the frame is long enough (Ethernet padding) but the IP length says TCP has 10 bytes
        "tcp_header_beyond_ip_len": Case((_set_v4_len(tcp4, 30),), "L4_UNPARSEABLE",
                                         False, 0, None),
        "udp_header_truncated": Case((_set_v4_len(udp4[:14 + 20 + 6], 26),), "L4_UNPARSEABLE",
                                     False, 0, None),
        # ICMP needs its 8-byte header (Zeek: truncated_header, no connection)
        "icmp_header_6_bytes": Case((_set_v4_len(icmp4[:14 + 20 + 6], 26),), "L4_UNPARSEABLE",
                                    False, 0, None),
        "ipv6_ext_chain_empty": Case((fr.ether(IPv6(src=A6, dst=B6, nh=0)),),
                                     "L4_UNPARSEABLE", False, 0, None),
        # hop-by-hop header says 24 bytes, the packet has 8, TCP "after" it
        "ipv6_ext_header_overruns": Case(
            (fr.ether(IPv6(src=A6, dst=B6, nh=0) / Raw(b"\x06\x02" + b"\x01\x04" + b"\0" * 4)),),
            "L4_UNPARSEABLE", False, 0, None),
        # TCP data offset < 5: no flow key for XDP; Zeek builds the key, then ignores the packet
        "tcp_data_offset_4": Case((fr.patch(tcp4, 14 + 20 + 12, b"\x40"),), "L4_UNPARSEABLE",
                                  False, -1, tcp_id4),
        # --- odd but well-formed by the rules: the packet belongs to its flow
        # (a SYN: a shunted flow passes it, as a new connection on the same ports)
        "tcp_zero_length_option": Case((_zero_len_option_syn(),), None, False, 1, tcp_id4),
        "udp_length_below_8": Case((fr.patch(udp4, 14 + 20 + 4, b"\x00\x04"),), None, True, 1,
                                   udp_id4),
        # --- overlapping IPv4 fragments: the second overlaps the first with other bytes
        "ipv4_overlapping_fragments": Case(_overlapping_fragments(), "FRAG_NONFIRST", False,
                                           -1, udp_id4),
    }
    return cases


def _zero_len_option_syn() -> bytes:
    """SYN, data offset 6, option kind 2 (MSS) with length 0, then 2 bytes of EOL."""
    seg = bytes(TCP(sport=1, dport=2, flags="S", seq=1000, dataofs=6,
                    options=[]))[:20]
    seg = seg[:12] + b"\x60" + seg[13:] + b"\x02\x00\x00\x00"
    l3 = IP(src=A4, dst=B4, proto=6) / Raw(seg)
    return fr.ether(l3)


def _overlapping_fragments() -> tuple[bytes, ...]:
    udp = bytes(UDP(sport=1, dport=2, len=8 + 32)) + b"a" * 32
    first = fr.ether(IP(src=A4, dst=B4, proto=17, id=77, flags="MF", frag=0) / Raw(udp[:24]))
    # offset 8 bytes (overlaps bytes 8..23 of the first) with different content, last fragment
    second = fr.ether(IP(src=A4, dst=B4, proto=17, id=77, frag=1) / Raw(b"Z" * 32))
    return first, second


CASES = _cases()


# ---------------------------------------------------------------------------------------------
# the engine (no root needed)


def _engine_rows(frames: tuple[bytes, ...], tmp_path: Path) -> list[dict[str, Any]]:
    trace = tmp_path / "t.pcap"
    trace.write_bytes(pcap_bytes([(1000 + i, 0, f, len(f)) for i, f in enumerate(frames)], 1))
    rows: list[tuple] = []
    tracker = ConnTracker(EngineSettings(ignore_checksums=True),
                          sink=lambda _c, row: rows.append(row))
    result = run_trace(trace, tracker)
    assert result.error is None
    return [dict(zip(FIELDS, r, strict=True)) for r in rows]


@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_logs_nothing_bogus(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    rows = _engine_rows(case.frames, tmp_path)
    if case.records >= 0:
        assert len(rows) == case.records, rows
    else:
        assert len(rows) <= 1, rows
    for r in rows:
        got = (r["id.orig_h"], r["id.orig_p"], r["id.resp_h"], r["id.resp_p"], r["proto"])
        assert got == case.own_id


def test_engine_zero_length_tcp_option_is_a_plain_syn(tmp_path: Path) -> None:
    (row,) = _engine_rows(CASES["tcp_zero_length_option"].frames, tmp_path)
    # one unanswered SYN: S0, history S; IP bytes = 20 + 24 (hand count)
    assert (row["conn_state"], row["history"]) == ("S0", "S")
    assert (row["orig_pkts"], row["orig_ip_bytes"], row["resp_pkts"]) == (1, 44, 0)


def test_engine_udp_length_below_8_counts_no_payload(tmp_path: Path) -> None:
    frame = CASES["udp_length_below_8"].frames[0]
    (row,) = _engine_rows((frame, frame), tmp_path)      # two packets: duration is set
    # uh_ulen 4: running sum ulen - 8 < 0 -> the endpoint looks inactive with size 0
    # (zeek-conn.md §1.6, UDP), so both sides inactive: OTH; IP bytes 2 * (20 + 8 + 8)
    assert (row["orig_bytes"], row["resp_bytes"], row["conn_state"]) == (0, 0, "OTH")
    assert (row["orig_pkts"], row["orig_ip_bytes"]) == (2, 72)


# ---------------------------------------------------------------------------------------------
# the XDP program (root)

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (BPF)")


@pytest.fixture(scope="module")
def xdp() -> Iterator[Any]:
    if os.geteuid() != 0:
        pytest.skip("needs root (BPF)")
    pytest.importorskip("bcc")
    from shuntd.datapath.program import XdpProgram
    prog = XdpProgram.compile(flows_max=1024, pairs_max=64)
    try:
        yield prog
    finally:
        prog.close()


def _shunt(prog: Any, flows: list[tuple]) -> None:
    from shuntd.datapath import program as P
    prog.flows.clear()
    for f in flows:
        key, _side = prog.flow_key(*f)
        prog.flows[key] = prog.new_value(P.lease_deadline_ns(60.0))


OWN_FLOWS = [(A4, 1, B4, 2, TCP_P), (A6, 1, B6, 2, TCP_P), (A4, 1, B4, 2, UDP_P),
             (A4, 8, B4, 0, ICMP_P)]
SIBLING_FLOWS = [(A4, 1, B4, 3, TCP_P), (A6, 1, B6, 3, TCP_P), (A4, 1, B4, 3, UDP_P),
                 (A4, 1, B4, 2, UDP_P + 100)]


def _run(prog: Any, frame: bytes) -> tuple[int, dict[str, int]]:
    if len(frame) < 14:
        pytest.skip("BPF_PROG_TEST_RUN refuses frames below 14 bytes (so does a real NIC)")
    before = prog.stats()
    verdict = prog.test_run(frame).retval
    after = prog.stats()
    return verdict, {k.name: after[k] - before[k] for k in after if after[k] != before[k]}


@root
@pytest.mark.parametrize("name", sorted(CASES))
def test_xdp_sibling_shunted_never_drops(xdp: Any, name: str) -> None:
    from shuntd.datapath.program import XDP_PASS
    case = CASES[name]
    _shunt(xdp, SIBLING_FLOWS)
    try:
        verdict, d = _run(xdp, case.frames[-1])
    finally:
        xdp.flows.clear()
    assert verdict == XDP_PASS
    assert d.get("SEEN") == 1 and d.get("PASSED") == 1
    if case.stat is not None:
        assert d.get(case.stat) == 1, d
    for bad in ("UNPARSEABLE", "L4_UNPARSEABLE", "FRAG_NONFIRST"):
        if bad != case.stat:
            assert bad not in d, d


@root
@pytest.mark.parametrize("name", sorted(CASES))
def test_xdp_own_flow_shunted_drops_only_what_belongs(xdp: Any, name: str) -> None:
    from shuntd.datapath.program import XDP_DROP, XDP_PASS
    case = CASES[name]
    _shunt(xdp, OWN_FLOWS)
    try:
        verdict, d = _run(xdp, case.frames[-1])
    finally:
        xdp.flows.clear()
    if case.own_flow_drops:
        assert verdict == XDP_DROP and d.get("DROPPED_FLOW") == 1
        assert d.get("BYTES_DROPPED_FLOW") == fr.ip_len(case.frames[-1])
    else:
        assert verdict == XDP_PASS, d
        assert "DROPPED_FLOW" not in d and "DROPPED_PAIR" not in d
        if case.stat is not None:
            assert d.get(case.stat) == 1, d
