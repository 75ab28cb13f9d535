"""Micro-benchmark of what only the on-mode pays per shunted connection and per packet.

Loads the real XDP program (no interface: BPF_PROG_TEST_RUN plays the kernel's part) and runs
N TLS-like sessions through the daemon's own pieces (ConnTracker, EventDispatcher with the
shipped `tls` and `bulk` policies and a ShuntManager as its `actions`, ShuntTable,
RingPoller), timing each step of a shunt's life:

  shunt    ssl_established dispatched -> tls policy -> ShuntManager.shunt (map insert)
  ring     RingPoller.poll of the FIN events XDP wrote (2 a session)
  apply    ShuntManager.apply + the timers that feed each FIN to the TCP analyser
  renew    one lease renewal of every entry (the daemon renews every lease/3)
  remove   removal of the closed sessions (counter read + delete + merge + shunt.log),
           minus the same removal of sessions that were never shunted (the control)

The sum is the lifecycle; minus what analysing the same FINs and last ACK costs the control
(what the off-mode pays for them instead), it is the on-mode's extra.

and the per-packet and per-connection policy path: EventDispatcher.packet with the bulk
policy's thresholds pending, and the bulk policy's two per-connection dispatches.
An empty RingPoller.poll (what every capture batch pays) is timed too.

Each figure is the best of --rounds rounds. Last line: the summary.
    sudo .venv/bin/python bench/shunt_ops.py [--sessions 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

SERVER = bytes([10, 2, 0, 1])
_ETH = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00"
F_FIN, F_SYN, F_RST, F_PSH, F_ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def frame(src: bytes, sport: int, dst: bytes, dport: int, flags: int, seq: int, ack: int,
          payload: bytes = b"") -> bytes:
    """Ethernet + IPv4 + TCP; checksums left zero (the engine runs with checksums ignored,
    XDP never checks them)."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 0, 0x4000, 64, 6, 0, src, dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)
    return _ETH + ip + tcp + payload


class Session:
    """One client's frames: analysed handshake + first data, then what XDP drops."""

    __slots__ = ("analysed", "dropped", "conn")

    def __init__(self, i: int) -> None:
        cli = bytes([10, 1, (i >> 8) & 0xFF, i & 0xFF])
        cp, sp = 20000 + (i % 40000), 443
        c, s = 1000 + i * 7, 50000 + i * 11
        up = (cli, cp, SERVER, sp)
        down = (SERVER, sp, cli, cp)
        self.analysed = [
            frame(*up, F_SYN, c, 0), frame(*down, F_SYN | F_ACK, s, c + 1),
            frame(*up, F_ACK, c + 1, s + 1),
            frame(*up, F_PSH | F_ACK, c + 1, s + 1, b"x" * 200),
            frame(*down, F_PSH | F_ACK, s + 1, c + 201, b"y" * 1000),
        ]
        c, s = c + 201, s + 1001
        self.dropped = [
            frame(*up, F_PSH | F_ACK, c, s, b"x" * 300),
            frame(*down, F_PSH | F_ACK, s, c + 300, b"y" * 1400),
            frame(*up, F_FIN | F_ACK, c + 300, s + 1400),
            frame(*down, F_FIN | F_ACK, s + 1400, c + 301),
            frame(*up, F_ACK, c + 301, s + 1401),
        ]
        self.conn: Any = None


class Rig:
    """A fresh engine (tracker, dispatcher, policies, manager) over the shared program."""

    def __init__(self, table: Any, shunt: bool) -> None:
        from shuntd.conn.tracker import ConnTracker
        from shuntd.events import EventDispatcher
        from shuntd.policies import bulk, tls
        from shuntd.shunting import ShuntManager, shunt_conn_values

        self.rows: list[tuple] = []
        self.shunt_rows: list[tuple] = []
        d = EventDispatcher()
        self.tracker = ConnTracker(None, hooks=d, sink=lambda c, r: self.rows.append(
            r + shunt_conn_values(c)))
        self.manager = ShuntManager(table, self.tracker, d, self.shunt_rows.append)
        d.actions = self.manager
        if shunt:
            d.add_handlers(tls)
        d.add_handlers(bulk)
        self.dispatcher = d


