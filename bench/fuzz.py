#!/usr/bin/env python3
"""Fuzz the packet parser, the trace reader and the whole offline engine (nightly target).

    .venv/bin/python bench/fuzz.py [--inputs 1000000] [--seed N] [--corpus DIR] [--save DIR]

Plain seeded random mutation (no extra dependency; reproducible from --seed):
* decode:  mutated well-formed frames and random bytes -> `packet.decode` on every link type
           (and fragments -> `Defragmenter`); anything but None/Packet is an escape.
* trace:   mutated pcap files -> `open_trace` iteration; only TraceError may come out.
* engine:  real corpus traces (Zeek's baselines beside them) with frames Zeek drops before any
           connection interleaved -> `run_trace` must give exactly Zeek's rows (ids, ts and the
           exact fields); and traces with every frame duplicated and mutated -> each baseline
           connection still logged exactly once, and no exception.
An input that escapes is written to --save (tests/fuzz_regressions/), which the test suite
replays. Prints inputs/s per target; the last line is the summary; exit 1 on any escape.
The helpers here are also imported by tests/test_fuzz_engine.py (its short version).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from shuntd.capture.pcapfile import TraceError, open_trace
from shuntd.conn.record import CONN_FIELDS
from shuntd.conn.settings import EngineSettings
from shuntd.conn.tracker import ConnTracker
from shuntd.defrag import Defragmenter
from shuntd.offline import run_trace
from shuntd.packet import Packet, decode

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus" / "zeek" / "core"
REGRESSIONS = ROOT / "tests" / "fuzz_regressions"
FIELDS = [f for f, _t in CONN_FIELDS]
EXACT = ("proto", "conn_state", "history", "orig_bytes", "resp_bytes", "missed_bytes",
         "orig_pkts", "orig_ip_bytes", "resp_pkts", "resp_ip_bytes")
# Ethernet traces, no -C, default or bare mode whose baselines the engine reproduces exactly.
ENGINE_TRACES = ("pop3.basic", "ftp.ftp-ipv6", "modbus.modbus_and_non_modbus_on_port_502")
LINKTYPES = (0, 1, 9, 101, 108, 113, 127, 228, 229, 276)
Record = tuple[int, int, bytes, int]          # (sec, frac, frame, wire_len) as in the pcap


# --------------------------------------------------------------------------------------------
# inputs


def read_pcap(path: Path) -> tuple[bytes, list[Record]]:
    """Classic pcap -> (global header, raw records), byte-exact (no float round trip)."""
    data = path.read_bytes()
    e = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    out: list[Record] = []
    pos = 24
    while pos + 16 <= len(data):
        sec, frac, incl, orig = struct.unpack_from(e + "IIII", data, pos)
        out.append((sec, frac, data[pos + 16:pos + 16 + incl], orig))
        pos += 16 + incl
    return data[:24], out


def write_pcap(header: bytes, records: list[Record]) -> bytes:
    e = "<" if header[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    parts = [header]
    for sec, frac, frame, wire in records:
        parts.append(struct.pack(e + "IIII", sec, frac, len(frame), wire))
        parts.append(frame)
    return b"".join(parts)


def _ip4_header(rng: random.Random, tot: int, proto: int, ihl: int = 5) -> bytes:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, tot, rng.getrandbits(16), 0,
                                64, proto, 0, rng.randbytes(4), rng.randbytes(4)))
    s = sum(struct.unpack("!10H", hdr))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    hdr[10:12] = struct.pack("!H", ~s & 0xFFFF)
    return bytes(hdr)


def garbage_frame(rng: random.Random) -> bytes:
    """An Ethernet frame Zeek drops before any connection exists (zeek-conn.md §0.3/0.5),
    whatever its random content: no conn.log line may come of it."""
    eth = rng.randbytes(12)
    kind = rng.randrange(7)
    if kind == 0:   # not IP: ARP / LLDP with random body
        return eth + rng.choice((b"\x08\x06", b"\x88\xcc")) + rng.randbytes(rng.randrange(60))
    if kind == 1:   # IPv4, wire length < total length (truncated_IP_len)
        body = rng.randbytes(rng.randrange(40))
        return eth + b"\x08\x00" + _ip4_header(rng, 20 + len(body) + 1 + rng.randrange(1000),
                                               rng.randrange(256)) + body
    if kind == 2:   # IPv4 IHL < 5
        return eth + b"\x08\x00" + bytes([0x40 | rng.randrange(5)]) + rng.randbytes(40)
    if kind == 3:   # IPv6 header cut short
        return eth + b"\x86\xdd" + bytes([0x60]) + rng.randbytes(rng.randrange(39))
    if kind == 4:   # IPv6 payload length beyond the wire
        body = rng.randbytes(rng.randrange(40))
        return (eth + b"\x86\xdd" + b"\x60\0\0\0" + struct.pack("!H", len(body) + 1
                + rng.randrange(1000)) + bytes([rng.randrange(256), 64]) + rng.randbytes(32)
                + body)
    if kind == 5:   # TCP/UDP/ICMP shorter than its fixed header per the IP length
        proto, need = rng.choice(((6, 20), (17, 8), (1, 8)))
        n = rng.randrange(need)
        return eth + b"\x08\x00" + _ip4_header(rng, 20 + n, proto) + rng.randbytes(n)
    # unknown IP version in an IPv4 or IPv6 ethertype
    return eth + rng.choice((b"\x08\x00", b"\x86\xdd")) + bytes(
        [rng.choice((0, 1, 2, 3, 5, 7, 8, 15)) << 4 | 5]) + rng.randbytes(50)


def mutate(rng: random.Random, data: bytes) -> bytes:
    """A few byte flips, a cut, an insertion or a splice of random bytes."""
    b = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(5)
        if op <= 1 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2 and b:
            del b[rng.randrange(len(b)):]
        elif op == 3:
            at = rng.randrange(len(b) + 1)
            b[at:at] = rng.randbytes(rng.randrange(1, 9))
        elif b:
            at = rng.randrange(len(b))
            b[at:at + 2] = struct.pack("!H", rng.choice((0, 1, 0xFFFF, 0x7FFF, len(b))))
    return bytes(b)


# --------------------------------------------------------------------------------------------
# checks: each returns None, or a one-line description of what escaped


def check_decode(frame: bytes, linktype: int, wire_len: int, defrag: Defragmenter) -> str | None:
    try:
        for ignore in (False, True):
            pkt = decode(frame, linktype, 1.0, wire_len, ignore)
            if pkt is not None and not isinstance(pkt, Packet):
                return f"decode returned {type(pkt).__name__}"
            if pkt is not None and pkt.frag:
                defrag.add(pkt)
    except Exception as exc:  # noqa: BLE001 - that is what we hunt
        return f"{type(exc).__name__}: {exc}"
    return None


def check_trace(data: bytes, path: Path) -> str | None:
    path.write_bytes(data)
    try:
        with open_trace(path) as reader:
            for _rec in reader:
                pass
    except TraceError:
        pass
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def engine_rows(data: bytes, path: Path, settings: EngineSettings | None = None
                ) -> tuple[list[dict], str | None]:
    """Run the whole offline engine on pcap bytes; (rows, escape or None)."""
    path.write_bytes(data)
    rows: list[tuple] = []
    tracker = ConnTracker(settings or EngineSettings(), sink=lambda _c, r: rows.append(r))
    try:
        run_trace(path, tracker)
    except Exception as exc:  # noqa: BLE001
        return [], f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
    return [dict(zip(FIELDS, r, strict=True)) for r in rows], None


def read_baseline(trace_dir: Path) -> list[dict[str, str]]:
    """Zeek's conn.log (TSV) -> rows; a small reader of our own, not our log writer."""
    fields: list[str] = []
    rows = []
    for line in (trace_dir / "conn.log").read_text().splitlines():
        if line.startswith("#fields\t"):
            fields = line.split("\t")[1:]
        elif line and not line.startswith("#"):
            rows.append(dict(zip(fields, line.split("\t"), strict=False)))
    return rows


