#!/usr/bin/env python3
"""Engine throughput on a synthetic trace: parse-only (read + decode), full engine, memory/conn.

A synthetic pcap (bulk and short TCP, UDP request/response, ICMP echo; correct checksums) is
written once to a temp file by a hand-rolled writer, then:

* parse-only: `open_trace` + `decode` for every packet (the floor of what the engine can do);
* engine: read + decode + defrag + `ConnTracker.process` + `finish` (skipped with a note if
  `shuntd.conn.tracker` is not there yet);
* memory per connection: RSS growth of the process while N (default 1M) TCP connections
  are open at once in the tracker (handshake + an unacknowledged request each), divided
  by N; `--mem-detail N` uses tracemalloc instead and prints the N biggest allocation sites.

    .venv/bin/python bench/engine.py [--packets 250000] [--conns 1000000] [--keep PATH]
                                     [--mem-detail N]

The mix (by packet count): ~60% bulk TCP (one request, 600 full-size segments from the
server, an ACK every second segment, FIN/FIN/ACK close: ~907 packets per connection), ~25%
short TCP (handshake, request, one reply segment, close: 9 packets), ~10% UDP request/reply
(DNS-like, 2 packets), ~5% ICMP echo/reply (2 packets); ~27k connections in 250k packets over
60 s of trace time, all closed normally. Memory per connection is measured with all
`--conns` connections live at once (frames made and decoded one connection at a time, so
only the tracker's state remains), not extrapolated.

Speeds are packets per second of process CPU time (one core; wall time is printed too, but on
a shared machine it measures the neighbours as much as the engine), best of two runs each
for both loops over the same trace file.

Last line is the summary; exit 1 if a measured figure misses its floor (engine >= 100k pkt/s and
>= 40% of parse-only; <= 1 KiB per connection).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import struct
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

from shuntd.capture.pcapfile import open_trace
from shuntd.packet import decode

ENGINE_FLOOR_PPS = 100_000
ENGINE_FLOOR_RATIO = 0.40
MEMORY_FLOOR_BYTES = 1024

_ETH_HDR = bytes.fromhex("020000000002" "020000000001") + b"\x08\x00"
_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")
_REC = struct.Struct("<IIII")
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
MSS = 1448


def _csum(data: bytes) -> int:
    """Internet checksum (independent of shuntd's code)."""
    if len(data) & 1:
        data += b"\x00"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


class _Frames:
    """Builds Ethernet/IPv4 frames with correct IP and L4 checksums."""

    def __init__(self) -> None:
        self.ident = 0

    def _ip(self, src: bytes, dst: bytes, proto: int, l4: bytes) -> bytes:
        self.ident = (self.ident + 1) & 0xFFFF
        hdr = _IP.pack(0x45, 0, 20 + len(l4), self.ident, 0x4000, 64, proto, 0, src, dst)
        hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
        return _ETH_HDR + hdr + l4

    def tcp(self, src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int,
            flags: int, payload: bytes = b"") -> bytes:
        seg = _TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 0x50, flags, 65535,
                        0, 0) + payload
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(seg))
        c = _csum(pseudo + seg)
        seg = seg[:16] + struct.pack("!H", c) + seg[18:]
        return self._ip(src, dst, 6, seg)

    def udp(self, src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
        dgram = _UDP.pack(sport, dport, 8 + len(payload), 0) + payload
        pseudo = src + dst + struct.pack("!BBH", 0, 17, len(dgram))
        c = _csum(pseudo + dgram) or 0xFFFF
        dgram = dgram[:6] + struct.pack("!H", c) + dgram[8:]
        return self._ip(src, dst, 17, dgram)

    def icmp(self, src: bytes, dst: bytes, itype: int, ident: int, seq: int) -> bytes:
        msg = struct.pack("!BBHHH", itype, 0, 0, ident, seq) + b"ping-payload" * 4
        msg = msg[:2] + struct.pack("!H", _csum(msg)) + msg[4:]
        return self._ip(src, dst, 1, msg)


def _addr(net: int, n: int) -> bytes:
    return bytes((10, net, (n >> 8) & 0xFF, n & 0xFF))


def _tcp_flow(f: _Frames, rnd: random.Random, c: bytes, s: bytes, cport: int, sport: int,
              t: float, data_segments: int, req: bytes, out: list) -> None:
    cs, ss = rnd.getrandbits(32), rnd.getrandbits(32)
    gap = 0.0002

    def add(frame: bytes) -> None:
        nonlocal t
        out.append((t, frame))
        t += gap * (0.5 + rnd.random())

    add(f.tcp(c, s, cport, sport, cs, 0, SYN))
    add(f.tcp(s, c, sport, cport, ss, cs + 1, SYN | ACK))
    add(f.tcp(c, s, cport, sport, cs + 1, ss + 1, ACK))
    add(f.tcp(c, s, cport, sport, cs + 1, ss + 1, PSH | ACK, req))
    cseq = cs + 1 + len(req)
    sseq = ss + 1
    body = b"B" * MSS
    for i in range(data_segments):
        add(f.tcp(s, c, sport, cport, sseq, cseq, ACK, body))
        sseq += MSS
        if i & 1:
            add(f.tcp(c, s, cport, sport, cseq, sseq, ACK))
    add(f.tcp(s, c, sport, cport, sseq, cseq, FIN | ACK))
    add(f.tcp(c, s, cport, sport, cseq, sseq + 1, FIN | ACK))
    add(f.tcp(s, c, sport, cport, sseq + 1, cseq + 1, ACK))


def make_packets(n_packets: int, seed: int = 1) -> list[tuple[float, bytes]]:
    """~60% bulk TCP, ~25% short TCP, ~10% UDP, ~5% ICMP (by packet count), time-sorted."""
    rnd = random.Random(seed)
    f = _Frames()
    out: list[tuple[float, bytes]] = []
    t0 = 1_700_000_000.0
    span = 60.0
    n = 0
    budget = {"bulk": 0.60 * n_packets, "short": 0.25 * n_packets, "udp": 0.10 * n_packets,
              "icmp": 0.05 * n_packets}
    while budget["bulk"] > 0:
        before = len(out)
        _tcp_flow(f, rnd, _addr(1, n), _addr(2, n % 50), 20000 + n % 40000, 443,
                  t0 + rnd.random() * span, 600, b"G" * 120, out)
        budget["bulk"] -= len(out) - before
        n += 1
    while budget["short"] > 0:
        before = len(out)
        _tcp_flow(f, rnd, _addr(3, n % 60000), _addr(4, n % 200), 1024 + n % 60000, 80,
                  t0 + rnd.random() * span, 1, b"GET / HTTP/1.1\r\n\r\n", out)
        budget["short"] -= len(out) - before
        n += 1
    while budget["udp"] > 0:
        c, s = _addr(5, n % 60000), _addr(6, n % 10)
        t = t0 + rnd.random() * span
        out.append((t, f.udp(c, s, 1024 + n % 60000, 53, b"Q" * 40)))
        out.append((t + 0.001, f.udp(s, c, 53, 1024 + n % 60000, b"R" * 120)))
        budget["udp"] -= 2
        n += 1
    while budget["icmp"] > 0:
        c, s = _addr(7, n % 60000), _addr(8, n % 10)
        t = t0 + rnd.random() * span
        out.append((t, f.icmp(c, s, 8, n & 0xFFFF, 1)))
        out.append((t + 0.0005, f.icmp(s, c, 0, n & 0xFFFF, 1)))
        budget["icmp"] -= 2
        n += 1
    out.sort(key=lambda r: r[0])
    return out


def write_pcap(path: Path, packets: list[tuple[float, bytes]]) -> None:
    """Fast hand-rolled pcap writer (µs, little-endian, Ethernet)."""
    parts = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for ts, frame in packets:
        sec = int(ts)
        usec = int(round((ts - sec) * 1e6))
        if usec >= 1_000_000:
            sec, usec = sec + 1, usec - 1_000_000
        parts.append(_REC.pack(sec, usec, len(frame), len(frame)))
        parts.append(frame)
    path.write_bytes(b"".join(parts))


@dataclass
class Result:
    packets: int
    seconds: float          # CPU time of this process (one core), what the floors use
    wall: float = 0.0       # wall-clock time, printed for reference
    extra: str = ""

    @property
    def pps(self) -> float:
        return self.packets / self.seconds if self.seconds > 0 else 0.0


def _best(runs: list[Result]) -> Result:
    return min(runs, key=lambda r: r.seconds)


def run_parse(trace: Path, repeat: int = 2) -> Result:
    """Read + decode every packet; best of `repeat` runs."""
    runs = []
    for _ in range(repeat):
        n = decoded = 0
        w = time.perf_counter()
        t = time.process_time()
        for ts, frame, wire_len, linktype in open_trace(trace):
            n += 1
            if decode(frame, linktype, ts, wire_len) is not None:
                decoded += 1
        runs.append(Result(n, time.process_time() - t, time.perf_counter() - w,
                           f"decoded={decoded}"))
    return _best(runs)


def _load_tracker() -> tuple[type, type, type] | str:
    try:
        from shuntd.conn.settings import EngineSettings
        from shuntd.conn.tracker import ConnTracker
        from shuntd.defrag import Defragmenter
    except ImportError as exc:
        return f"shuntd.conn.tracker not available ({exc})"
    return ConnTracker, EngineSettings, Defragmenter


def run_engine(trace: Path, repeat: int = 2) -> Result | str:
    """Full engine as `shuntd -r` runs it (`shuntd.offline.run_trace`: read + decode + defrag +
    tracker + finish), records made and discarded; best of `repeat` runs, like the parse-only
    loop. A string = skipped (why)."""
    loaded = _load_tracker()
    if isinstance(loaded, str):
        return loaded
    conn_tracker, engine_settings, _defrag = loaded
    try:
        from shuntd.offline import run_trace
    except ImportError as exc:
        return f"shuntd.offline not available ({exc})"
    runs = []
    for _ in range(repeat):
        rows = 0

        def sink(conn: object, row: tuple) -> None:
            nonlocal rows
            rows += 1

        tracker = conn_tracker(engine_settings(), sink=sink)
        w = time.perf_counter()
        t = time.process_time()
        result = run_trace(trace, tracker)
        seconds = time.process_time() - t
        wall = time.perf_counter() - w
        if result.error:
            return f"engine run failed: {result.error}"
        runs.append(Result(result.frames, seconds, wall, f"conn_rows={rows}"))
        del tracker
        gc.collect()
    return _best(runs)


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _open_conn_frames(f: _Frames, rnd: random.Random, i: int) -> list[bytes]:
    """SYN, SYN-ACK, ACK, request of connection `i` (left open: no FIN), real checksums."""
    c = _addr(11 + i // 65536, i & 0xFFFF)       # a distinct client per connection
    s = _addr(200, i % 250)
    cport = 1024 + (i * 7) % 60000
    cs, ss = rnd.getrandbits(32), rnd.getrandbits(32)
    req = b"GET / HTTP/1.1\r\n\r\n"
    return [f.tcp(c, s, cport, 80, cs, 0, SYN),
            f.tcp(s, c, 80, cport, ss, cs + 1, SYN | ACK),
            f.tcp(c, s, cport, 80, cs + 1, ss + 1, ACK),
            f.tcp(c, s, cport, 80, cs + 1, ss + 1, PSH | ACK, req)]


def measure_memory_per_conn(n_conns: int, detail: int = 0) -> float | str:
    """Memory per open TCP connection (SYN, SYN-ACK, ACK, request each) with `n_conns` open
    at once: RSS growth of the process (tracemalloc growth with `detail`, which also prints
    the biggest allocation sites) divided by the connections open at the end. Frames are
    made, decoded and fed one connection at a time, so only the tracker's state stays."""
    loaded = _load_tracker()
    if isinstance(loaded, str):
        return loaded
    conn_tracker, engine_settings, _defrag = loaded
    f = _Frames()
    rnd = random.Random(7)
    t0 = 1_700_000_000.0
    tracker = conn_tracker(engine_settings())
    process = tracker.process
    thresholds = gc.get_threshold()
    gc.set_threshold(50_000, *thresholds[1:])   # as shuntd.offline.run_trace does
    gc.collect()
    if detail:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    else:
        before = _rss_bytes()
    step = 1e-5 if n_conns <= 5_000_000 else 50.0 / n_conns   # all inside 50 s of trace
    for i in range(n_conns):
        ts = t0 + i * step
        for frame in _open_conn_frames(f, rnd, i):
            pkt = decode(frame, 1, ts, len(frame))
            if pkt is not None:
                process(pkt)
            ts += 1e-6
    pkt = None
    gc.collect()
    gc.set_threshold(*thresholds)
    open_conns = len(tracker.conns)
    if detail:
        after = tracemalloc.get_traced_memory()[0]
        for stat in tracemalloc.take_snapshot().statistics("lineno")[:detail]:
            print(f"  {stat.size / max(1, open_conns):7.0f} B/conn  {stat.traceback}")
        tracemalloc.stop()
    else:
        after = _rss_bytes()
    if open_conns < n_conns:
        return f"only {open_conns} of {n_conns} connections were open"
    return (after - before) / open_conns


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=250_000)
    ap.add_argument("--conns", type=int, default=1_000_000,
                    help="connections open at once for memory/conn (RSS growth); 0 skips "
                         "the memory figure (speed only)")
    ap.add_argument("--keep", type=Path, help="write the synthetic trace here and keep it")
    ap.add_argument("--mem-detail", type=int, default=0, metavar="N",
                    help="measure memory with tracemalloc instead of RSS and print the N "
                         "biggest allocation sites (slow: use with a smaller --conns)")
    args = ap.parse_args()

    t = time.perf_counter()
    packets = make_packets(args.packets)
    with tempfile.TemporaryDirectory(prefix=f"e1bench{os.getpid()}") as tmp:
        trace = args.keep or Path(tmp) / "synthetic.pcap"
        write_pcap(trace, packets)
        size = trace.stat().st_size
        del packets
        print(f"trace: {trace} {size / 1e6:.1f} MB, generated in {time.perf_counter() - t:.1f} s")

        parse = run_parse(trace)
        print(f"parse-only: {parse.packets} pkts in {parse.seconds:.2f} s CPU "
              f"({parse.wall:.2f} s wall) = {parse.pps:,.0f} pkt/s ({parse.extra})")
        engine = run_engine(trace)
    failures: list[str] = []
    summary = [f"parse {parse.pps:,.0f} pkt/s"]
    if isinstance(engine, str):
        print(f"engine: skipped: {engine}")
        summary.append("engine SKIPPED")
    else:
        ratio = engine.pps / parse.pps if parse.pps else 0.0
        print(f"engine: {engine.packets} pkts in {engine.seconds:.2f} s CPU ({engine.wall:.2f} s "
              f"wall) = {engine.pps:,.0f} pkt/s ({ratio:.0%} of parse-only; {engine.extra})")
        summary.append(f"engine {engine.pps:,.0f} pkt/s ({ratio:.0%} of parse)")
        if engine.pps < ENGINE_FLOOR_PPS:
            failures.append(f"engine < {ENGINE_FLOOR_PPS:,} pkt/s")
        if ratio < ENGINE_FLOOR_RATIO:
            failures.append(f"engine < {ENGINE_FLOOR_RATIO:.0%} of parse-only")

    mem = (measure_memory_per_conn(args.conns, args.mem_detail) if args.conns > 0
           else "--conns 0")
    if isinstance(mem, str):
        print(f"memory/conn: skipped: {mem}")
        summary.append("mem/conn SKIPPED")
    else:
        how = "tracemalloc" if args.mem_detail else "RSS growth"
        print(f"memory/conn: {mem:,.0f} bytes over {args.conns:,} open TCP connections "
              f"({how}; {mem * args.conns / 2**30:.2f} GiB in all)")
        summary.append(f"{mem:,.0f} B/conn")
        if mem > MEMORY_FLOOR_BYTES:
            failures.append(f"memory/conn > {MEMORY_FLOOR_BYTES} B")

    status = "FAIL: " + "; ".join(failures) if failures else "OK"
    print(f"SUMMARY engine bench: {', '.join(summary)} -> {status}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
