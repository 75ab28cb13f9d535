"""A removed connection is not kept in memory by timers still pending for it.

bench/soak.py found the daemon's memory growing for 10 minutes under churn: conn_long.log's
first poll (600 s) held every removed connection, with its buffers, until it fired. Polls of a
removed connection are now cancelled at removal (`ConnPolling.forget`).
"""

from __future__ import annotations

import gc
import struct

import pytest
from e1_trace_helpers import CORPUS
from shuntd.cli import build_parser, settings_from_args
from shuntd.conn.connection import Connection
from shuntd.conn.tracker import ConnTracker
from shuntd.eventopts import dispatcher_from_args
from shuntd.offline import run_trace
from shuntd.packet import decode


def _udp_frame(sport: int) -> bytes:
    """Ethernet/IPv4/UDP 10.8.0.1:sport -> 10.8.1.1:5000, UDP checksum 0 (none, RFC 768)."""
    payload = b"hello"
    udp = struct.pack("!HHHH", sport, 5000, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     bytes([10, 8, 0, 1]), bytes([10, 8, 1, 1]))
    total = sum(struct.unpack("!10H", ip))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    ip = ip[:10] + struct.pack("!H", ~total & 0xFFFF) + ip[12:]
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + udp


def test_removed_connections_leave_no_pending_timer(tmp_path):
    args = build_parser().parse_args(["-r", "x", "--log-dir", str(tmp_path)])
    events = dispatcher_from_args(args, str(tmp_path), "tsv")   # conn_long.log on (default)
    logged = []
    tracker = ConnTracker(settings_from_args(args), hooks=events.dispatcher,
                          sink=lambda conn, row: logged.append(conn))
    t = 1_000_000.0
    for i in range(50):
        tracker.process(decode(_udp_frame(30000 + i), 1, t + i * 0.01, 47, False))
    # 61 s later every UDP connection has timed out (60 s), long before conn_long's 600 s.
    tracker.advance(t + 61.0)
    assert len(logged) == 50 and not tracker.conns
    pending = list(tracker.timers.pending())
    assert pending == [], f"{len(pending)} timers still hold removed connections"
    events.close()


def test_no_heap_entry_references_a_removed_connection(tmp_path):
    """Cancelled heap entries stay until compaction; they must not pin their connection (and
    its buffers) meanwhile: evictions by the connection bound cancel one per connection."""
    args = build_parser().parse_args(["-r", "x", "--log-dir", str(tmp_path),
                                      "--max-connections", "100"])
    logged = []
    tracker = ConnTracker(settings_from_args(args), sink=lambda conn, row: logged.append(conn))
    for i in range(500):
        tracker.process(decode(_udp_frame(20000 + i), 1, 1_000_000.0 + i * 0.01, 47, False))
    assert len(logged) >= 400  # evicted, logged
    stored = list(tracker.timers.heap) + list(tracker.timers.pending())   # cancelled ones too
    held = [e for e in stored if any(getattr(x, "removed", False) for x in e)]
    assert held == [], f"{len(held)} heap entries still hold removed connections"


@pytest.mark.parametrize("name", ["http.concurrent-range-requests", "dhcp.dhcp-all-msg-types"])
def test_removed_connections_are_freed_without_a_collection(tmp_path, name):
    """TCP and UDP connections hold no reference cycle once removed: reference counting frees
    them (with their buffers) at removal, not the next full collection (gcpace's pauses)."""
    trace = CORPUS / "core" / name / "trace.pcap"   # TCP, UDP
    args = build_parser().parse_args(["-r", str(trace), "--log-dir", str(tmp_path)])
    events = dispatcher_from_args(args, str(tmp_path), "tsv")
    rows = []
    tracker = ConnTracker(settings_from_args(args), hooks=events.dispatcher,
                          sink=lambda conn, row: rows.append(row))
    gc.collect()
    gc.disable()
    try:
        run_trace(trace, tracker)
        assert rows and not tracker.conns
        alive = [o for o in gc.get_objects() if type(o) is Connection]
    finally:
        gc.enable()
        events.close()
    assert alive == [], f"{len(alive)} removed connections wait for the garbage collector"