def _decode(f: bytes, ts: float) -> Any:
    from shuntd.packet import decode

    return decode(memoryview(f), 1, ts, len(f), True)


def advance(tracker: Any, ts: float) -> None:
    """Network time to `ts` with every due timer fired (the tracker fires at most
    max_expires a call, as Zeek)."""
    tracker.advance(ts)
    while tracker.timers.advance(ts):
        pass


def lifecycle_round(prog: Any, table: Any, ring: Any, n: int) -> dict[str, float]:
    """Seconds per phase for n sessions (shunted), and the control's removal."""
    out: dict[str, float] = {}
    sessions = [Session(i) for i in range(n)]
    rig = Rig(table, shunt=True)
    tracker = rig.tracker
    t0 = time.time() - 2.0
    for s in sessions:
        for k, f in enumerate(s.analysed):
            s.conn = tracker.process(_decode(f, t0 + k * 1e-4))
    # shunt: the TLS policy's ssl_established, as the service detection raises it
    dispatch = rig.dispatcher.dispatch
    t = time.perf_counter()
    for s in sessions:
        dispatch("ssl_established", s.conn)
    out["shunt"] = time.perf_counter() - t
    assert len(rig.manager.flows) == n, "not every session was shunted"
    for s in sessions:  # the kernel's part: XDP drops and counts, FINs become events
        for f in s.dropped:
            if prog.test_run(f).retval != 1:
                raise SystemExit("XDP did not drop a shunted session's packet")
    # ring: read the 2n FIN events
    events: list[Any] = []
    t = time.perf_counter()
    while len(events) < 2 * n:
        got = ring.poll(0)
        if not got and time.perf_counter() - t > 5:
            raise SystemExit(f"only {len(events)} of {2 * n} ring events arrived")
        events += got
    out["ring"] = time.perf_counter() - t
    # renew: one renewal of every entry
    t = time.perf_counter()
    rig.manager.renew()
    out["renew"] = time.perf_counter() - t
    # apply: each event is a timer at its own time; firing them feeds the FINs
    t = time.perf_counter()
    for ev in events:
        rig.manager.apply(ev)
    advance(tracker, max(ev.ts for ev in events) + 1e-6)
    out["apply"] = time.perf_counter() - t
    # remove: past tcp_close_delay every session is removed (counters merged, rows written)
    end = tracker.network_time + 30.0
    t = time.perf_counter()
    advance(tracker, end)
    out["remove"] = time.perf_counter() - t
    if len(rig.shunt_rows) != n or table.occupancy:
        raise SystemExit(f"{len(rig.shunt_rows)} shunt rows for {n} sessions, "
                         f"{table.occupancy} entries left")
    counts = {r[-4:] for r in rig.rows}
    if counts != {(3, 420, 2, 1480)}:  # data, FIN, final ACK up (340+40+40); data, FIN down
        raise SystemExit(f"unexpected shunted counters {counts}")
    # control: the same sessions analysed to the end, never shunted
    sessions = [Session(i) for i in range(n)]
    rig = Rig(table, shunt=False)
    tracker = rig.tracker
    t0 = time.time() - 2.0
    for s in sessions:
        for k, f in enumerate(s.analysed + s.dropped[:2]):
            tracker.process(_decode(f, t0 + k * 1e-4))
    # What the FINs and the last ACK cost when analysed (the off-mode pays this instead)
    closing = [[_decode(f, t0 + (7 + k) * 1e-4) for k, f in enumerate(s.dropped[2:])]
               for s in sessions]
    t = time.perf_counter()
    process = tracker.process
    for pkts in closing:
        for pkt in pkts:
            process(pkt)
    out["fins_ctl"] = time.perf_counter() - t
    end = tracker.network_time + 30.0
    t = time.perf_counter()
    advance(tracker, end)
    out["remove_ctl"] = time.perf_counter() - t
    return out