def _id(row: dict) -> tuple[str, ...]:
    """Connection identity; Zeek's baselines mask ts (XXXXXXXXXX.XXXXXX), so it is left out."""
    return (row["id.orig_h"], str(row["id.orig_p"]), row["id.resp_h"], str(row["id.resp_p"]),
            row["proto"])


def _text(v: object) -> str:
    return "-" if v is None else str(v)


def diff_against_baseline(rows: list[dict], baseline: list[dict], exact: bool) -> str | None:
    """exact: the same rows as Zeek with the same EXACT fields; else every baseline
    connection logged exactly as often as in Zeek's log (extra rows with ids Zeek never
    logged, made by mutated addresses or ports, are allowed)."""
    ours = Counter(_id(r) for r in rows)
    want = Counter(_id(b) for b in baseline)
    for key, count in want.items():
        if ours[key] != count:
            return f"baseline connection {' '.join(key)} logged {ours[key]} times, Zeek {count}"
    if not exact:
        return None
    if len(rows) != len(baseline):
        return f"{len(rows)} rows, Zeek has {len(baseline)}"
    left = list(rows)
    for b in baseline:
        cands = [r for r in left if _id(r) == _id(b)]
        match = next((r for r in cands if all(_text(r[f]) == b[f] for f in EXACT)), None)
        if match is None:
            r = cands[0]
            bad = next(f for f in EXACT if _text(r[f]) != b[f])
            return f"{' '.join(_id(b))} {bad}: want {b[bad]!r} got {_text(r[bad])!r}"
        left.remove(match)
    return None


