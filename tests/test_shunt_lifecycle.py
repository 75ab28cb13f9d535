"""A shunt's FIN/RST events on the real XDP program (BPF_PROG_TEST_RUN, ring buffer, no
interface): the entry's sequence and ack numbers read for a FIN/RST event serve every event
received before the read (ShuntManager._apply_close, ConnShunt.refs), and only those. Each side
moves its sequence space by 3 x 0x60000000 while shunted (steps XDP follows, past 2^32); the
server ends with a RST, after which nothing moves its sequence space: placed without the
entry's wrap counts, it would leave resp_bytes 4 GiB short."""

from __future__ import annotations

import time
from typing import Any

import pytest
from lab import is_root

pytestmark = pytest.mark.skipif(not is_root(), reason="needs root (BPF)")

A, B = "10.0.0.1", "10.0.0.2"
CLIENT, SERVER = 40000, 443
C0, S0 = 1000, 5000         # initial sequence numbers
C, S = C0 + 1, S0 + 1       # the first data byte of each side
J = 0x60000000              # a jump XDP takes as forward (< 2^31)
M32 = 0xFFFFFFFF


def seg(up: bool, flags: str, seq: int, ack: int, data: bytes = b"") -> bytes:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    src, sport, dst, dport = (A, CLIENT, B, SERVER) if up else (B, SERVER, A, CLIENT)
    return bytes(Ether() / IP(src=src, dst=dst)
                 / TCP(sport=sport, dport=dport, flags=flags, seq=seq & M32, ack=ack & M32)
                 / data)


def handshake() -> list[bytes]:
    return [seg(True, "S", C0, 0), seg(False, "SA", S0, C), seg(True, "A", C, S)]


def client_part() -> list[bytes]:
    """The client sends 16 bytes at C, C + J, C + 2J (the server acks each), then its FIN at
    C + 3J."""
    out = []
    for k in range(3):
        out.append(seg(True, "PA", C + k * J, S, b"u" * 16))
        out.append(seg(False, "A", S, C + k * J + 16))
    out.append(seg(True, "FA", C + 3 * J, S))
    return out


def server_part() -> list[bytes]:
    """The server acks the client's FIN, sends 16 bytes at S, S + J, S + 2J, S + 3J (the
    client acks the first three: the server's size comes from its own sequence numbers),
    then a RST right after its data."""
    fin_ack = C + 3 * J + 1
    out = [seg(False, "A", S, fin_ack)]
    for k in range(4):
        out.append(seg(False, "PA", S + k * J, fin_ack, b"d" * 16))
        if k < 3:
            out.append(seg(True, "A", fin_ack, S + k * J + 16))
    out.append(seg(False, "RA", S + 3 * J + 16, fin_ack))
    return out


def fire(tracker: Any, ts: float) -> None:
    tracker.advance(ts)
    while tracker.timers.advance(ts):
        pass


def run(batches: list[list[bytes]] | None) -> tuple[dict[str, Any], list[tuple], int]:
    """(conn.log record, shunt.log rows, entry reads for FIN/RST events). None: every frame
    analysed, no shunt. Otherwise shunted after the handshake; each batch is dropped by XDP,
    its ring events read and applied (their timers fired) before the next batch."""
    from shuntd.conn.record import CONN_FIELDS, SHUNT_CONN_FIELDS
    from shuntd.conn.tracker import ConnTracker
    from shuntd.datapath.program import XdpProgram
    from shuntd.datapath.ring import RingPoller
    from shuntd.datapath.table import ShuntTable
    from shuntd.events import EventDispatcher
    from shuntd.packet import decode
    from shuntd.shunting import ShuntManager, shunt_conn_values

    names = [n for n, _ in CONN_FIELDS + SHUNT_CONN_FIELDS]
    rows: list[dict[str, Any]] = []
    shunt_rows: list[tuple] = []
    prog = XdpProgram.compile(flows_max=16, pairs_max=4)
    table = ShuntTable(prog, lease_seconds=30)
    ring = RingPoller(prog)
    reads = 0
    lookup_tcp = table.lookup_tcp

    def counted(key: bytes) -> Any:
        nonlocal reads
        reads += 1
        return lookup_tcp(key)

    table.lookup_tcp = counted  # type: ignore[method-assign]
    try:
        d = EventDispatcher()
        tracker = ConnTracker(None, hooks=d, sink=lambda c, r: rows.append(
            dict(zip(names, r + shunt_conn_values(c), strict=True))))
        manager = ShuntManager(table, tracker, d, shunt_rows.append)
        ts = time.time() - 5.0
        frames = handshake()
        if batches is None:
            frames += client_part() + server_part()
        for f in frames:
            ts += 0.001
            conn = tracker.process(decode(memoryview(f), 1, ts, len(f)))
        if batches is not None:
            assert manager.shunt(conn, "test") == "ok"
            for batch in batches:
                for f in batch:
                    assert prog.test_run(f).retval == 1  # XDP_DROP
                events = ring.poll(0)
                assert events
                for ev in events:
                    manager.apply(ev)
                fire(tracker, max(e.ts for e in events) + 1e-6)
        tracker.finish()
        return rows[0], shunt_rows, reads
    finally:
        ring.close()
        table.close()
        prog.close()


@pytest.mark.parametrize("one_batch", [True, False], ids=["one-read", "read-again"])
def test_fin_rst_events_placed_past_2_32_with_one_read_per_batch(one_batch: bool):
    """The client's FIN and the server's RST in one ring batch: one read of the entry serves
    both. The server's part dropped after the FIN was applied: the RST needs a new read (the
    first one is older than the server's jumps). Either way the record is the one of every
    packet analysed: the client sent 3J bytes of sequence space, the server 3J + 16."""
    batches = ([client_part() + server_part()] if one_batch
               else [client_part(), server_part()])
    shunted, shunt_rows, reads = run(batches)
    seen, _, _ = run(None)
    assert (seen["orig_bytes"], seen["resp_bytes"]) == (3 * J, 3 * J + 16) == (
        4_831_838_208, 4_831_838_224)
    for field in ("orig_bytes", "resp_bytes", "conn_state"):
        assert shunted[field] == seen[field], field
    # Analysed, the jumps are content gaps (g, G); shunted data is not missed.
    assert (seen["history"], shunted["history"]) == ("ShADaGFdgr", "ShADaFdr")
    # Dropped (40 IP bytes, + 16 with data): the client's 3 data + FIN + 3 acks, the server's
    # 4 acks + 4 data + RST; the handshake was analysed.
    assert (shunted["orig_shunted_pkts"], shunted["orig_shunted_bytes"]) == (7, 7 * 40 + 3 * 16)
    assert (shunted["resp_shunted_pkts"], shunted["resp_shunted_bytes"]) == (9, 9 * 40 + 4 * 16)
    assert (shunted["orig_pkts"], shunted["resp_pkts"]) == (2, 1)
    (row,) = shunt_rows
    assert row[11] == "rst" and row[12:] == (7, 328, 9, 424)
    assert reads == (1 if one_batch else 2)
