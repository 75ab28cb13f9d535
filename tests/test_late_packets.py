"""Late packets of a shunted TCP session (shunting.ShuntManager.late_frame): the packets XDP
passed before the session's entry landed are counted as shunted, with the history letters and
sequence numbers XDP would have recorded, so the conn.log record equals the one of the same
conversation analysed packet by packet (the real XDP program's maps; no interface needed)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from lab import Lab, is_root, lab_fixture  # noqa: F401

pytestmark = pytest.mark.skipif(not is_root(), reason="needs root (BPF)")

A, B = "10.0.0.1", "10.0.0.2"
CLIENT, SERVER = 40000, 443
LAB_PREFIX = "lp"


def conversation() -> list[tuple[bool, bytes]]:
    """(from the client?, frame): handshake, 2 x 300 bytes up, 4 x 1400 down with acks, a
    retransmission, a window update, then FIN / FIN-ACK / ACK."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    def seg(up: bool, flags: str, seq: int, ack: int, data: bytes = b"") -> tuple[bool, bytes]:
        src, sport, dst, dport = (A, CLIENT, B, SERVER) if up else (B, SERVER, A, CLIENT)
        return up, bytes(Ether() / IP(src=src, dst=dst)
                         / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack) / data)

    c, s = 0xFFFFF000, 7000   # the client's sequence numbers wrap past 2^32
    out = [seg(True, "S", c, 0), seg(False, "SA", s, c + 1), seg(True, "A", c + 1, s + 1)]
    c += 1
    s += 1
    for _ in range(2):
        out.append(seg(True, "PA", c, s, b"u" * 300))
        c += 300
    for i in range(4):
        out.append(seg(False, "PA", s, c, b"d" * 1400))
        s += 1400
        if i % 2:
            out.append(seg(True, "A", c, s))
    out.append(seg(False, "PA", s - 1400, c, b"d" * 1400))   # a retransmission
    out.append(seg(True, "A", c, s))
    out += [seg(True, "FA", c, s), seg(False, "FA", s, c + 1), seg(True, "A", c + 1, s + 1)]
    return out


def odd_conversation() -> list[tuple[bool, bytes]]:
    """conversation() with late packets at the edges of what the capture ring counts itself:
    data with URG, an ACK with TCP options (a 32-byte header), a bare PSH without ACK, and
    an IP total length beyond the frame (the analyser gets it)."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    out = conversation()
    c, s = 0xFFFFF000 + 1 + 600, 7000 + 1 + 4 * 1400
    extra = [
        (False, Ether() / IP(src=B, dst=A) / TCP(sport=SERVER, dport=CLIENT, flags="PAU",
                                                 seq=s, ack=c, urgptr=1) / (b"u" * 100)),
        (True, Ether() / IP(src=A, dst=B) / TCP(sport=CLIENT, dport=SERVER, flags="A", seq=c,
                                                ack=s + 100, options=[("NOP", None),
                                                                      ("NOP", None),
                                                                      ("Timestamp", (1, 2))])),
        (False, Ether() / IP(src=B, dst=A) / TCP(sport=SERVER, dport=CLIENT, flags="P",
                                                 seq=s + 100, ack=c) / (b"p" * 10)),
        (False, Ether() / IP(src=B, dst=A, len=400) / TCP(sport=SERVER, dport=CLIENT, flags="A",
                                                          seq=s + 110, ack=c)),
    ]
    at = len(out) - 3  # before the FINs
    return out[:at] + [(up, bytes(f)) for up, f in extra] + out[at:]


def ends(conn: Any) -> list[tuple[int, ...]]:
    """Each endpoint's sequence and ack numbers (what late packets move)."""
    return [(e.last_seq, e.seq_wraps, e.ack_seq, e.ack_wraps) for e in conn.sides]


@contextlib.contextmanager
def rig() -> Iterator[tuple[Any, Any, list[dict[str, Any]], list[tuple]]]:
    """A tracker and a ShuntManager on a real (unattached) XDP program's maps; yields
    (tracker, manager, conn.log records, shunt.log rows)."""
    from shuntd.conn.record import CONN_FIELDS, SHUNT_CONN_FIELDS
    from shuntd.conn.tracker import ConnTracker
    from shuntd.datapath.program import XdpProgram
    from shuntd.datapath.table import ShuntTable
    from shuntd.events import EventDispatcher
    from shuntd.shunting import ShuntManager, shunt_conn_values

    names = [n for n, _ in CONN_FIELDS + SHUNT_CONN_FIELDS]
    rows: list[dict[str, Any]] = []
    shunt_rows: list[tuple] = []
    prog = XdpProgram.compile(flows_max=16, pairs_max=4)
    table = ShuntTable(prog, lease_seconds=30)
    try:
        d = EventDispatcher()
        tracker = ConnTracker(None, hooks=d, sink=lambda c, r: rows.append(
            dict(zip(names, r + shunt_conn_values(c), strict=True))))
        yield tracker, ShuntManager(table, tracker, d, shunt_rows.append), rows, shunt_rows
    finally:
        table.close()
        prog.close()


