#!/usr/bin/env python3
"""CPU per frame of the capture ring walk (`CaptureRing.poll`) on a synthetic TPACKET_V3 ring:
frames yielded to the analyser and late packets of shunted sessions claimed in the ring.

Unlike ring_cost.py no packet is sent: the first `--frames` frames of the TLS mix
(`build/bench/tls-mix-g400x4.pcap`, real TCP sessions, real times) are laid out in an anonymous
mapping as the kernel lays out its blocks (block header, tpacket3_hdr + sockaddr_ll, the frame
at the usual tp_mac), and a `CaptureRing` without a socket walks them: no veth, no kernel
drops, the same bytes every round. `--share` of the TCP connections are shunted by a real
`ShuntManager` (a real XDP program's maps) once both sides sent data, as the TLS policy does;
their later frames are the late packets. Four drains, each of a fresh copy of the ring:

* `plain`: no claim, every frame yielded (off-mode walk per frame);
* `miss`: a claim dict of the same size matching nothing (on-mode cost per yielded frame);
* `late`: the daemon's claim (`late`, `late_frame`, `late_due`, `late_clock`), read in batches
  of `--batch` yielded frames with `flush_pending` after each (daemon.Engine.capture); ns per
  claimed frame = (drain time - yielded frames x the `miss` cost) / claimed frames, the
  flushes included;
* `pass`: one `poll` of an empty ring plus a `flush_pending` with nothing pending: what each
  capture pass costs before any frame.

Each figure is the best and the median of `--repeat` rounds (process CPU time). For figures
steadier than the clock, run under `perf stat -e instructions` with `--only late` etc.

    .venv/bin/python bench/ring_walk.py [--frames 50000] [--repeat 7] [--share 0.8]
                                        [--batch 4096] [--only plain|miss|late|pass]

Last line is the summary; exit 0 (no floor), 1 if a drain lost frames, 2 on a setup error.
Needs root (BPF maps).
"""

from __future__ import annotations

import argparse
import gc
import mmap
import os
import select
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

from shuntd.capture.pcapfile import open_trace
from shuntd.capture.ring import (
    _MAC_USUAL,
    LINKTYPE_ETHERNET,
    TP_STATUS_USER,
    CaptureRing,
    CaptureStats,
    RingConfig,
)

ROOT = Path(__file__).resolve().parent.parent
MIX = ROOT / "build" / "bench" / "tls-mix-g400x4.pcap"
BLOCK = 1 << 20
_BLOCK_DESC = struct.Struct("=IIIII")  # version, offset_to_priv, status, num_pkts, first
_HDR = struct.Struct("=IIIIIIHH")  # next, sec, nsec, snap, len, status, mac, net
_PKTTYPE = 58  # sockaddr_ll.sll_pkttype (after the 48-byte tpacket3_hdr): 0, PACKET_HOST
IDLE_FD, _IDLE_W = os.pipe()  # never written to: never readable
FIRST = 48  # offset of the first frame header in a block (after the block descriptor)


class SyntheticRing:
    """Frames laid out in TPACKET_V3 blocks; `ring()` gives a CaptureRing over a fresh copy."""

    def __init__(self, frames: list[tuple[float, bytes]]) -> None:
        blocks: list[bytearray] = []
        cur = bytearray(BLOCK)
        off, n, prev = FIRST, 0, -1
        for ts, f in frames:
            size = (_MAC_USUAL + len(f) + 15) & ~15
            if off + size > BLOCK:
                blocks.append(self._close(cur, n, prev))
                cur, off, n, prev = bytearray(BLOCK), FIRST, 0, -1
            if prev >= 0:
                struct.pack_into("=I", cur, prev, off - prev)
            sec = int(ts)
            nsec = int(round((ts - sec) * 1e9))
            _HDR.pack_into(cur, off, 0, sec, nsec, len(f), len(f), TP_STATUS_USER, _MAC_USUAL,
                           _MAC_USUAL + 14)
            cur[off + _PKTTYPE] = 0
            cur[off + _MAC_USUAL:off + _MAC_USUAL + len(f)] = f
            prev = off
            off += size
            n += 1
        if n:
            blocks.append(self._close(cur, n, prev))
        self.image = b"".join(bytes(b) for b in blocks)
        self.blocks = len(blocks)

    @staticmethod
    def _close(buf: bytearray, n: int, last: int) -> bytearray:
        _BLOCK_DESC.pack_into(buf, 0, 3, 0, TP_STATUS_USER, n, FIRST)
        return buf

    def ring(self) -> CaptureRing:
        """A CaptureRing reading a fresh copy of the blocks (no socket: every block is ready,
        so poll never waits), plus one spare block left to the kernel (where the walk stops)."""
        m = mmap.mmap(-1, (self.blocks + 1) * BLOCK)
        m[:len(self.image)] = self.image
        r = CaptureRing.__new__(CaptureRing)
        r.config = RingConfig(block_size=BLOCK, block_count=self.blocks + 1)
        r.iface = "synthetic"
        r.ifindex = 0
        r._stats = CaptureStats()
        r._block = 0
        r._resume = None
        r._drop_outgoing = True
        r.fanout_group = None
        r.link_down_events = r.resyncs = r.claimed = 0
        r.csum_unchecked = False
        r._map, r._view = m, memoryview(m)
        r.linktype = LINKTYPE_ETHERNET
        # An idle socket's poll: a pipe nothing is written to (poll(0) on an empty ring).
        r._poller = select.poll()
        r._poller.register(IDLE_FD, select.POLLIN)
        return r


