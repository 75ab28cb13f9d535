"""IPv4/IPv6 fragment reassembly, the way Zeek feeds connection tracking.

Zeek processes a fragmented datagram once, as ONE packet at the time of the fragment that
completes it, whose IP total length is the reassembled length (spec zeek-conn.md §0.3).
Fragments that do not (yet) complete a datagram never reach the connection layer.

Usage: for every decoded `Packet`, `pkt = defrag.add(pkt)`: non-fragments come straight back;
fragments give None until one completes its datagram, which then comes back decoded as one
`Packet` (time and VLANs of the completing fragment).

Rules follow Zeek's `FragReassembler` (src/Frag.cc): datagrams are keyed by (src, dst, id);
the IP header kept is the one of the first fragment *received* (IPv6: the unfragmentable part,
without the fragment header; the transport protocol is the offset-0 fragment's next header);
overlapping bytes keep the data that arrived first; the size comes from the last fragment
(MF=0) but grows if other fragments reach beyond it; a datagram completes when its bytes are
contiguous from offset 0 to that size.
"""

from __future__ import annotations

from collections import OrderedDict

from shuntd.packet import LINKTYPE_RAW, Packet, decode

MAX_DATAGRAM = 65535 + 40  # largest IP datagram (IPv6 payload 65535 + fixed header)

_Key = tuple[bytes, bytes, int]


class _Pending:
    """Fragments of one datagram collected so far."""

    __slots__ = ("header", "nh_at", "proto", "data", "covered", "size", "first_ts")

    def __init__(self, pkt: Packet) -> None:
        l3 = pkt.l3
        if pkt.ip_version == 4:
            self.header = bytes(l3[:pkt.ip_hdr_len])
        else:
            self.header = bytes(l3[:pkt.ip_hdr_len - 8])   # minus the fragment header
        self.nh_at = pkt.frag_nh_at
        self.proto = pkt.proto
        self.data = bytearray()
        self.covered: list[list[int]] = []   # sorted, merged [start, end) ranges received
        self.size = 0                        # datagram payload size; 0 = not known yet
        self.first_ts = pkt.ts

    def insert(self, start: int, chunk: memoryview) -> None:
        """Copy the bytes of [start, start+len) not received before (first arrival wins)."""
        end = start + len(chunk)
        data = self.data
        if len(data) < end:
            data.extend(bytes(end - len(data)))
        pos = start
        for s, e in self.covered:
            if e <= pos:
                continue
            if s >= end:
                break
            if s > pos:
                data[pos:s] = chunk[pos - start:s - start]
            pos = max(pos, e)
            if pos >= end:
                break
        if pos < end:
            data[pos:end] = chunk[pos - start:]
        self._cover(start, end)

    def _cover(self, start: int, end: int) -> None:
        ranges = sorted([*self.covered, [start, end]])
        merged: list[list[int]] = [ranges[0]]
        for s, e in ranges[1:]:
            if s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        self.covered = merged

    def complete_size(self) -> int:
        """Payload size if the datagram can be analysed now, else 0 (Zeek's BlockInserted):
        bytes contiguous from 0 up to at least the expected size; a contiguous run longer
        than that becomes the size."""
        if not self.size or not self.covered or self.covered[0][0] != 0:
            return 0
        upper = self.covered[0][1]
        return upper if upper >= self.size else 0


class Defragmenter:
    """Reassembles fragments; bounded by `max_pending` datagrams, `max_bytes` and `timeout`.

    `timeout` (seconds of network time, None = never, like Zeek's default `frag_timeout` 0)
    drops datagrams whose first fragment is older than that when `expire(now)` is called.
    """

    def __init__(
        self,
        ignore_checksums: bool = False,
        timeout: float | None = None,
        max_pending: int = 10000,
        max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.ignore_checksums = ignore_checksums
        self.timeout = timeout
        self.max_pending = max_pending
        self.max_bytes = max_bytes
        self.dropped = 0     # datagrams abandoned (limits, timeout, malformed)
        self._pending: OrderedDict[_Key, _Pending] = OrderedDict()
        self._bytes = 0      # buffered fragment data, for the memory bound

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, pkt: Packet) -> Packet | None:
        """Take one packet; a fragment returns the reassembled packet when it completes one."""
        if not pkt.frag:
            return pkt
        data_at = pkt.ip_hdr_len
        length = pkt.ip_len - data_at
        chunk = pkt.l3[data_at:]
        start = pkt.frag_offset
        end = start + length
        if len(chunk) < length or end > MAX_DATAGRAM:
            # Snaplen-truncated or oversized fragment: its datagram cannot be rebuilt.
            self.dropped += 1
            return None
        key = (pkt.src, pkt.dst, pkt.frag_id)
        pend = self._pending.get(key)
        if pend is None:
            while self._pending and (
                len(self._pending) >= self.max_pending or self._bytes >= self.max_bytes
            ):
                self._drop(next(iter(self._pending)))
            pend = _Pending(pkt)
            self._pending[key] = pend
        if start == 0 and pkt.ip_version == 6:
            pend.proto = pkt.proto        # the offset-0 fragment's next header wins
        if not pkt.frag_more:
            pend.size = end if not pend.size else max(pend.size, end)
        elif pend.size and end > pend.size:
            pend.size = end
        grown = max(0, end - len(pend.data))
        pend.insert(start, chunk[:length])
        self._bytes += grown
        size = pend.complete_size()
        if not size:
            return None
        del self._pending[key]
        self._bytes -= len(pend.data)
        return self._rebuild(pend, size, pkt)

    def expire(self, now: float) -> int:
        """Drop datagrams older than `timeout`; returns how many were dropped."""
        if self.timeout is None or self.timeout <= 0:
            return 0
        n = 0
        limit = now - self.timeout
        while self._pending:
            key, pend = next(iter(self._pending.items()))
            if pend.first_ts > limit:
                break
            self._drop(key)
            n += 1
        return n

    def _drop(self, key: _Key) -> None:
        pend = self._pending.pop(key)
        self._bytes -= len(pend.data)
        self.dropped += 1

    def _rebuild(self, pend: _Pending, size: int, last: Packet) -> Packet | None:
        header = bytearray(pend.header)
        payload = bytes(pend.data[:size])
        if last.ip_version == 4:
            total_len = len(header) + size
            if total_len > 65535:
                self.dropped += 1
                return None
            header[2:4] = total_len.to_bytes(2, "big")
            header[6:8] = b"\x00\x00"               # no MF, offset 0
            header[10:12] = b"\x00\x00"
            header[10:12] = _ip_checksum(header).to_bytes(2, "big")
        else:
            if pend.nh_at >= len(header):
                self.dropped += 1
                return None
            header[pend.nh_at] = pend.proto
            plen = len(header) - 40 + size
            if plen > 65535:
                self.dropped += 1
                return None
            header[4:6] = plen.to_bytes(2, "big")
        datagram = bytes(header) + payload
        pkt = decode(datagram, LINKTYPE_RAW, last.ts, len(datagram), self.ignore_checksums)
        if pkt is None:
            return None
        pkt.vlan = last.vlan
        pkt.inner_vlan = last.inner_vlan
        return pkt


def _ip_checksum(header: bytes | bytearray) -> int:
    return (~(int.from_bytes(header, "big") % 0xFFFF)) & 0xFFFF