def run(frames: list[tuple[bool, bytes]], shunt_after: int | None,
        seq_ack: list | None = None, flush_each: bool = False,
        reads: list[float] | None = None, read_lag: float = 0.0
        ) -> tuple[dict[str, Any], list[tuple], int]:
    """(conn.log record, shunt.log rows, frames taken as late packets); `seq_ack` gets ends()
    once every packet was seen; `flush_each`: pending late packets applied after each frame
    (a capture batch per frame) instead of once at the end. `reads`: each frame is captured
    after the ring events were last read; reading them again (`ShuntManager.refresh`,
    appending the frame's time to `reads`) covers frames up to `read_lag` seconds older than
    the frame, so a negative lag never covers it."""
    from shuntd.packet import decode

    with rig() as (tracker, manager, rows, shunt_rows):
        late = 0
        for i, (_up, f) in enumerate(frames):
            ts = 1_700_000_000.0 + i * 0.01
            if reads is not None:
                def refresh(ts: float = ts) -> float:
                    reads.append(ts)
                    manager.horizon = ts + read_lag
                    return manager.horizon
                manager.horizon, manager.refresh = ts - 0.005, refresh
            hit = manager.late.get(f[26:38])   # as the capture ring offers it
            if hit is not None and manager.late_frame(hit, f, 0, len(f), len(f), ts):
                late += 1
                if flush_each:
                    manager.flush_pending()
                continue
            pkt = decode(memoryview(f), 1, ts, len(f))
            if pkt is None:
                continue  # (odd_conversation's truncated IP packet: the analyser drops it)
            conn = tracker.process(pkt)
            if i + 1 == shunt_after:
                assert manager.shunt(conn, "test") == "ok"
        manager.flush_pending()
        if seq_ack is not None:
            seq_ack += ends(conn)
        tracker.finish()
        assert not manager.late  # forgotten with the entry
        return rows[0], shunt_rows, late


def test_late_packets_count_as_shunted_and_keep_the_record():
    frames = conversation()
    seen, no_shunt, zero = run(frames, None)
    assert zero == 0 and not no_shunt and seen["history"] == "ShADdtFf"
    shunted, shunt_rows, late = run(frames, 4)   # shunted after the first data packet
    assert late == len(frames) - 4 - 2           # all but the handshake, first data, FINs
    for field in ("orig_bytes", "resp_bytes", "conn_state", "duration"):
        assert shunted[field] == seen[field], field
    # Like a packet XDP drops, a late one gives D/A letters, not `t` (retransmission): the
    # letter the conservation test also leaves out.
    assert shunted["history"] == "ShADdFf"
    for side in ("orig", "resp"):
        assert (shunted[f"{side}_pkts"] + shunted[f"{side}_shunted_pkts"]
                == seen[f"{side}_pkts"])
        assert (shunted[f"{side}_ip_bytes"] + shunted[f"{side}_shunted_bytes"]
                == seen[f"{side}_ip_bytes"])
    assert shunted["orig_pkts"] == 3 + 1 and shunted["resp_pkts"] == 1 + 1
    # shunt.log holds the late packets too: one episode, ended by the FINs.
    (row,) = shunt_rows
    assert row[11] == "fin"
    assert row[12:] == (shunted["orig_shunted_pkts"], shunted["orig_shunted_bytes"],
                        shunted["resp_shunted_pkts"], shunted["resp_shunted_bytes"])


def test_a_late_packet_after_the_last_event_read_has_the_events_read_again():
    """A late packet captured after the ring events were last read (`horizon`) has them read
    again (`refresh`, so none that came before it is missed) and is counted as shunted as
    before; if the read still does not cover it, the analyser gets it."""
    frames = conversation()
    plain, plain_rows, plain_late = run(frames, 4)
    reads: list[float] = []
    again, again_rows, again_late = run(frames, 4, reads=reads, read_lag=0.001)
    assert again_late == plain_late > 0 and len(reads) >= again_late
    for rec in (plain, again):
        rec.pop("uid")
    assert again == plain
    assert [r[:1] + r[2:] for r in again_rows] == [r[:1] + r[2:] for r in plain_rows]
    reads.clear()
    analysed, _, none_late = run(frames, 4, reads=reads, read_lag=-0.001)
    assert none_late == 0 and reads and analysed["orig_shunted_pkts"] == 0
    assert analysed["orig_pkts"] + analysed["resp_pkts"] == len(frames)


