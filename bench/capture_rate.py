#!/usr/bin/env python3
"""Offered vs delivered packet rate of the TPACKET_V3 capture ring, with kernel drops.

A sender process in a private network namespace (pinned to CPU 0) pushes 64-byte frames through
a veth pair as fast as it can (or at --rate pps); this process (pinned to CPU 1) reads them from
the ring on the host side, touching each frame's EtherType like a decoder would. Kernel drops
come from PACKET_STATISTICS. Traffic never leaves the veth pair. Needs root.

    .venv/bin/python bench/capture_rate.py [--seconds 3] [--rate 0] [--blocks 64] [--floor 100000]

Last line is the summary; exit 1 if delivered pps is below --floor or accounting is off.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import struct
import sys
import time

from pyroute2 import IPRoute, netns
from shuntd.capture.ring import CaptureRing, RingConfig

FRAME = bytes.fromhex("02c10000000102c100000002") + b"\x88\xb5" + bytes(46)


def _pin(cpu: int) -> None:
    if cpu < os.cpu_count():  # type: ignore[operator]
        os.sched_setaffinity(0, {cpu})


def _sender(
    ns: str, ifname: str, seconds: float, rate: int, out: mp.Queue, limit: int = 0
) -> None:
    """Send FRAME for `seconds` (paced to `rate` pps, capped at `limit` frames if non-zero);
    report the count sent."""
    _pin(0)
    netns.pushns(ns)
    tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    tx.bind((ifname, 0))
    send = tx.send
    sent = 0
    start = time.perf_counter()
    end = start + seconds
    batch = 64
    while True:
        now = time.perf_counter()
        if now >= end or (limit and sent >= limit):
            break
        if rate and sent > (now - start) * rate:
            continue
        for _ in range(batch):
            try:
                send(FRAME)
                sent += 1
            except BlockingIOError:
                pass
    out.put((sent, time.perf_counter() - start))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rate", type=int, default=0, help="offered pps (0: as fast as possible)")
    ap.add_argument("--blocks", type=int, default=64, help="ring blocks of --block-kib")
    ap.add_argument("--block-kib", type=int, default=1024)
    ap.add_argument("--floor", type=int, default=100_000, help="minimum delivered pps")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("capture_rate: needs root (netns, veth, AF_PACKET)", file=sys.stderr)
        return 2

    tag = str(os.getpid())
    ns, host_if, ns_if = f"c1bns{tag}", f"c1bh{tag}", f"c1bn{tag}"
    netns.create(ns)
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": ns_if, "net_ns_fd": ns})
            with open(f"/proc/sys/net/ipv6/conf/{host_if}/disable_ipv6", "w") as f:
                f.write("1")
            ipr.link("set", index=ipr.link_lookup(ifname=host_if)[0], state="up")
        netns.pushns(ns)
        try:
            with open(f"/proc/sys/net/ipv6/conf/{ns_if}/disable_ipv6", "w") as f:
                f.write("1")
            with IPRoute() as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname=ns_if)[0], state="up")
        finally:
            netns.popns()
        time.sleep(0.1)
        return _measure(args, ns, host_if, ns_if)
    finally:
        with IPRoute() as ipr:
            for idx in ipr.link_lookup(ifname=host_if):
                ipr.link("del", index=idx)
        netns.remove(ns)


def _measure(args: argparse.Namespace, ns: str, host_if: str, ns_if: str) -> int:
    _pin(1)
    cfg = RingConfig(block_size=args.block_kib * 1024, block_count=args.blocks)
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()
    with CaptureRing(host_if, cfg) as ring:
        sender = ctx.Process(target=_sender, args=(ns, ns_if, args.seconds, args.rate, out))
        etype = struct.Struct("!H").unpack_from
        seen_types = 0
        t0 = time.perf_counter()
        sender.start()
        while sender.is_alive():
            for _ts, frame, _wl, _lt in ring.poll(0.05):
                seen_types += etype(frame, 12)[0] == 0x88B5
        idle_until = time.perf_counter() + 0.3
        while time.perf_counter() < idle_until:
            for _ts, frame, _wl, _lt in ring.poll(0.05):
                seen_types += etype(frame, 12)[0] == 0x88B5
                idle_until = time.perf_counter() + 0.3
        sender.join()
        sent, send_secs = out.get(timeout=5)
        stats = ring.stats()
        elapsed = time.perf_counter() - t0
    offered = sent / send_secs
    delivered = stats.delivered / send_secs
    loss = stats.dropped / sent if sent else 0.0
    drain_pps = _consumer_only(cfg, ns, host_if, ns_if)
    print(f"ring: {args.blocks} x {args.block_kib} KiB, retire {cfg.retire_timeout_ms} ms")
    print(f"consumer alone (ring pre-filled, then drained): {drain_pps / 1e3:.0f} kpps")
    print(f"sent {sent} in {send_secs:.2f} s; kernel seen {stats.seen}, "
          f"dropped {stats.dropped}, freeze {stats.freeze_q_cnt}; delivered {stats.delivered} "
          f"(ours {seen_types}) in {elapsed:.2f} s")
    accounted = stats.seen == sent and stats.delivered + stats.dropped == sent
    ok = accounted and delivered >= args.floor
    print(f"capture_rate: offered {offered / 1e3:.0f} kpps, delivered {delivered / 1e3:.0f} kpps, "
          f"kernel drops {loss:.1%}, accounting {'exact' if accounted else 'OFF'} "
          f"({'ok' if ok else 'BELOW FLOOR'} >= {args.floor / 1e3:.0f} kpps)")
    return 0 if ok else 1


def _consumer_only(cfg: RingConfig, ns: str, host_if: str, ns_if: str) -> float:
    """Fill the ring while nobody reads, then time reading it: the reader's own ceiling."""
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()
    limit = 200_000
    with CaptureRing(host_if, cfg) as ring:
        sender = ctx.Process(target=_sender, args=(ns, ns_if, 30.0, 0, out, limit))
        sender.start()
        sender.join()
        out.get(timeout=5)
        etype = struct.Struct("!H").unpack_from
        n = 0
        t0 = time.perf_counter()
        for _ts, frame, _wl, _lt in ring.poll(0.0):
            n += etype(frame, 12)[0] == 0x88B5
        took = time.perf_counter() - t0
    print(f"(drained {n} frames in {took * 1e3:.0f} ms)")
    return n / took if took else 0.0


if __name__ == "__main__":
    sys.exit(main())