def done(r: CaptureRing) -> None:
    r._view.release()
    r._map.close()


def load(path: Path, n: int) -> list[tuple[float, bytes]]:
    out = []
    with open_trace(path) as trace:
        for rec in trace:
            out.append((rec[0], bytes(rec[1])))
            if len(out) == n:
                break
    return out


def tcp_flows(frames: list[tuple[float, bytes]]) -> dict[bytes, bytes]:
    """IPv4 TCP frames' bytes 26-38 -> the connection's key (either direction: the same)."""
    out: dict[bytes, bytes] = {}
    for _, f in frames:
        if len(f) >= 54 and f[12:14] == b"\x08\x00" and f[23] == 6:
            k = f[26:38]
            if k not in out:
                r = k[4:8] + k[0:4] + k[10:12] + k[8:10]
                out[k] = out[r] = min(k, r)
    return out


class Shunted:
    """A real tracker + ShuntManager; the chosen connections analysed until both sides sent
    data, then shunted (their later frames are late packets). `after` is what reaches the
    ring: every frame but those analysed here."""

    def __init__(self, table: Any, frames: list[tuple[float, bytes]], chosen: set[bytes],
                 flows: dict[bytes, bytes]) -> None:
        from shuntd.conn.tracker import ConnTracker
        from shuntd.events import EventDispatcher
        from shuntd.packet import decode
        from shuntd.shunting import ShuntManager

        d = EventDispatcher()
        self.tracker = ConnTracker(None, hooks=d)
        self.manager = ShuntManager(table, self.tracker, d, lambda row: None)
        self.conns = []
        done_: set[bytes] = set()
        before: set[int] = set()
        for i, (ts, f) in enumerate(frames):
            key = flows.get(f[26:38]) if f[12:14] == b"\x08\x00" and f[23] == 6 else None
            if key is None or key not in chosen or key in done_:
                continue
            pkt = decode(memoryview(f), 1, ts, len(f))
            conn = self.tracker.process(pkt) if pkt is not None else None
            if conn is None:
                continue
            before.add(i)
            if "D" in conn.history and "d" in conn.history:
                done_.add(key)
                if self.manager.shunt(conn, "test") == "ok":
                    self.conns.append(conn)
        self.after = [fr for i, fr in enumerate(frames)
                      if i not in before or flows[fr[1][26:38]] not in done_]

    def close(self) -> None:
        for conn in self.conns:
            self.manager.unshunt(conn)


