"""Trace reader: pcap (µs/ns, both byte orders), pcapng, corpus traces, truncation, bad files."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from e1_trace_helpers import (
    CORPUS,
    corpus_traces,
    ng_block,
    ng_epb,
    ng_idb,
    ng_shb,
    ng_spb,
    pcap_bytes,
)
from shuntd.capture.pcapfile import TraceError, open_trace
from shuntd.packet import decode

needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason="../shared/corpus absent")

F1 = bytes(range(60))
F2 = b"\xab" * 75


def read_all(path: Path) -> list[tuple[float, bytes, int, int]]:
    return [(ts, bytes(fr), wl, lt) for ts, fr, wl, lt in open_trace(path)]


@pytest.mark.parametrize("endian", ["<", ">"])
def test_pcap_microseconds(tmp_path: Path, endian: str) -> None:
    path = tmp_path / "us.pcap"
    path.write_bytes(pcap_bytes([(1300475167, 96535, F1, 60), (1300475168, 999999, F2, 1500)],
                                linktype=1, endian=endian))
    recs = read_all(path)
    assert recs == [
        (1300475167 + 96535 / 1e6, F1, 60, 1),
        (1300475168 + 999999 / 1e6, F2, 1500, 1),
    ]
    # Bit-identical to Zeek's double: sec + usec / 1e6.
    assert recs[0][0] == 1300475167.096535


@pytest.mark.parametrize("endian", ["<", ">"])
def test_pcap_nanoseconds_truncate_to_microseconds(tmp_path: Path, endian: str) -> None:
    path = tmp_path / "ns.pcap"
    path.write_bytes(pcap_bytes([(1700000000, 123456789, F1, 60)], linktype=101, nanos=True,
                                endian=endian))
    with open_trace(path) as reader:
        recs = [(ts, bytes(fr), wl, lt) for ts, fr, wl, lt in reader]
        assert reader.nanosecond and reader.linktype == 101
    assert recs == [(1700000000 + 123456 / 1e6, F1, 60, 101)]


def test_pcap_linktype_fcs_bits_masked(tmp_path: Path) -> None:
    path = tmp_path / "fcs.pcap"
    path.write_bytes(pcap_bytes([(1, 0, F1, 60)], linktype=0x14000001))
    assert read_all(path)[0][3] == 1


def test_pcap_caplen_beyond_snaplen_truncated_like_libpcap(tmp_path: Path) -> None:
    path = tmp_path / "snap.pcap"
    big = bytes(range(100))
    path.write_bytes(pcap_bytes([(1, 0, big, 1000), (2, 0, F1[:10], 10)], 1, snaplen=64))
    assert read_all(path) == [(1.0, big[:64], 1000, 1), (2.0, F1[:10], 10, 1)]


def test_pcapng_interfaces_resolutions_and_unknown_blocks(tmp_path: Path) -> None:
    stamp_us = 1700000000 * 10**6 + 250000
    stamp_ns = 1700000001 * 10**9 + 987654321
    stamp_bin = 1700000002 * 2**20 + 2**19          # 0.5 s in 2^-20 units
    data = (
        ng_shb()
        + ng_idb(1)                                  # if 0: Ethernet, default µs
        + ng_block(0x00000004, b"\x00" * 8)          # name resolution block: skipped
        + ng_idb(113, tsresol=9)                     # if 1: SLL, ns
        + ng_idb(101, tsresol=0x80 | 20, tsoffset=10)  # if 2: raw, 2^-20 s, +10 s
        + ng_epb(0, stamp_us, F1, 60)
        + ng_block(0x0BAD0BAD, b"custom")            # unknown block type: skipped
        + ng_epb(1, stamp_ns, F2, 100)
        + ng_epb(2, stamp_bin, F1[:7], 7)
        + ng_block(5, b"\x00" * 16)                  # interface statistics: skipped
    )
    path = tmp_path / "a.pcapng"
    path.write_bytes(data)
    recs = read_all(path)
    assert recs == [
        (1700000000 + 250000 / 1e6, F1, 60, 1),
        (1700000001 + 987654 / 1e6, F2, 100, 113),
        (1700000012 + 500000 / 1e6, F1[:7], 7, 101),
    ]


def test_pcapng_big_endian_second_section_and_spb(tmp_path: Path) -> None:
    data = (
        ng_shb("<") + ng_idb(1) + ng_epb(0, 5 * 10**6, F1, 60)
        # A new section resets the interfaces; this one is big-endian with SPBs.
        + ng_shb(">") + ng_idb(101, snaplen=10, endian=">") + ng_spb(F2[:10], 75, ">")
        + ng_epb(0, 7 * 10**6 + 1, F2, 75, ">")
    )
    path = tmp_path / "b.pcapng"
    path.write_bytes(data)
    assert read_all(path) == [
        (5.0, F1, 60, 1),
        (0.0, F2[:10], 75, 101),
        (7.000001, F2, 75, 101),
    ]


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot open"):
        open_trace(tmp_path / "missing.pcap")
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(b"")
    with pytest.raises(TraceError, match="not a pcap"):
        open_trace(empty)
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(TraceError, match="not a pcap"):
        open_trace(junk)
    short = tmp_path / "short.pcap"
    short.write_bytes(pcap_bytes([], 1)[:10])
    with pytest.raises(TraceError, match="truncated pcap file header"):
        open_trace(short)


def test_corrupt_caplen_names_packet(tmp_path: Path) -> None:
    data = pcap_bytes([(1, 0, F1, 60), (2, 0, F1, 60)], 1)
    data = data[:24 + 16 + 60 + 8] + struct.pack("<I", 0x7FFFFFFF) + data[24 + 16 + 60 + 12:]
    path = tmp_path / "c.pcap"
    path.write_bytes(data)
    got = []
    with pytest.raises(TraceError, match="packet 1"):
        for rec in open_trace(path):
            got.append(rec)
    assert len(got) == 1


def _pcap_record_ends(data: bytes) -> list[int]:
    """End offsets of every record of a little/big-endian pcap, walked by hand."""
    endian = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    pos, ends = 24, []
    while pos + 16 <= len(data):
        caplen = struct.unpack_from(endian + "I", data, pos + 8)[0]
        pos += 16 + caplen
        ends.append(pos)
    return ends


@needs_corpus
@pytest.mark.corpus
@pytest.mark.parametrize("where", ["data", "header"])
def test_truncated_corpus_pcap(tmp_path: Path, where: str) -> None:
    src = CORPUS / "core" / "ssh.basic" / "trace.pcap"
    data = src.read_bytes()
    ends = _pcap_record_ends(data)
    k = len(ends) // 2
    cut = ends[k - 1] + (30 if where == "data" else 7)   # inside record k
    path = tmp_path / "cut.pcap"
    path.write_bytes(data[:cut])
    full = read_all(src)
    got = []
    with pytest.raises(TraceError, match=rf"packet {k}\b"):
        for ts, fr, wl, lt in open_trace(path):
            got.append((ts, bytes(fr), wl, lt))
    assert got == full[:k]


@needs_corpus
@pytest.mark.corpus
def test_truncated_corpus_pcapng(tmp_path: Path) -> None:
    src = CORPUS / "core" / "irc.basic" / "trace.pcapng"
    data = src.read_bytes()
    # Walk blocks by hand (little-endian file) and cut in the middle of the 100th EPB.
    pos, epbs = 0, 0
    while True:
        btype, blen = struct.unpack_from("<II", data, pos)
        if btype == 6:
            if epbs == 100:
                cut = pos + blen // 2
                break
            epbs += 1
        pos += blen
    path = tmp_path / "cut.pcapng"
    path.write_bytes(data[:cut])
    got = []
    with pytest.raises(TraceError, match=r"packet 100\b"):
        for rec in open_trace(path):
            got.append(rec)
    assert len(got) == 100


def _meta(trace: Path) -> dict:
    return json.loads((trace.parent / "meta.json").read_text())


@needs_corpus
@pytest.mark.corpus
@pytest.mark.parametrize("trace", corpus_traces(), ids=lambda p: p.parent.name)
def test_corpus_trace_reads_to_end(trace: Path) -> None:
    meta = _meta(trace)
    ignore = " -C " in f" {meta['command']} "
    n = 0
    last_ts = 0.0
    with open_trace(trace) as reader:
        for ts, frame, wire_len, linktype in reader:
            n += 1
            assert len(frame) <= max(wire_len, len(frame))
            decode(frame, linktype, ts, wire_len, ignore)   # must never raise
            last_ts = ts
    assert n == int(meta["packets"])
    assert last_ts > 0


@needs_corpus
@pytest.mark.corpus
@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark absent")
@pytest.mark.parametrize("name", ["core/ssh.basic", "core/irc.basic", "core/irc.starttls",
                                  "core/http.http-connect-with-header", "core/q-in-q"])
def test_corpus_timestamps_match_tshark(name: str) -> None:
    trace = next((CORPUS / name).glob("trace.pcap*"))
    out = subprocess.run(
        ["tshark", "-r", str(trace), "-T", "fields", "-e", "frame.time_epoch",
         "-e", "frame.len", "-e", "frame.cap_len"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split("\n")
    expected = []
    for line in out:
        if not line.strip():
            continue
        epoch, flen, clen = line.split("\t")
        sec, _, frac = epoch.partition(".")
        expected.append((int(sec) * 10**6 + int((frac + "000000")[:6]), int(flen), int(clen)))
    got = [(round(ts * 1e6), wl, len(fr)) for ts, fr, wl, _lt in open_trace(trace)]
    assert got == expected


def _frames_by_linktype() -> list[tuple[int, bytes, str]]:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    i4 = bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1000, dport=2000) / b"data")
    i6 = bytes(IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=1000, dport=2000) / b"data")
    eth = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=0x0800)) + i4
    sll = struct.pack("!HHH8sH", 0, 1, 6, b"\x00" * 8, 0x0800) + i4
    sll2 = struct.pack("!HHIHBB8s", 0x86DD, 0, 3, 1, 0, 6, b"\x00" * 8) + i6
    return [
        (1, eth, "10.0.0.1"), (113, sll, "10.0.0.1"), (276, sll2, "fd00::1"),
        (101, i4, "10.0.0.1"), (228, i4, "10.0.0.1"), (229, i6, "fd00::1"),
        (0, struct.pack("<I", 2) + i4, "10.0.0.1"), (0, struct.pack("<I", 30) + i6, "fd00::1"),
        (108, struct.pack(">I", 24) + i6, "fd00::1"), (9, b"\xff\x03\x00\x21" + i4, "10.0.0.1"),
    ]


@pytest.mark.parametrize("writer", ["wrpcap", "pcapng"])
def test_every_link_type_through_scapy_written_files(tmp_path: Path, writer: str) -> None:
    import socket

    from scapy.packet import Raw
    from scapy.utils import PcapNgWriter, wrpcap

    for linktype, frame, src in _frames_by_linktype():
        path = tmp_path / f"lt{linktype}-{src}.{writer}"
        pkt = Raw(frame)
        pkt.time = 1600000000.25
        if linktype == 0:
            # scapy's writers take linktype 0 for "unset": write this one by hand.
            path.write_bytes(
                pcap_bytes([(1600000000, 250000, frame, len(frame))], 0) if writer == "wrpcap"
                else ng_shb() + ng_idb(0) + ng_epb(0, 1600000000250000, frame, len(frame)))
        elif writer == "wrpcap":
            wrpcap(str(path), [pkt], linktype=linktype)
        else:
            with PcapNgWriter(str(path)) as w:
                w.linktype = linktype
                w.write(pkt)
        recs = list(open_trace(path))
        assert len(recs) == 1, (linktype, writer)
        ts, fr, wire_len, lt = recs[0]
        assert (lt, bytes(fr), wire_len, ts) == (linktype, frame, len(frame), 1600000000.25)
        p = decode(fr, lt, ts, wire_len)
        fam = socket.AF_INET6 if ":" in src else socket.AF_INET
        assert p is not None and p.src == socket.inet_pton(fam, src), (linktype, writer)
        assert (p.sport, p.dport, p.payload_len, p.checksum_ok) == (1000, 2000, 4, True)
