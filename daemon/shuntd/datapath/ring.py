"""RingPoller: the `events` ring buffer as typed Python objects.

The program reports every FIN and RST of a shunted TCP flow (and the first packet after a
lease lapsed) while still dropping the packet, so the connection learns its real end without the
analyser ever seeing a sequence gap; and each flow entry it made itself (an early shunt).
Events are copied out of the ring inside the callback: the kernel may reuse the slot as soon as
the callback returns.

Every capture batch polls, and almost every poll finds nothing: the ring's consumer and
producer positions (its first two pages, mapped read-only) tell that without a syscall. Events
are plain (not frozen) dataclasses, decoded with one `struct` call: a frozen dataclass costs
a second per event. Treat them as read-only.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from shuntd.datapath.program import (
    ENTRY_FLOW,
    LAYOUT_VERSION,
    EventType,
    XdpProgram,
    key_endpoints,
    layout_struct,
    monotonic_ns,
)

# struct shunt_event in offset order; the key as its bytes.
_EVENT_FIELDS = ("ts_ns", "version", "type", "side", "tcp_flags", "entry", "tcp_letters",
                 "ip_len", "payload_len", "seq", "ack", "ifindex", "event_seq", "key")
_TCP_FIN_RST = (EventType.TCP_FIN, EventType.TCP_RST)
_POS = struct.Struct("=Q")

TCP_FIN = 0x01
TCP_RST = 0x04


@dataclass(slots=True)
class TcpCloseEvent:
    """A FIN or RST on a shunted TCP flow (the packet itself was dropped and counted)."""

    rst: bool  # False: FIN
    key: Any  # canonical FlowKey (ctypes, a copy)
    key_bytes: bytes  # bytes(key): hashable, equals bytes(ShuntTable.flow_key(...)[0])
    side: int  # sender's side in the key (1 or 2)
    tcp_flags: int
    seq: int
    ack: int
    ip_len: int
    payload_len: int
    ts_ns: int  # CLOCK_MONOTONIC
    ts: float  # wall clock, Unix seconds
    ifindex: int
    event_seq: int  # per entry, 1 for its first event
    via_pair: bool  # the entry that matched was an IP pair
    tcp_letters: int = 0  # flow entry: history letters dropped before it (shuntd.h)
    # Set by the consumer (ShuntManager.apply: how many events it had been given with this
    # one), not part of the event.
    received: int = field(default=0, compare=False)

    @property
    def fin(self) -> bool:
        return bool(self.tcp_flags & TCP_FIN)


@dataclass(slots=True)
class LeaseExpiredEvent:
    """First packet after an entry's lease ran out: XDP passes it (fail open)."""

    key: Any  # FlowKey; for a pair entry the pair's addresses, ports and proto 0
    key_bytes: bytes
    is_pair: bool
    side: int
    ts_ns: int
    ts: float
    ifindex: int
    event_seq: int


@dataclass(slots=True)
class EarlyEvent:
    """XDP made a flow entry itself (early shunt, shuntd.h): the packet on which the TLS
    handshake completed was passed (the analyser sees it), every later one is dropped."""

    key: Any  # FlowKey of the new entry
    key_bytes: bytes
    side: int  # sender's side of the packet that completed the handshake
    seq: int
    ack: int
    ts_ns: int
    ts: float
    ifindex: int


ShuntEventRecord = TcpCloseEvent | LeaseExpiredEvent | EarlyEvent


class RingPoller:
    """Poll the program's ring buffer; ``poll()`` returns the events that arrived.

    Create one per program: bcc can register a ring buffer's callback only once.
    """

    def __init__(self, prog: XdpProgram):
        self.prog = prog
        self._pending: list[ShuntEventRecord] = []
        self.unknown = 0  # records of an unknown type or layout version (skipped)
        self._event = layout_struct(prog.ShuntEvent, _EVENT_FIELDS).unpack_from
        self._size = ctypes.sizeof(prog.ShuntEvent)
        self._key_type = prog.FlowKey
        self._offset = 0.0  # wall clock minus CLOCK_MONOTONIC, taken at each poll
        self._consumer: mmap.mmap | None = None
        self._producer: mmap.mmap | None = None
        try:
            fd = prog.events.map_fd
            self._consumer = mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ, 0)
            self._producer = mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ,
                                       offset=mmap.PAGESIZE)
        except (OSError, ValueError, AttributeError):
            self._consumer = self._producer = None  # no cheap check: always poll
        prog.events.open_ring_buffer(self._on_record)

    def _on_record(self, _ctx: Any, data: Any, size: int) -> int:
        event = self._decode(ctypes.string_at(data, size), self._offset)
        if event is None:
            self.unknown += 1
        else:
            self._pending.append(event)
        return 0

    def decode(self, raw: bytes) -> ShuntEventRecord | None:
        """One ring record -> typed event; None for a type or version we do not know."""
        return self._decode(raw, time.time() - monotonic_ns() / 1e9)

    def _decode(self, raw: bytes, offset: float) -> ShuntEventRecord | None:
        if len(raw) < self._size:
            raise ValueError(f"ring record of {len(raw)} bytes, expected {self._size}")
        (ts_ns, version, etype, side, tcp_flags, entry, letters, ip_len, payload_len, seq, ack,
         ifindex, event_seq, key_bytes) = self._event(raw)
        if version != LAYOUT_VERSION:
            return None
        key = self._key_type.from_buffer_copy(key_bytes)
        ts = ts_ns / 1e9 + offset  # map_time_to_wall(ts_ns)
        if etype in _TCP_FIN_RST:
            return TcpCloseEvent(etype == EventType.TCP_RST, key, key_bytes, side, tcp_flags,
                                 seq, ack, ip_len, payload_len, ts_ns, ts, ifindex, event_seq,
                                 entry != ENTRY_FLOW, letters)
        if etype == EventType.LEASE_EXPIRED:
            return LeaseExpiredEvent(key, key_bytes, entry != ENTRY_FLOW, side, ts_ns, ts,
                                     ifindex, event_seq)
        if etype == EventType.EARLY:
            return EarlyEvent(key, key_bytes, side, seq, ack, ts_ns, ts, ifindex)
        return None

    def ready(self) -> bool:
        """Whether the ring may hold records (True when that cannot be told cheaply)."""
        consumer, producer = self._consumer, self._producer
        if consumer is None or producer is None:
            return True
        return _POS.unpack_from(producer)[0] != _POS.unpack_from(consumer)[0]

    def poll(self, timeout_ms: int = 0) -> list[ShuntEventRecord]:
        """Wait up to ``timeout_ms`` (-1: forever) for records; return all that are ready."""
        if timeout_ms == 0 and self._consumer is not None:
            if not self.ready():
                return []
            self._offset = time.time() - monotonic_ns() / 1e9
            self.prog.bpf.ring_buffer_consume()  # records are there: no epoll_wait needed
        else:
            self._offset = time.time() - monotonic_ns() / 1e9
            self.prog.bpf.ring_buffer_poll(int(timeout_ms))
        out, self._pending = self._pending, []
        return out

    def close(self) -> None:
        """Unmap the positions (the ring itself belongs to the program)."""
        for m in (self._consumer, self._producer):
            if m is not None:
                m.close()
        self._consumer = self._producer = None

    @staticmethod
    def endpoints(event: ShuntEventRecord) -> tuple[Any, int, Any, int]:
        """(addr1, port1, addr2, port2) of the event's key, as ipaddress objects."""
        return key_endpoints(event.key)