def interleave_garbage(rng: random.Random, records: list[Record], share: float) -> list[Record]:
    """Garbage frames between the real ones, stamped with the previous frame's time."""
    out: list[Record] = []
    for rec in records:
        out.append(rec)
        while rng.random() < share:
            g = garbage_frame(rng)
            out.append((rec[0], rec[1], g, len(g)))
    return out


def one_byte_changed(rng: random.Random, frame: bytes) -> bytes:
    """frame with exactly one byte of its IP packet (after the Ethernet header) changed:
    caught by the IPv4 header or the TCP/UDP checksum (a one-byte change always alters the
    ones'-complement sum), or it only touches fields no checksum covers and no key uses
    (IPv6 traffic class / flow label), or it changes the id (an extra row with another id).
    Left alone: the TCP sequence number, data offset and flags (Zeek's reuse check,
    zeek-conn.md §2.8, runs before the checksum, so a SYN with another seq rightly starts a
    new connection under the same id), and the ports and IPv6 addresses (no IP checksum:
    the copy could land on another real connection's id before it starts, which Zeek would
    split too). Otherwise Zeek ignores such a duplicate (bad checksum) or logs it under an
    id no baseline row has: never a second row of a baseline connection."""
    b = bytearray(frame)
    if len(b) <= 14:
        return frame
    l4_at = -1
    protected: set[int] = set()
    if b[12:14] == b"\x08\x00" and len(b) > 24:
        l4_at = 14 + (b[14] & 0x0F) * 4
        proto = b[23]
    elif b[12:14] == b"\x86\xdd" and len(b) > 21:
        l4_at = 14 + 40
        proto = b[20]
        protected.update(range(14 + 8, 14 + 40))
    if l4_at > 0 and proto in (6, 17):
        protected.update(l4_at + k for k in (0, 1, 2, 3))
        if proto == 6:
            protected.update(l4_at + k for k in (4, 5, 6, 7, 12, 13))
    if len(protected) >= len(b) - 14:
        return frame
    at = rng.randrange(14, len(b))
    while at in protected:
        at = rng.randrange(14, len(b))
    b[at] ^= rng.randrange(1, 256)
    return bytes(b)


def duplicate_mutated(rng: random.Random, records: list[Record],
                      mutator: Callable[[random.Random, bytes], bytes] | None = None
                      ) -> list[Record]:
    """Every frame followed by a mutated copy of itself at the same time (wire length kept)."""
    out: list[Record] = []
    for rec in records:
        out.append(rec)
        m = (mutator or one_byte_changed)(rng, rec[2])
        out.append((rec[0], rec[1], m, max(len(m), rec[3])))
    return out


# --------------------------------------------------------------------------------------------
# the bench


def _seeds() -> list[bytes]:
    seeds: list[bytes] = []
    for name in ENGINE_TRACES:
        d = CORPUS / name
        if d.is_dir():
            seeds += [r[2] for r in read_pcap(d / "trace.pcap")[1][:60]]
    if not seeds:   # corpus absent: a few hand-made frames
        seeds = [b"\0" * 12 + b"\x08\x00" + bytes.fromhex(
            "450000280001000040060000" "0a0000010a000002" "00010002000003e8000007d0" "50020000"
            "00000000")]
    return seeds


