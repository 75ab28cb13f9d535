#!/usr/bin/env python3
"""Per-packet cost of the XDP shunting program, measured with BPF_PROG_TEST_RUN.

Floors (from the issue): a shunted packet and a passed packet that misses both maps each cost
at most 3x a bare XDP_DROP program. Cases are interleaved round by round (other work on the
machine then slows all of them alike) and each is the median of its rounds. Also compares the
per-packet clock: calibrated jiffies (the default), bpf_ktime_get_coarse_ns, bpf_ktime_get_ns.
Early shunts are on for port 443 in the main program (its miss frame is a 443 ACK), with two
more lines for them: a 443 data packet of a flow no handshake watch follows, and a packet of
a watched one (a retransmitted ClientHello: lookup, clock, sequence check).
Needs root. The last line is the summary; exit status 1 if a floor is missed.

    .venv/bin/python bench/xdp_cost.py [--repeat 2000000] [--runs 7] [--entries 100000]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from collections.abc import Callable

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw
from shuntd.datapath.program import (
    XDP_DROP,
    XDP_PASS,
    StatIndex,
    XdpProgram,
    lease_deadline_ns,
    test_run_fd,
)

FLOOR_RATIO = 3.0
MACS = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}
PAIRS = 100


def frame_v4(src: str, sport: int, dst: str, dport: int, payload: bytes = b"") -> bytes:
    """Ethernet/IPv4/TCP ACK, 54 bytes plus the payload."""
    pkt = Ether(**MACS) / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="A")
    return bytes(pkt / Raw(payload) if payload else pkt)


def frame_v6_vlan(src: str, sport: int, dst: str, dport: int, vlan: int) -> bytes:
    """Ethernet/802.1Q/IPv6/TCP ACK, 78 bytes."""
    pkt = (Ether(**MACS) / Dot1Q(vlan=vlan) / IPv6(src=src, dst=dst)
           / TCP(sport=sport, dport=dport, flags="A"))
    return bytes(pkt)


SHUNTED_V4 = ("10.1.0.2", 40000, "10.1.0.1", 443)
SHUNTED_V6 = ("2001:db8::2", 40000, "2001:db8::1", 443)
MISSED_V4 = ("10.9.0.2", 40001, "10.9.0.1", 443)
WATCHED_V4 = ("10.9.0.3", 40002, "10.9.0.1", 443)
# A handshake record holding a ClientHello, as far as the program looks (16 03 01 .. .. 01).
CLIENT_HELLO = bytes.fromhex("160301002a010000260303") + bytes(36)
APP_DATA = bytes.fromhex("1703030060") + bytes(96)

def fill(prog: XdpProgram, entries: int, pairs: int) -> None:
    """`entries` random IPv4 TCP flows (one batch update), `pairs` IP pairs, the two bench
    flows; every lease an hour long."""
    rng = random.Random(1)
    keys = (prog.FlowKey * entries)()
    values = (prog.FlowValue * entries)()
    lease = lease_deadline_ns(3600)
    for i in range(entries):
        a = f"172.{16 + i % 16}.{(i >> 8) & 255}.{i & 255}"
        b = f"192.168.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        keys[i], _ = prog.flow_key(a, rng.randrange(1024, 65535), b, 443, 6)
        values[i].lease_expiry_ns = lease
    if entries:
        prog.flows.items_update_batch(keys, values)
    for i in range(pairs):
        k, _ = prog.pair_key(f"198.51.100.{i % 250 + 1}", f"203.0.113.{i // 250 + 1}")
        prog.ip_pairs[k] = prog.new_value(lease)
        prog.pair_added(k)
    k, _ = prog.flow_key(*SHUNTED_V4, 6)
    prog.flows[k] = prog.new_value(lease)
    k, _ = prog.flow_key(*SHUNTED_V6, 6, vlan=42)
    prog.flows[k] = prog.new_value(lease)


def bare_drop() -> tuple[object, int]:
    from bcc import BPF

    bpf = BPF(text=b"int xdp_bare(struct xdp_md *ctx) { return XDP_DROP; }")
    return bpf, bpf.load_func(b"xdp_bare", BPF.XDP).fd


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2_000_000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--entries", type=int, default=100_000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("xdp_cost: needs root (BPF_PROG_TEST_RUN)", file=sys.stderr)
        return 2

    bare_bpf, bare_fd = bare_drop()
    main_prog = XdpProgram.compile()
    coarse = XdpProgram.compile(extra_cflags=("-DSHUNTD_CLOCK_COARSE",))
    fine = XdpProgram.compile(extra_cflags=("-DSHUNTD_CLOCK_FINE",))
    nopairs = XdpProgram.compile()
    progs = (main_prog, coarse, fine, nopairs)
    try:
        for prog in progs:
            fill(prog, args.entries, 0 if prog is nopairs else PAIRS)
        main_prog.calibrate_clock()
        hour = 3600 * 10**9
        main_prog.set_early(443, 1, hour, main_prog.map_now_ns() + hour)
        v4, v6 = frame_v4(*SHUNTED_V4), frame_v6_vlan(*SHUNTED_V6, vlan=42)
        miss = frame_v4(*MISSED_V4)
        miss_data = frame_v4(*MISSED_V4, payload=APP_DATA)
        watched = frame_v4(*WATCHED_V4, payload=CLIENT_HELLO)
        main_prog.test_run(watched)     # arms the watch; every later run is a retransmission
        if main_prog.stats()[StatIndex.EARLY_ARMED] != 1:
            print("xdp_cost: the ClientHello frame armed no watch", file=sys.stderr)
            return 1
        cases: dict[str, tuple[int, bytes, int]] = {
            "bare XDP_DROP": (bare_fd, v4, XDP_DROP),
            "shunted IPv4 TCP": (main_prog.prog_fd(), v4, XDP_DROP),
            "passed, miss both maps": (main_prog.prog_fd(), miss, XDP_PASS),
            "shunted IPv6 TCP in VLAN": (main_prog.prog_fd(), v6, XDP_DROP),
            "passed, miss (ip_pairs empty)": (nopairs.prog_fd(), miss, XDP_PASS),
            "passed, 443 data, no watch": (main_prog.prog_fd(), miss_data, XDP_PASS),
            "passed, watched TLS flow": (main_prog.prog_fd(), watched, XDP_PASS),
            "shunted IPv4, coarse clock": (coarse.prog_fd(), v4, XDP_DROP),
            "shunted IPv4, bpf_ktime_get_ns": (fine.prog_fd(), v4, XDP_DROP),
        }
        samples: dict[str, list[int]] = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, (fd, frame, want) in cases.items():
                res = test_run_fd(fd, frame, args.repeat)
                if res.retval != want:
                    print(f"xdp_cost: {name}: verdict {res.retval}, expected {want}",
                          file=sys.stderr)
                    return 1
                samples[name].append(res.ns_per_run)
    finally:
        for prog in progs:
            prog.close()
        close: Callable[[], None] = bare_bpf.cleanup  # type: ignore[attr-defined]
        close()

    ns = {name: float(statistics.median(vals)) for name, vals in samples.items()}
    bare = ns["bare XDP_DROP"]
    print(f"BPF_PROG_TEST_RUN, repeat {args.repeat}, median of {args.runs} interleaved runs; "
          f"flows map: {args.entries + 2} entries, ip_pairs: {PAIRS}")
    print(f"{'case':<34}{'ns/pkt':>8}{'x bare':>8}   samples")
    for name, val in ns.items():
        print(f"{name:<34}{val:>8.0f}{val / bare:>8.2f}   {sorted(samples[name])}")

    checked = ("shunted IPv4 TCP", "passed, miss both maps")
    missed = [name for name in checked if ns[name] / bare > FLOOR_RATIO]
    verdict = "OK" if not missed else "MISSED: " + "; ".join(missed)
    print(f"xdp_cost: bare {bare:.0f} ns | shunted {ns[checked[0]] / bare:.2f}x | "
          f"miss {ns[checked[1]] / bare:.2f}x | v6+vlan "
          f"{ns['shunted IPv6 TCP in VLAN'] / bare:.2f}x | clocks jiffies/coarse/fine "
          f"{ns['shunted IPv4 TCP']:.0f}/{ns['shunted IPv4, coarse clock']:.0f}/"
          f"{ns['shunted IPv4, bpf_ktime_get_ns']:.0f} ns | early: 443 data "
          f"{ns['passed, 443 data, no watch']:.0f} ns, watched "
          f"{ns['passed, watched TLS flow']:.0f} ns | floor {FLOOR_RATIO:.0f}x: {verdict}")
    return 0 if not missed else 1


if __name__ == "__main__":
    sys.exit(main())