def drain(ring: CaptureRing, claim: Any, manager: Any = None, batch: int = 0
          ) -> tuple[int, int, int]:
    """(CPU ns, frames yielded, frames claimed); with `manager`, in batches of `batch` yielded
    frames and a flush_pending after each, as daemon.Engine.capture."""
    gc.collect()
    n = 0
    if manager is None:
        t0 = time.process_time_ns()
        for _rec in ring.poll(0.0, claim):
            n += 1
        return time.process_time_ns() - t0, n, ring.claimed
    flush = manager.flush_pending
    t0 = time.process_time_ns()
    while True:
        k = 0
        for _rec in ring.poll(0.0, claim):
            k += 1
            if k >= batch:
                break
        flush()
        n += k
        if k < batch:
            break
    return time.process_time_ns() - t0, n, ring.claimed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--share", type=float, default=0.8, help="TCP connections shunted")
    ap.add_argument("--batch", type=int, default=4096, help="yielded frames per batch")
    ap.add_argument("--only", choices=("plain", "miss", "late", "pass"))
    ap.add_argument("--mix", type=Path, default=MIX)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("ring_walk: needs root (BPF maps)", file=sys.stderr)
        return 2
    if not args.mix.exists():
        print(f"ring_walk: {args.mix} missing (make it with scripts/make-tls-mix)",
              file=sys.stderr)
        return 2
    frames = load(args.mix, args.frames)
    flows = tcp_flows(frames)
    conns = sorted(set(flows.values()))
    step = max(1, round(1 / (1 - args.share))) if args.share < 1 else 0
    chosen = {k for i, k in enumerate(conns) if not step or i % step}
    decoy = {bytes([0xFE]) + k[1:]: None for k in flows}  # same size, matches nothing

    from shuntd.datapath.program import XdpProgram
    from shuntd.datapath.table import ShuntTable

    prog = XdpProgram.compile(flows_max=max(1024, 2 * len(chosen)), pairs_max=4)
    table = ShuntTable(prog, lease_seconds=300)
    want = {args.only} if args.only else {"plain", "miss", "late", "pass"}
    res: dict[str, list[float]] = {k: [] for k in ("plain", "miss", "late", "pass")}
    counts = (0, 0, 0)
    try:
        whole = SyntheticRing(frames)
        for _ in range(args.repeat):
            if want & {"plain", "miss", "late"}:
                r = whole.ring()
                t, n, _c = drain(r, None)
                done(r)
                if n != len(frames):
                    raise SystemExit(f"ring_walk: plain drain yielded {n} of {len(frames)}")
                res["plain"].append(t / n)
                r = whole.ring()
                t, n, c = drain(r, (decoy, lambda *a: True))
                done(r)
                if n != len(frames) or c:
                    raise SystemExit(f"ring_walk: miss drain yielded {n} of {len(frames)}")
                res["miss"].append(t / n)
            if "late" in want:
                miss = min(res["miss"])
                sh = Shunted(table, frames, chosen, flows)
                try:
                    r = SyntheticRing(sh.after).ring()
                    m = sh.manager
                    t, n, c = drain(r, (m.late, m.late_frame, m.late_due, m.late_clock), m,
                                    args.batch)
                    done(r)
                    if n + c != len(sh.after):
                        raise SystemExit(f"ring_walk: late drain saw {n + c} of "
                                         f"{len(sh.after)}")
                    res["late"].append((t - n * miss) / max(1, c))
                    counts = (len(sh.conns), c, n)
                finally:
                    sh.close()
            if "pass" in want:
                sh = Shunted(table, frames[:0], set(), flows)
                m = sh.manager
                claim = (m.late, m.late_frame, m.late_due, m.late_clock)
                r = SyntheticRing(frames[:1]).ring()
                for _rec in r.poll(0.0, claim):
                    pass
                reps = 20_000
                gc.collect()
                t0 = time.process_time_ns()
                for _ in range(reps):
                    for _rec in r.poll(0.0, claim):
                        pass
                    m.flush_pending()
                res["pass"].append((time.process_time_ns() - t0) / reps)
                done(r)
    finally:
        table.close()
        prog.close()

    def fig(name: str) -> tuple[float, float]:
        v = res[name]
        return (min(v), statistics.median(v)) if v else (0.0, 0.0)

    print(f"{len(frames)} frames of {args.mix.name}, {len(conns)} TCP connections, "
          f"{counts[0]} shunted; late drain: {counts[1]} claimed, {counts[2]} yielded, "
          f"batches of {args.batch}; {args.repeat} rounds")
    print(f"{'drain':<36}{'best ns':>9}{'median':>9}")
    for name, label in (("plain", "plain, per yielded frame"),
                        ("miss", "claim miss, per yielded frame"),
                        ("late", "late, per claimed frame"),
                        ("pass", "empty pass (poll + flush)")):
        if res[name]:
            best, med = fig(name)
            print(f"{label:<36}{best:>9.0f}{med:>9.0f}")
    print(f"ring_walk: late {fig('late')[0]:.0f} ns/claimed frame | yielded "
          f"{fig('miss')[0]:.0f} ns/frame with claim (plain {fig('plain')[0]:.0f}) | "
          f"empty pass {fig('pass')[0]:.0f} ns | {counts[1]} of {len(frames)} claimed | OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