def packet_round(table: Any, n: int, packets: int) -> dict[str, float]:
    """Seconds for the policy path: per-connection dispatches and per-packet checks
    (`packets` per state) of n UDP connections, with the bulk policy."""
    from shuntd.conn.tracker import ConnTracker
    from shuntd.events import EventDispatcher

    out: dict[str, float] = {}
    d = Rig(table, shunt=False).dispatcher
    tracker = ConnTracker(None, hooks=EventDispatcher())
    t0 = time.time()
    conns = []
    for i in range(n):
        cli = bytes([10, 3, (i >> 8) & 0xFF, i & 0xFF])
        udp = struct.pack("!HHHH", 5353, 53, 8 + 12, 0) + b"q" * 12  # a DNS query
        raw = _ETH + struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17,
                                 0, cli, SERVER) + udp
        conns.append(tracker.process(_decode(raw, t0 + i * 1e-6)))
    t = time.perf_counter()
    for c in conns:
        d.dispatch("new_connection", c)
    out["new_conn"] = time.perf_counter() - t
    pkt = _decode(frame(SERVER, 1, SERVER, 2, F_ACK, 0, 0), t0)
    hook = d.packet
    per = max(1, packets // n)
    t = time.perf_counter()
    for c in conns:  # what new_connection set is pending, not crossed (orig side)
        for _ in range(per):
            hook(c, pkt, True)
    out["pkt_before"] = (time.perf_counter() - t) / (per * n) * packets
    t = time.perf_counter()
    for c in conns:
        d.dispatch("packets_threshold_crossed", c, 10, True)
    out["crossed"] = time.perf_counter() - t
    t = time.perf_counter()
    for c in conns:  # after packets_threshold_crossed (if the policy handles it), resp side
        for _ in range(per):
            hook(c, pkt, False)
    out["pkt_after"] = (time.perf_counter() - t) / (per * n) * packets
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--packets", type=int, default=200_000)
    ap.add_argument("--polls", type=int, default=20_000)
    args = ap.parse_args()

    from shuntd.datapath.program import XdpProgram
    from shuntd.datapath.ring import RingPoller
    from shuntd.datapath.table import ShuntTable

    n = args.sessions
    prog = XdpProgram.compile(flows_max=max(1024, 2 * n), pairs_max=16)
    table = ShuntTable(prog, lease_seconds=30)
    ring = RingPoller(prog)
    try:
        from shuntd.datapath.program import CFG_IGNORE_VLANS

        prog.set_flags(CFG_IGNORE_VLANS)
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for k, v in lifecycle_round(prog, table, ring, n).items():
                best[k] = min(best.get(k, v), v)
            for k, v in packet_round(table, n, args.packets).items():
                best[k] = min(best.get(k, v), v)
            t = time.perf_counter()
            for _ in range(args.polls):
                ring.poll(0)
            v = time.perf_counter() - t
            best["empty_poll"] = min(best.get("empty_poll", v), v)
    finally:
        table.close()
        prog.close()

    us = 1e6
    life = {k: best[k] / n * us for k in ("shunt", "ring", "apply", "renew")}
    life["remove"] = (best["remove"] - best["remove_ctl"]) / n * us
    total = sum(life.values())
    for k, v in life.items():
        print(f"lifecycle {k:7s} {v:7.2f} us/session")
    print(f"control (never shunted): removal {best['remove_ctl'] / n * us:.2f} us, analysing "
          f"the FINs and last ACK {best['fins_ctl'] / n * us:.2f} us")
    extra = total - best["fins_ctl"] / n * us
    print(f"lifecycle {total:.2f} us/session; on-mode extra (minus the FIN analysis the "
          f"off-mode does) {extra:.2f} us")
    print(f"empty ring poll {best['empty_poll'] / args.polls * us:.3f} us")
    per_conn = (best["new_conn"] + best["crossed"]) / n * us
    print(f"bulk policy per connection: new_connection {best['new_conn'] / n * us:.2f} us, "
          f"packets_threshold_crossed {best['crossed'] / n * us:.2f} us")
    pb = best["pkt_before"] / args.packets * us
    pa = best["pkt_after"] / args.packets * us
    print(f"per packet (EventDispatcher.packet): after new_connection {pb:.3f} us, after "
          f"packets_threshold_crossed {pa:.3f} us")
    print(f"summary: shunt lifecycle {total:.2f} us/session ({extra:.2f} on-mode extra); "
          f"policy {per_conn:.2f} us/conn; "
          f"thresholds {(pb + pa) / 2:.3f} us/packet; empty poll "
          f"{best['empty_poll'] / args.polls * us:.3f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