@pytest.mark.parametrize("closed", [True, False], ids=["fin", "open"])
@pytest.mark.parametrize("shunt_after", [4, 6, 8])
def test_flushing_after_every_late_packet_changes_nothing(shunt_after: int, closed: bool):
    """Applied batch by batch or once, late packets give the same record and sequence and ack
    numbers: after a flush their chains run on (LateSide.armed) instead of starting again;
    shunted after data both ways, the letters the connection has are armed from the start.
    Left open (no FINs), the record's sizes come from the late packets' sequence numbers."""
    frames = conversation() if closed else conversation()[:13]  # up to the last ack
    seen, _, _ = run(frames, None)
    once_ends: list = []
    each_ends: list = []
    once, once_rows, once_late = run(frames, shunt_after, once_ends)
    each, each_rows, each_late = run(frames, shunt_after, each_ends, flush_each=True)
    assert each_late == once_late > 0 and each_ends == once_ends
    for rec in (once, each):
        rec.pop("uid")
    assert each == once
    assert [r[:1] + r[2:] for r in each_rows] == [r[:1] + r[2:] for r in once_rows]  # no uid
    for field in ("orig_bytes", "resp_bytes", "conn_state"):
        assert each[field] == seen[field], field
    for side in ("orig", "resp"):
        assert each[f"{side}_pkts"] + each[f"{side}_shunted_pkts"] == seen[f"{side}_pkts"]


def test_syn_fin_rst_are_left_to_the_analyser_bad_header_checksums_are_not():
    """XDP drops and counts a shunted packet without checking its IPv4 header checksum, so a
    late packet with a bad one is counted as shunted too; SYN/FIN/RST go to the analyser."""
    from shuntd.shunting import ConnShunt, LateSide, ShuntManager

    manager = ShuntManager.__new__(ShuntManager)
    manager.pending = {}
    manager.horizon = float("inf")
    frames = conversation()
    syn, fin = frames[0][1], frames[-3][1]
    side = LateSide(None, ConnShunt("test"), 0)
    for f in (syn, fin):
        assert manager.late_frame(side, f, 0, len(f), len(f), 1.0) is False
    assert side.pkts == 0 and not manager.pending
    bad = bytearray(frames[4][1])
    bad[24] ^= 0xFF          # IPv4 header checksum
    frames[4] = (frames[4][0], bytes(bad))
    clean, _, _ = run(conversation(), 4)
    dirty, _, late = run(frames, 4)
    clean.pop("uid")
    dirty.pop("uid")
    assert late == len(frames) - 4 - 2 and dirty == clean


@pytest.mark.parametrize("closed", [True, False, "odd"], ids=["fin", "open", "odd"])
def test_late_packets_counted_in_the_capture_ring_give_the_same_record(lab: Lab, closed: Any):
    """The same conversation captured on a real veth: after the shunt, the ring counts most late
    packets itself (its tallies: no call per packet) and gives the rest to late_frame; the
    record and the sequence and ack numbers equal those of late_frame taking every packet
    (apart from capture times). Left open (no FINs), the record's sizes come from the late
    packets' sequence numbers."""
    import time

    from shuntd.capture.ring import CaptureRing, RingConfig
    from shuntd.packet import decode

    if closed == "odd":
        frames = odd_conversation()
    else:
        frames = conversation() if closed else conversation()[:11]  # to the last full ack
    expected_ends: list = []
    expected, expected_rows, expected_late = run(frames, 4, expected_ends)
    pair = lab.veth_to_netns()
    with rig() as (tracker, manager, rows, shunt_rows):
        calls = 0

        def take(*args: Any) -> bool:
            nonlocal calls
            calls += 1
            return manager.late_frame(*args)

        claim = (manager.late, take, manager.late_due, manager.late_clock)
        with CaptureRing(pair.host, RingConfig(block_size=1 << 16, block_count=16,
                                               retire_timeout_ms=10)) as ring:
            conn = None
            for part in (frames[:4], frames[4:]):
                lab.send_frames(pair, [f for _up, f in part])
                got = 0
                deadline = time.monotonic() + 2
                while got < len(part) and time.monotonic() < deadline:
                    before = ring.claimed
                    for ts, frame, wire_len, linktype in ring.poll(0.05, claim):
                        if frame[12:14] != b"\x08\x00":
                            continue  # the namespace's own IPv6 chatter
                        got += 1
                        pkt = decode(frame, linktype, ts, wire_len, ring.csum_unchecked)
                        if pkt is not None:
                            conn = tracker.process(pkt) or conn
                    got += ring.claimed - before
                    manager.flush_pending()
                assert got == len(part)
                if conn is not None and manager.late == {}:
                    assert manager.shunt(conn, "test") == "ok"
            late = ring.claimed
        assert conn is not None and ends(conn) == expected_ends
        tracker.finish()
        assert not manager.late
    assert late == expected_late and 0 < calls < late   # most counted by the ring itself
    (record,) = rows
    for field in ("ts", "uid", "duration"):
        record.pop(field)
        expected.pop(field)
    assert record == expected
    assert [r[11:] for r in shunt_rows] == [r[11:] for r in expected_rows]