def _save(save: Path | None, target: str, data: bytes, why: str) -> None:
    print(f"ESCAPE {target}: {why.splitlines()[0]}", flush=True)
    if save is None:
        return
    save.mkdir(parents=True, exist_ok=True)
    ext = "bin" if target == "decode" else "pcap"
    (save / f"{target}-{hashlib.sha1(data).hexdigest()[:12]}.{ext}").write_bytes(data)


def run(inputs: int, seed: int, save: Path | None, out: Callable[[str], None] = print) -> int:
    """Returns the number of escapes."""
    rng = random.Random(seed)
    seeds = _seeds()
    escapes = 0
    tmp = Path(tempfile.mkdtemp(prefix="shuntd-fuzz-"))
    traces = [(CORPUS / n, *read_pcap(CORPUS / n / "trace.pcap"), read_baseline(CORPUS / n))
              for n in ENGINE_TRACES if (CORPUS / n).is_dir()]
    try:
        # decode (+ defrag): 88% of the inputs
        n = int(inputs * 0.88)
        t0 = time.perf_counter()
        defrag = Defragmenter(ignore_checksums=True, max_pending=64, timeout=1.0)
        for i in range(n):
            if i % 8 == 0:
                frame = rng.randbytes(rng.randrange(80))
                linktype = rng.choice(LINKTYPES)
            else:
                frame = mutate(rng, rng.choice(seeds))
                linktype = 1 if i % 8 > 1 else rng.choice(LINKTYPES)
            why = check_decode(frame, linktype, len(frame) + (i % 3) * 7, defrag)
            if why:
                escapes += 1
                _save(save, "decode", frame, why)
        dt = time.perf_counter() - t0
        out(f"decode  {n:9d} inputs {n / dt:10.0f}/s  escapes so far {escapes}")
        done = n

        # trace reader: 2% (a file per input: slow)
        n = inputs // 50
        t0 = time.perf_counter()
        blobs = [write_pcap(h, recs[:8]) for _d, h, recs, _b in traces] or [
            struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
        path = tmp / "t.pcap"
        for _ in range(n):
            data = mutate(rng, rng.choice(blobs))
            why = check_trace(data, path)
            if why:
                escapes += 1
                _save(save, "trace", data, why)
        dt = time.perf_counter() - t0
        out(f"trace   {n:9d} inputs {n / dt:10.0f}/s  escapes so far {escapes}")
        done += n

        # whole engine: the rest, counted in frames fed
        n = inputs - done
        t0 = time.perf_counter()
        fed = runs = 0
        while fed < n and traces:
            _d, header, recs, baseline = traces[runs % len(traces)]
            if runs % 2 == 0:
                mixed = interleave_garbage(rng, recs, 0.5)
                exact = True
            elif runs % 4 == 1:
                mixed = duplicate_mutated(rng, recs)
                exact = False
            else:   # anything goes (RST/SYN/seq changes may split a connection, as in
                    # Zeek): only no exception
                mixed = duplicate_mutated(rng, recs, mutate)
                exact = None
            data = write_pcap(header, mixed)
            rows, why = engine_rows(data, path)
            if why is None and exact is not None:
                why = diff_against_baseline(rows, baseline, exact)
            if why:
                escapes += 1
                _save(save, "engine", data, why)
            fed += len(mixed)
            runs += 1
        dt = time.perf_counter() - t0
        out(f"engine  {fed:9d} inputs {fed / max(dt, 1e-9):10.0f}/s  ({runs} traces) "
            f"escapes so far {escapes}")
        done += fed
        out(f"fuzz: {done} inputs, {escapes} escapes, seed {seed}")
    finally:
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    return escapes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--save", type=Path, default=REGRESSIONS,
                   help="where escaping inputs go (tests/fuzz_regressions)")
    args = p.parse_args(argv)
    if args.inputs < 10:
        print("fuzz: --inputs must be >= 10", file=sys.stderr)
        return 2
    return 1 if run(args.inputs, args.seed, args.save) else 0


if __name__ == "__main__":
    sys.exit(main())
