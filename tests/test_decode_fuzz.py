"""Arbitrary bytes never raise out of decode, the defragmenter or the trace reader (short run)."""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

from e1_trace_helpers import ng_epb, ng_idb, ng_shb, pcap_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, fragment6
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw
from shuntd.capture.pcapfile import TraceError, open_trace
from shuntd.defrag import Defragmenter
from shuntd.packet import Packet, decode

LINKTYPES = st.sampled_from([0, 1, 101, 108, 113, 228, 229, 276, 9, 127])
FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _eth() -> Ether:
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


SEEDS = [
    bytes(_eth() / IP(src="1.2.3.4", dst="5.6.7.8", options=b"\x01\x01\x01\x00")
          / TCP(sport=1, dport=2, options=[("MSS", 1460)]) / Raw(b"abc")),
    bytes(_eth() / Dot1Q(vlan=5) / Dot1Q(vlan=6) / IP(src="1.2.3.4", dst="5.6.7.8")
          / UDP(sport=53, dport=53) / Raw(b"q" * 20)),
    bytes(_eth() / IPv6(src="::1", dst="::2") / IPv6ExtHdrHopByHop()
          / IPv6ExtHdrFragment(m=1, id=3) / TCP(sport=1, dport=2)),
    bytes(_eth() / IPv6(src="::1", dst="::2") / UDP(sport=1, dport=2) / Raw(b"x")),
]
FRAGS = [bytes(_eth() / f) for f in fragment(
    IP(src="1.2.3.4", dst="5.6.7.8", id=9) / UDP(sport=1, dport=2) / Raw(b"z" * 300), 64)]
FRAGS += [bytes(_eth() / f) for f in fragment6(
    IPv6(src="::1", dst="::2") / IPv6ExtHdrFragment(id=7) / UDP(sport=1, dport=2)
    / Raw(b"y" * 300), 120)]


def _check(result: object) -> None:
    assert result is None or isinstance(result, Packet)


@FAST
@given(frame=st.binary(max_size=200), linktype=LINKTYPES,
       wire_len=st.integers(min_value=0, max_value=70000), ignore=st.booleans())
def test_decode_arbitrary_bytes(frame: bytes, linktype: int, wire_len: int, ignore: bool) -> None:
    _check(decode(frame, linktype, 1.0, wire_len, ignore))


@FAST
@given(seed=st.sampled_from(SEEDS), flips=st.lists(
    st.tuples(st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=255)),
    max_size=8), cut=st.integers(min_value=0, max_value=200), ignore=st.booleans())
def test_decode_mutated_frames(seed: bytes, flips: list[tuple[int, int]], cut: int,
                               ignore: bool) -> None:
    b = bytearray(seed)
    for at, val in flips:
        if at < len(b):
            b[at] = val
    frame = bytes(b[:cut]) if cut < len(b) else bytes(b)
    _check(decode(frame, 1, 1.0, len(seed), ignore))


@FAST
@given(order=st.permutations(range(len(FRAGS))), flips=st.lists(
    st.tuples(st.integers(min_value=0, max_value=len(FRAGS) - 1),
              st.integers(min_value=14, max_value=100), st.integers(min_value=0, max_value=255)),
    max_size=6))
def test_defragmenter_never_raises(order: list[int], flips: list[tuple[int, int, int]]) -> None:
    frames = [bytearray(f) for f in FRAGS]
    for i, at, val in flips:
        if at < len(frames[i]):
            frames[i][at] = val
    d = Defragmenter(ignore_checksums=True, max_pending=4, timeout=1.0)
    for i in order:
        p = decode(bytes(frames[i]), 1, float(i), len(frames[i]), True)
        if p is not None and p.frag:
            _check(d.add(p))
    d.expire(100.0)
    assert len(d) == 0


def _read(data: bytes) -> None:
    with tempfile.NamedTemporaryFile(prefix=f"e1fuzz{id(data)}", suffix=".pcap") as f:
        f.write(data)
        f.flush()
        try:
            with open_trace(Path(f.name)) as reader:
                for ts, frame, wire_len, linktype in reader:
                    assert isinstance(ts, float) and isinstance(wire_len, int)
                    decode(frame, linktype, ts, wire_len)
        except TraceError as exc:
            assert str(exc)


VALID_PCAP = pcap_bytes([(1, 2, s, len(s)) for s in SEEDS], 1)
VALID_NG = ng_shb() + ng_idb(1, tsresol=9) + b"".join(ng_epb(0, 10**9, s, len(s)) for s in SEEDS)


@FAST
@given(data=st.binary(max_size=300))
def test_trace_reader_arbitrary_bytes(data: bytes) -> None:
    _read(data)


@FAST
@given(base=st.sampled_from([VALID_PCAP, VALID_NG, pcap_bytes([], 1, endian=">")]),
       flips=st.lists(st.tuples(st.integers(min_value=0, max_value=600),
                                st.integers(min_value=0, max_value=255)), max_size=6),
       cut=st.integers(min_value=0, max_value=700), tail=st.binary(max_size=40))
def test_trace_reader_mutated_files(base: bytes, flips: list[tuple[int, int]], cut: int,
                                    tail: bytes) -> None:
    b = bytearray(base)
    for at, val in flips:
        if at < len(b):
            b[at] = val
    _read(bytes(b[:cut]) + tail)


def test_pcapng_huge_block_length_is_trace_error(tmp_path: Path) -> None:
    data = ng_shb() + ng_idb(1) + struct.pack("<II", 6, 0xFFFFFFF0) + b"\x00" * 40
    path = tmp_path / "huge.pcapng"
    path.write_bytes(data)
    got = []
    try:
        for rec in open_trace(path):
            got.append(rec)
    except TraceError as exc:
        assert "packet 0" in str(exc)
    else:
        raise AssertionError("no TraceError")
