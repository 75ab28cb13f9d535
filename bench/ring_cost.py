#!/usr/bin/env python3
"""Cost of the capture ring walk per frame: frames yielded to the analyser, and late packets
claimed in the ring (`CaptureRing.poll(claim=...)` -> `ShuntManager.late_frame`).

The first `--frames` frames of the TLS mix (`build/bench/tls-mix-g400x4.pcap`, real TCP
sessions) are sent from a private namespace into a veth pair while nothing reads the ring on
the host side, so they all sit in it (the ring is sized to hold them; kernel drops and missing
frames fail the run). Then one drain of the ring is timed in process CPU time, the consumer a
trivial loop. Three kinds of drain, each on a fresh copy of the frames:

* `plain`: no claim; every frame is yielded (the walk's cost per yielded frame, off-mode);
* `miss`: a claim dict as large as the real one whose keys match nothing (yielded frames'
  cost in the on-mode, where every frame is looked up);
* `floor`: the late drain's claim dict with a `take` that just says yes (no tally): the walk,
  the key lookup and a call, i.e. what no late-packet code can save;
* `late`: the real late path: `--share` (default 80%) of the TCP connections were shunted
  before the frames arrived (their first frame analysed by a real `ConnTracker`, then
  `ShuntManager.shunt` with a real XDP program's maps), so their frames are claimed, except
  SYN/FIN/RST and the like, which are yielded. ns per claimed frame = (drain time - yielded
  frames x the `miss` cost per frame) / claimed frames. The `flush_pending` after the drain is
  timed apart (per connection with pending late packets).
* `batched`: the late drain as the daemon does it under a burst, the connections shunted
  after their handshake (both sides sent data, as the TLS policy): the ring read in batches
  of `--batch` yielded frames, `flush_pending` after each (daemon.Engine.capture), so each
  shunted session's late packets span many batches. ns per claimed frame as above, the
  flushes included.

Each figure is the best and the median of `--repeat` rounds (the machine is shared: the best is
the cost, the median shows the noise).

    .venv/bin/python bench/ring_cost.py [--frames 50000] [--repeat 5] [--share 0.8]
                                        [--batch 512]
                                        [--max-claimed-ns 0] [--max-yielded-ns 0]

Last line is the summary; exit 1 if a run lost frames or a `--max-*` ceiling (0: none) is
missed, 2 on a setup error. Needs root.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shuntd.capture.pcapfile import open_trace
from shuntd.capture.ring import CaptureRing, RingConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from lab import Lab, inside_netns  # noqa: E402

MIX = ROOT / "build" / "bench" / "tls-mix-g400x4.pcap"
BLOCK = 1 << 20


class Rig:
    """tests/lab.py's veth pair (host side here, peer in a namespace), IPv6 off on both sides
    (no chatter among the frames counted), and a raw socket on the peer that sends paced."""

    def __init__(self) -> None:
        self.lab = Lab("rc")
        try:
            pair = self.lab.veth_to_netns(up=False)
            subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{pair.host}.disable_ipv6=1"],
                           check=True, stdout=subprocess.DEVNULL)
            subprocess.run(["ip", "netns", "exec", str(pair.netns), "sysctl", "-qw",
                            f"net.ipv6.conf.{pair.peer}.disable_ipv6=1"],
                           check=True, stdout=subprocess.DEVNULL)
            self.lab.set_link(pair.host, state="up")
            with inside_netns(str(pair.netns)):
                self.tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            self.lab.on_close(self.tx.close)
            self.tx.bind((pair.peer, 0))
            self.host = pair.host
        except BaseException:
            self.lab.close()
            raise

    def send(self, frames: list[bytes]) -> None:
        send = self.tx.send
        for i, f in enumerate(frames):
            send(f)
            if i % 256 == 255:
                time.sleep(0.0005)  # let the receive path keep up (no backlog drops)

    def close(self) -> None:
        self.lab.close()


def load(path: Path, n: int) -> list[bytes]:
    frames = []
    with open_trace(path) as trace:
        for rec in trace:
            frames.append(bytes(rec[1]))
            if len(frames) == n:
                break
    return frames


def tcp_flows(frames: list[bytes]) -> dict[bytes, bytes]:
    """IPv4 TCP frames' bytes 26-38 -> the connection's key (either direction: the same)."""
    out: dict[bytes, bytes] = {}
    for f in frames:
        if len(f) >= 54 and f[12:14] == b"\x08\x00" and f[23] == 6:
            k = f[26:38]
            if k not in out:
                r = k[4:8] + k[0:4] + k[10:12] + k[8:10]
                out[k] = out[r] = min(k, r)
    return out


def fill(lab: Rig, ring: CaptureRing, frames: list[bytes]) -> None:
    """Send the frames and wait until the kernel has handed over every block."""
    base = ring.stats().seen
    lab.send(frames)
    seen = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.05)  # > the retire timeout: the last block is handed over
        s = ring.stats()
        seen = s.seen - base
        if s.dropped:
            raise SystemExit(f"ring_cost: kernel dropped {s.dropped} of {len(frames)} frames")
        if seen >= len(frames):
            return
    raise SystemExit(f"ring_cost: only {seen} of {len(frames)} frames reached the ring")


def drain(ring: CaptureRing, claim: Any) -> tuple[int, int, int]:
    """(CPU ns, frames yielded, frames claimed) of one drain."""
    claimed0 = ring.claimed
    gc.collect()
    n = 0
    t0 = time.process_time_ns()
    for _rec in ring.poll(0.0, claim):
        n += 1
    t = time.process_time_ns() - t0
    return t, n, ring.claimed - claimed0


def drain_batched(ring: CaptureRing, claim: Any, manager: Any, batch: int
                  ) -> tuple[int, int, int, int]:
    """(CPU ns, frames yielded, frames claimed, batches) of one drain in batches of `batch`
    yielded frames with a flush_pending after each, as daemon.Engine.capture."""
    claimed0 = ring.claimed
    gc.collect()
    n = batches = 0
    t0 = time.process_time_ns()
    while True:
        k = 0
        for _rec in ring.poll(0.0, claim):
            k += 1
            if k >= batch:
                break
        manager.flush_pending()
        n += k
        batches += 1
        if k < batch:
            break
    t = time.process_time_ns() - t0
    return t, n, ring.claimed - claimed0, batches


class Shunted:
    """A real tracker + ShuntManager with the chosen connections shunted (real XDP maps):
    after their first frame, or with `handshake` once both sides sent data, as the TLS policy
    shunts them (their history has both sides' letters; the others are not shunted)."""

    def __init__(self, table: Any, frames: list[bytes], chosen: set[bytes],
                 flows: dict[bytes, bytes], handshake: bool = False) -> None:
        from shuntd.conn.tracker import ConnTracker
        from shuntd.events import EventDispatcher
        from shuntd.packet import decode
        from shuntd.shunting import ShuntManager

        d = EventDispatcher()
        self.tracker = ConnTracker(None, hooks=d)
        self.manager = ShuntManager(table, self.tracker, d, lambda row: None)
        self.conns = []
        self.before: set[int] = set()  # frames analysed before their connection's shunt
        done: set[bytes] = set()
        now = time.time()
        for i, f in enumerate(frames):
            key = flows.get(f[26:38]) if f[12:14] == b"\x08\x00" and f[23] == 6 else None
            if key is None or key not in chosen or key in done:
                continue
            pkt = decode(memoryview(f), 1, now, len(f))
            conn = self.tracker.process(pkt) if pkt is not None else None
            if conn is None:
                continue
            self.before.add(i)
            if not handshake or "D" in conn.history and "d" in conn.history:
                done.add(key)
                if self.manager.shunt(conn, "test") == "ok":
                    self.conns.append(conn)
        # Only the frames of shunted connections count as analysed before.
        self.before = {i for i in self.before if flows[frames[i][26:38]] in done}

    def close(self) -> None:
        for conn in self.conns:
            self.manager.unshunt(conn)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--share", type=float, default=0.8, help="TCP connections shunted")
    ap.add_argument("--batch", type=int, default=512, help="yielded frames per batch")
    ap.add_argument("--mix", type=Path, default=MIX)
    ap.add_argument("--max-claimed-ns", type=float, default=0.0)
    ap.add_argument("--max-yielded-ns", type=float, default=0.0)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("ring_cost: needs root (netns, veth, AF_PACKET, BPF)", file=sys.stderr)
        return 2
    if not args.mix.exists():
        print(f"ring_cost: {args.mix} missing (make it with scripts/make-tls-mix)",
              file=sys.stderr)
        return 2
    frames = load(args.mix, args.frames)
    flows = tcp_flows(frames)
    conns = sorted(set(flows.values()))
    step = max(1, round(1 / (1 - args.share))) if args.share < 1 else 0
    chosen = {k for i, k in enumerate(conns) if not step or i % step}
    decoy = {bytes([0xFE]) + k[1:]: None for k in flows}  # same size, matches nothing
    need = sum((len(f) + 68 + 15) & ~15 for f in frames)
    blocks = need * 3 // 2 // BLOCK + 8

    from shuntd.datapath.program import XdpProgram
    from shuntd.datapath.table import ShuntTable

    prog = XdpProgram.compile(flows_max=max(1024, 2 * len(chosen)), pairs_max=4)
    table = ShuntTable(prog, lease_seconds=300)
    lab = Rig()
    res: dict[str, list[float]] = {k: [] for k in ("plain", "miss", "floor", "late", "claimed",
                                                    "late_yielded", "flush", "batched")}
    counts = bcounts = (0, 0)
    batches = 0
    try:
        cfg = RingConfig(block_size=BLOCK, block_count=blocks, retire_timeout_ms=20)
        with CaptureRing(lab.host, cfg) as ring:
            for _ in range(args.repeat):
                fill(lab, ring, frames)
                t, n, c = drain(ring, None)
                if n != len(frames):
                    raise SystemExit(f"ring_cost: plain drain yielded {n} of {len(frames)}")
                res["plain"].append(t / n)
                fill(lab, ring, frames)
                t, n, c = drain(ring, (decoy, lambda *a: True))
                if n != len(frames) or c:
                    raise SystemExit(f"ring_cost: miss drain yielded {n} of {len(frames)}")
                miss = t / n
                res["miss"].append(miss)
                sh = Shunted(table, frames, chosen, flows)
                try:
                    fill(lab, ring, frames)
                    t, n, c = drain(ring, (dict(sh.manager.late), lambda *a: True))
                    res["floor"].append((t - n * miss) / max(1, c))
                    fill(lab, ring, frames)
                    m = sh.manager
                    claim = ((m.late, m.late_frame, m.late_due, m.late_clock)
                             if hasattr(m, "late_due") else (m.late, m.late_frame))  # older
                    t, n, c = drain(ring, claim)
                    if n + c != len(frames):
                        raise SystemExit(f"ring_cost: late drain saw {n + c} of {len(frames)}")
                    pend = len(m.pending)
                    t0 = time.process_time_ns()
                    m.flush_pending()
                    res["flush"].append((time.process_time_ns() - t0) / max(1, pend))
                    res["late"].append(t / len(frames))
                    res["claimed"].append((t - n * miss) / max(1, c))
                    res["late_yielded"].append(n)
                    counts = (c, n)
                finally:
                    sh.close()
                sh = Shunted(table, frames, chosen, flows, handshake=True)
                try:
                    after = [f for i, f in enumerate(frames) if i not in sh.before]
                    fill(lab, ring, after)
                    m = sh.manager
                    t, n, c, nb = drain_batched(
                        ring, (m.late, m.late_frame, m.late_due, m.late_clock), m, args.batch)
                    if n + c != len(after):
                        raise SystemExit(f"ring_cost: batched drain saw {n + c} of "
                                         f"{len(after)}")
                    bcounts = (c, n)
                    res["batched"].append((t - n * miss) / max(1, c))
                    batches = nb
                finally:
                    sh.close()
            s = ring.stats()
            if s.dropped:
                print(f"ring_cost: kernel dropped {s.dropped} frames", file=sys.stderr)
                return 1
    finally:
        lab.close()
        table.close()
        prog.close()

    def fig(name: str) -> tuple[float, float]:
        return min(res[name]), statistics.median(res[name])

    print(f"{len(frames)} frames of {args.mix.name}, {len(conns)} TCP connections, "
          f"{len(chosen)} shunted; ring {blocks} x 1 MiB; {args.repeat} rounds; "
          f"late drain: {counts[0]} claimed, {counts[1]} yielded; batched: {bcounts[0]} claimed, "
          f"{bcounts[1]} yielded, {batches} batches")
    print(f"{'drain':<34}{'best ns':>9}{'median':>9}")
    for name, label in (("plain", "plain, per yielded frame"),
                        ("miss", "claim miss, per yielded frame"),
                        ("floor", "claim floor, per claimed frame"),
                        ("late", "late drain, per frame"),
                        ("claimed", "late drain, per claimed frame"),
                        ("flush", "flush_pending, per connection"),
                        ("batched", "batched, per claimed frame")):
        best, med = fig(name)
        print(f"{label:<34}{best:>9.0f}{med:>9.0f}")
    claimed, yielded = fig("claimed")[0], fig("miss")[0]
    missed = []
    if args.max_claimed_ns and claimed > args.max_claimed_ns:
        missed.append(f"claimed {claimed:.0f} > {args.max_claimed_ns:.0f} ns")
    if args.max_yielded_ns and yielded > args.max_yielded_ns:
        missed.append(f"yielded {yielded:.0f} > {args.max_yielded_ns:.0f} ns")
    verdict = "OK" if not missed else "MISSED: " + "; ".join(missed)
    print(f"ring_cost: claimed {claimed:.0f} ns/frame | yielded {yielded:.0f} ns/frame "
          f"(plain {fig('plain')[0]:.0f}) | claim floor {fig('floor')[0]:.0f} | "
          f"flush {fig('flush')[0]:.0f} ns/conn | batched {fig('batched')[0]:.0f} ns/claimed | "
          f"{counts[0]} of {len(frames)} claimed | {verdict}")
    return 0 if not missed else 1


if __name__ == "__main__":
    sys.exit(main())
