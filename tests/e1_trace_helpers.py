"""Hand-rolled pcap / pcapng writers for tests (independent of the reader under test).

Owned by E1. Records are `(sec, frac, frame, wire_len)` with `frac` in the file's units.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "zeek"


def corpus_traces() -> list[Path]:
    return sorted(CORPUS.glob("*/*/trace.pcap*")) if CORPUS.is_dir() else []


def pcap_bytes(
    records: Iterable[tuple[int, int, bytes, int]],
    linktype: int,
    nanos: bool = False,
    endian: str = "<",
    snaplen: int = 65535,
) -> bytes:
    magic = 0xA1B23C4D if nanos else 0xA1B2C3D4
    out = [struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype)]
    for sec, frac, frame, wire_len in records:
        out.append(struct.pack(endian + "IIII", sec, frac, len(frame), wire_len))
        out.append(frame)
    return b"".join(out)


def _pad4(b: bytes) -> bytes:
    return b + b"\x00" * (-len(b) % 4)


def ng_block(btype: int, body: bytes, endian: str = "<") -> bytes:
    body = _pad4(body)
    n = len(body) + 12
    return struct.pack(endian + "II", btype, n) + body + struct.pack(endian + "I", n)


def ng_shb(endian: str = "<") -> bytes:
    return ng_block(0x0A0D0D0A, struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1), endian)


def ng_idb(linktype: int, tsresol: int | None = None, snaplen: int = 0,
           tsoffset: int | None = None, endian: str = "<") -> bytes:
    body = struct.pack(endian + "HHI", linktype, 0, snaplen)
    if tsresol is not None:
        body += struct.pack(endian + "HH", 9, 1) + _pad4(bytes([tsresol]))
    if tsoffset is not None:
        body += struct.pack(endian + "HHq", 14, 8, tsoffset)
    if tsresol is not None or tsoffset is not None:
        body += struct.pack(endian + "HH", 0, 0)
    return ng_block(1, body, endian)


def ng_epb(if_id: int, stamp: int, frame: bytes, wire_len: int, endian: str = "<") -> bytes:
    body = struct.pack(endian + "IIIII", if_id, stamp >> 32, stamp & 0xFFFFFFFF, len(frame),
                       wire_len) + frame
    return ng_block(6, body, endian)


def ng_spb(frame: bytes, wire_len: int, endian: str = "<") -> bytes:
    return ng_block(3, struct.pack(endian + "I", wire_len) + frame, endian)
