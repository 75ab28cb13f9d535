#!/usr/bin/env python3
"""Early shunts on a real capture: does XDP fire on the frame where the engine raises
ssl_established, for every TLS flow of the trace?

Every TCP frame to or from `--port` goes, in capture order, through the XDP program (early
shunts on for that port, BPF_PROG_TEST_RUN) and through the connection engine (ConnTracker +
EventDispatcher, conn/protocols/tls.py), until both have decided for its flow. A flow counts as
"same frame" when the EARLY ring event came on the very frame during which the engine raised
ssl_established. Needs root. The last line is the summary; exit status 1 if XDP fired before
the engine or without it (unsafe), or dropped a frame of a flow it had not shunted.

    .venv/bin/python bench/xdp_early_check.py TRACE [--port 443] [--limit N]
"""

from __future__ import annotations

import argparse
import collections
import os
import struct
import sys
from typing import Any

from shuntd.capture.pcapfile import open_trace
from shuntd.conn.tracker import ConnTracker
from shuntd.datapath.program import XDP_DROP, StatIndex, XdpProgram
from shuntd.events import EventDispatcher
from shuntd.packet import LINKTYPE_ETHERNET, decode

FlowId = tuple[tuple[bytes, int], tuple[bytes, int]]


def flow_id(frame: bytes, port: int) -> FlowId | None:
    """Direction-neutral id of an untagged IPv4/IPv6 TCP frame to or from `port`."""
    if frame[12:14] == b"\x08\x00":
        ip = frame[14:]
        if len(ip) < 20 or ip[9] != 6:
            return None
        l4, src, dst = (ip[0] & 15) * 4, ip[12:16], ip[16:20]
    elif frame[12:14] == b"\x86\xdd":
        ip = frame[14:]
        if len(ip) < 40 or ip[6] != 6:
            return None
        l4, src, dst = 40, ip[8:24], ip[24:40]
    else:
        return None
    if len(ip) < l4 + 4:
        return None
    sport, dport = struct.unpack_from(">HH", ip, l4)
    if port not in (sport, dport):
        return None
    a, b = (bytes(src), sport), (bytes(dst), dport)
    return (a, b) if a <= b else (b, a)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--port", type=int, default=443)
    ap.add_argument("--limit", type=int, default=0, help="frames to read (0: all)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("xdp_early_check: needs root (BPF_PROG_TEST_RUN)", file=sys.stderr)
        return 2

    established: dict[FlowId, int] = {}
    current: list[Any] = [None, 0]
    dispatcher = EventDispatcher()
    dispatcher.add_handler("ssl_established",
                           lambda conn: established.setdefault(current[0], current[1]))
    tracker = ConnTracker(hooks=dispatcher)
    fired: dict[FlowId, int] = {}
    events = [0]
    unsafe_drops = 0
    prog = XdpProgram.compile()
    try:
        hour = 3600 * 10**9
        prog.set_early(args.port, 1, hour, prog.map_now_ns() + hour)
        prog.events.open_ring_buffer(lambda _c, _d, _s: events.__setitem__(0, events[0] + 1))
        with open_trace(args.trace) as trace:
            for i, (ts, data, _wire, linktype) in enumerate(trace):
                if args.limit and i >= args.limit:
                    break
                frame = bytes(data)
                if linktype != LINKTYPE_ETHERNET:
                    print(f"xdp_early_check: linktype {linktype} is not Ethernet",
                          file=sys.stderr)
                    return 2
                fid = flow_id(frame, args.port)
                if fid is None or (fid in fired and fid in established):
                    continue
                current[0], current[1] = fid, i
                pkt = decode(frame, LINKTYPE_ETHERNET, ts, len(frame))
                if pkt is not None:
                    tracker.process(pkt)
                if fid in fired:
                    continue
                before = events[0]
                verdict = prog.test_run(frame).retval
                prog.bpf.ring_buffer_consume()
                if events[0] != before:
                    fired[fid] = i
                elif verdict == XDP_DROP:
                    unsafe_drops += 1
        stats = prog.stats()
    finally:
        prog.close()

    outcome: collections.Counter[str] = collections.Counter()
    for fid in set(established) | set(fired):
        est, fire = established.get(fid), fired.get(fid)
        if est is None:
            outcome["fired without ssl_established (UNSAFE)"] += 1
        elif fire is None:
            outcome["ssl_established, XDP left it to the daemon"] += 1
        elif fire == est:
            outcome["same frame"] += 1
        elif fire < est:
            outcome["fired earlier (UNSAFE)"] += 1
        else:
            outcome["fired later"] += 1
    for name, count in sorted(outcome.items()):
        print(f"{count:7d}  {name}")
    early = {s.name.lower(): stats[s] for s in StatIndex if s.name.startswith("EARLY")}
    print("stats:", early)
    unsafe = sum(c for name, c in outcome.items() if "UNSAFE" in name) + unsafe_drops
    print(f"xdp_early_check: {len(established)} flows with ssl_established, "
          f"{outcome['same frame']} fired on the same frame, unsafe {unsafe}: "
          f"{'OK' if not unsafe else 'UNSAFE'}")
    return 1 if unsafe else 0


if __name__ == "__main__":
    sys.exit(main())
