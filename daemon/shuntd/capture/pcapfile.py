"""pcap / pcapng file reader: yields `(ts, frame, wire_len, linktype)` per packet.

Timestamps are made the way Zeek sees them through libpcap's default microsecond precision:
nanosecond (or any finer) resolutions are truncated to whole microseconds, then
`ts = sec + usec / 1e6` (spec zeek-conn.md §0.3.1), so our doubles equal Zeek's bit for bit.

The file is read in large chunks and frames are zero-copy memoryviews into them. A truncated
or corrupt file raises `TraceError` naming the packet index, only after every packet before
it has been yielded.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BYTE_ORDER_MAGIC = 0x1A2B3C4D

_BLOCK_IDB = 0x00000001
_BLOCK_PB = 0x00000002      # obsolete Packet Block
_BLOCK_SPB = 0x00000003
_BLOCK_EPB = 0x00000006

_OPT_IF_TSRESOL = 9
_OPT_IF_TSOFFSET = 14

# Largest frame we accept: libpcap's maximum snapshot length is 262144; allow headroom for
# odd writers but refuse absurd lengths from corrupt headers instead of allocating them.
MAX_FRAME = 16 * 1024 * 1024
MAX_SNAPLEN = 262144
MAX_BLOCK = 64 * 1024 * 1024
_CHUNK = 1 << 20

Record = tuple[float, memoryview, int, int]


class TraceError(Exception):
    """The trace file is not a readable pcap/pcapng, or is truncated/corrupt at a packet."""


class _ChunkReader:
    """Sequential reader over a binary file returning (buffer, offset) windows of n bytes."""

    __slots__ = ("_f", "_buf", "_pos")

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._buf = b""
        self._pos = 0

    def take(self, n: int) -> tuple[bytes, int] | None:
        """Return (buf, off) with buf[off:off+n] the next n bytes, or None if fewer remain."""
        pos = self._pos
        if len(self._buf) - pos < n:
            rest = self._buf[pos:]
            more = self._f.read(max(n - len(rest), _CHUNK))
            self._buf = rest + more
            pos = 0
            if len(self._buf) < n:
                self._pos = 0
                return None
        self._pos = pos + n
        return self._buf, pos

    def leftover(self) -> int:
        """Bytes that were read but not consumed (only meaningful after take() returned None)."""
        return len(self._buf) - self._pos


class TraceReader:
    """Iterates the packets of one trace file; use as an iterator or a context manager."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            self._f: BinaryIO = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise TraceError(f"{self.path}: cannot open trace: {exc.strerror or exc}") from None
        self._reader = _ChunkReader(self._f)
        head = self._reader.take(4)
        if head is None:
            self.close()
            raise TraceError(f"{self.path}: not a pcap/pcapng file (shorter than 4 bytes)")
        buf, off = head
        magic_le = struct.unpack_from("<I", buf, off)[0]
        magic_be = struct.unpack_from(">I", buf, off)[0]
        self.format: str
        self.linktype: int = -1
        self.snaplen: int = 0
        self.nanosecond = False
        self.count = 0
        if magic_le in (PCAP_MAGIC_US, PCAP_MAGIC_NS) or magic_be in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
            self.format = "pcap"
            self._endian = "<" if magic_le in (PCAP_MAGIC_US, PCAP_MAGIC_NS) else ">"
            self.nanosecond = (magic_le if self._endian == "<" else magic_be) == PCAP_MAGIC_NS
            hdr = self._reader.take(20)
            if hdr is None:
                self.close()
                raise TraceError(f"{self.path}: truncated pcap file header")
            buf, off = hdr
            _vmaj, _vmin, _zone, _sigfigs, snaplen, network = struct.unpack_from(
                self._endian + "HHiIII", buf, off
            )
            self.snaplen = snaplen
            self.linktype = network & 0x03FFFFFF  # upper bits: FCS length (libpcap LT_LINKTYPE)
            self._iter: Iterator[Record] = self._pcap_records()
        elif magic_le == PCAPNG_SHB:
            self.format = "pcapng"
            self._endian = "<"
            self._iter = self._pcapng_records()
        else:
            self.close()
            raise TraceError(f"{self.path}: not a pcap/pcapng file (magic 0x{magic_be:08x})")

    # -- public API -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Record]:
        return self._iter

    def __next__(self) -> Record:
        return next(self._iter)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- pcap --------------------------------------------------------------------------------
    def _pcap_records(self) -> Iterator[Record]:
        rec = struct.Struct(self._endian + "IIII")
        take = self._reader.take
        linktype = self.linktype
        nanos = self.nanosecond
        # Like libpcap: a zero/absurd header snaplen means "the maximum".
        snap = self.snaplen if 0 < self.snaplen <= MAX_SNAPLEN else MAX_SNAPLEN
        index = 0
        try:
            while True:
                got = take(16)
                if got is None:
                    if self._reader.leftover():
                        raise TraceError(
                            f"{self.path}: truncated record header at packet {index}"
                        )
                    return
                buf, off = got
                sec, frac, caplen, wire_len = rec.unpack_from(buf, off)
                if caplen > MAX_FRAME:
                    raise TraceError(
                        f"{self.path}: corrupt record at packet {index}: "
                        f"captured length {caplen} exceeds {MAX_FRAME}"
                    )
                got = take(caplen)
                if got is None:
                    raise TraceError(
                        f"{self.path}: truncated packet {index}: "
                        f"{caplen} captured bytes announced, file ends first"
                    )
                buf, off = got
                if caplen > snap:
                    caplen = snap   # libpcap keeps only the file's snapshot length
                if nanos:
                    frac //= 1000
                elif frac >= 1000000:
                    # Like libpcap: an out-of-range usec field is corrupt.
                    raise TraceError(
                        f"{self.path}: corrupt record at packet {index}: usec {frac} >= 1e6"
                    )
                self.count = index + 1
                yield sec + frac / 1e6, memoryview(buf)[off:off + caplen], wire_len, linktype
                index += 1
        finally:
            self.close()

    # -- pcapng ------------------------------------------------------------------------------
    def _pcapng_records(self) -> Iterator[Record]:
        take = self._reader.take
        # Interfaces of the current section: (linktype, snaplen, units_per_sec, offset_sec).
        ifaces: list[tuple[int, int, int, int]] = []
        e = "<"
        first = True
        index = 0
        try:
            while True:
                if first:
                    # The 4-byte block type of the SHB was consumed by the magic probe.
                    btype = PCAPNG_SHB
                    got = take(8)
                    if got is None:
                        raise TraceError(f"{self.path}: truncated pcapng section header (packet 0)")
                    buf, off = got
                    first = False
                    blen_raw = buf[off:off + 4]
                    bom = buf[off + 4:off + 8]
                else:
                    got = take(8)
                    if got is None:
                        if self._reader.leftover():
                            raise TraceError(
                                f"{self.path}: truncated block header before packet {index}"
                            )
                        return
                    buf, off = got
                    btype = struct.unpack_from(e + "I", buf, off)[0]
                    if btype == PCAPNG_SHB:
                        got = take(4)
                        if got is None:
                            raise TraceError(
                                f"{self.path}: truncated section header before packet {index}"
                            )
                        blen_raw = buf[off + 4:off + 8]
                        bom = got[0][got[1]:got[1] + 4]
                    else:
                        blen_raw = buf[off + 4:off + 8]
                        bom = b""
                if btype == PCAPNG_SHB:
                    if struct.unpack("<I", bom)[0] == PCAPNG_BYTE_ORDER_MAGIC:
                        e = "<"
                    elif struct.unpack(">I", bom)[0] == PCAPNG_BYTE_ORDER_MAGIC:
                        e = ">"
                    else:
                        raise TraceError(
                            f"{self.path}: corrupt pcapng section header before packet {index}"
                        )
                    ifaces = []
                    self._endian = e
                    blen = struct.unpack(e + "I", blen_raw)[0]
                    if blen < 28 or blen % 4 or blen > MAX_BLOCK:
                        raise TraceError(
                            f"{self.path}: corrupt pcapng section header length {blen} "
                            f"before packet {index}"
                        )
                    # Type, length and byte-order magic are read; the rest includes the trailer.
                    if take(blen - 12) is None:
                        raise TraceError(
                            f"{self.path}: truncated pcapng section header before packet {index}"
                        )
                    continue

                blen = struct.unpack(e + "I", blen_raw)[0]
                if blen < 12 or blen % 4 or blen > MAX_BLOCK:
                    raise TraceError(
                        f"{self.path}: corrupt pcapng block (type 0x{btype:08x}, "
                        f"length {blen}) at packet {index}"
                    )
                got = take(blen - 8)
                if got is None:
                    raise TraceError(f"{self.path}: truncated pcapng block at packet {index}")
                buf, off = got
                body_end = off + blen - 12
                if btype == _BLOCK_EPB or btype == _BLOCK_PB:
                    if blen < 32:
                        raise TraceError(f"{self.path}: corrupt packet block at packet {index}")
                    if btype == _BLOCK_EPB:
                        if_id, ts_hi, ts_lo, caplen, wire_len = struct.unpack_from(
                            e + "IIIII", buf, off
                        )
                    else:
                        if_id, _drops, ts_hi, ts_lo, caplen, wire_len = struct.unpack_from(
                            e + "HHIIII", buf, off
                        )
                    data_at = off + 20
                    if data_at + caplen > body_end:
                        raise TraceError(
                            f"{self.path}: corrupt packet block at packet {index}: captured "
                            f"length {caplen} exceeds the block"
                        )
                    if if_id >= len(ifaces):
                        raise TraceError(
                            f"{self.path}: packet {index} names undefined interface {if_id}"
                        )
                    linktype, _snap, units, offset_sec = ifaces[if_id]
                    stamp = (ts_hi << 32) | ts_lo
                    sec, frac = divmod(stamp, units)
                    usec = frac * 1000000 // units
                    self.count = index + 1
                    yield (
                        (sec + offset_sec) + usec / 1e6,
                        memoryview(buf)[data_at:data_at + caplen],
                        wire_len,
                        linktype,
                    )
                    index += 1
                elif btype == _BLOCK_SPB:
                    if not ifaces:
                        raise TraceError(
                            f"{self.path}: packet {index} precedes any interface description"
                        )
                    linktype, snap, _units, _offset = ifaces[0]
                    wire_len = struct.unpack_from(e + "I", buf, off)[0]
                    caplen = min(wire_len, body_end - off - 4)
                    if snap:
                        caplen = min(caplen, snap)
                    self.count = index + 1
                    yield 0.0, memoryview(buf)[off + 4:off + 4 + caplen], wire_len, linktype
                    index += 1
                elif btype == _BLOCK_IDB:
                    if blen < 20:
                        raise TraceError(
                            f"{self.path}: corrupt interface block before packet {index}"
                        )
                    linktype, _res, snap = struct.unpack_from(e + "HHI", buf, off)
                    units, offset_sec = self._idb_options(buf, off + 8, body_end, e, index)
                    ifaces.append((linktype, snap, units, offset_sec))
                    if self.linktype < 0:
                        self.linktype = linktype
                        self.snaplen = snap
                # Every other block (NRB, ISB, DSB, custom, ...) is skipped.
        finally:
            self.close()

    def _idb_options(self, buf: bytes, pos: int, end: int, e: str, index: int) -> tuple[int, int]:
        """Units per second (if_tsresol, default 10**6) and if_tsoffset seconds of an IDB."""
        units = 1000000
        offset_sec = 0
        while pos + 4 <= end:
            code, length = struct.unpack_from(e + "HH", buf, pos)
            pos += 4
            if code == 0:
                break
            if pos + length > end:
                raise TraceError(f"{self.path}: corrupt interface options before packet {index}")
            if code == _OPT_IF_TSRESOL and length >= 1:
                v = buf[pos]
                exp = v & 0x7F
                if exp > 60:
                    raise TraceError(
                        f"{self.path}: unsupported if_tsresol 0x{v:02x} before packet {index}"
                    )
                units = 2**exp if v & 0x80 else 10**exp
            elif code == _OPT_IF_TSOFFSET and length >= 8:
                offset_sec = struct.unpack_from(e + "q", buf, pos)[0]
            pos += (length + 3) & ~3
        return units, offset_sec


def open_trace(path: str | Path) -> TraceReader:
    """Open a pcap or pcapng trace; raises `TraceError` with a clear message if it cannot."""
    return TraceReader(path)
