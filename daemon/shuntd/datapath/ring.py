"""RingPoller: the `events` ring buffer as typed Python objects.

The program reports every FIN and RST of a shunted TCP flow (and the first packet after a
lease lapsed) while still dropping the packet, so the connection learns its real end without the
analyser ever seeing a sequence gap. Events are copied out of the ring inside the callback: the
kernel may reuse the slot as soon as the callback returns.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from shuntd.datapath.program import (
    ENTRY_FLOW,
    LAYOUT_VERSION,
    EventType,
    XdpProgram,
    key_endpoints,
    map_time_to_wall,
)

TCP_FIN = 0x01
TCP_RST = 0x04


@dataclass(frozen=True, slots=True)
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

    @property
    def fin(self) -> bool:
        return bool(self.tcp_flags & TCP_FIN)


@dataclass(frozen=True, slots=True)
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


ShuntEventRecord = TcpCloseEvent | LeaseExpiredEvent


class RingPoller:
    """Poll the program's ring buffer; ``poll()`` returns the events that arrived.

    Create one per program: bcc can register a ring buffer's callback only once.
    """

    def __init__(self, prog: XdpProgram):
        self.prog = prog
        self._pending: list[ShuntEventRecord] = []
        self.unknown = 0  # records of an unknown type or layout version (skipped)
        prog.events.open_ring_buffer(self._on_record)

    def _on_record(self, _ctx: Any, data: Any, size: int) -> int:
        raw = ctypes.string_at(data, size)
        event = self.decode(raw)
        if event is None:
            self.unknown += 1
        else:
            self._pending.append(event)
        return 0

    def decode(self, raw: bytes) -> ShuntEventRecord | None:
        """One ring record -> typed event; None for a type or version we do not know."""
        e = self.prog.parse_event(raw)
        if e.version != LAYOUT_VERSION:
            return None
        key = type(e.key).from_buffer_copy(e.key)
        ts_ns = int(e.ts_ns)
        common = dict(key=key, key_bytes=bytes(key), side=int(e.side), ts_ns=ts_ns,
                      ts=map_time_to_wall(ts_ns), ifindex=int(e.ifindex),
                      event_seq=int(e.event_seq))
        if e.type in (EventType.TCP_FIN, EventType.TCP_RST):
            return TcpCloseEvent(rst=e.type == EventType.TCP_RST, tcp_flags=int(e.tcp_flags),
                                 seq=int(e.seq), ack=int(e.ack), ip_len=int(e.ip_len),
                                 payload_len=int(e.payload_len),
                                 via_pair=e.entry != ENTRY_FLOW,
                                 tcp_letters=int(e.tcp_letters), **common)
        if e.type == EventType.LEASE_EXPIRED:
            return LeaseExpiredEvent(is_pair=e.entry != ENTRY_FLOW, **common)
        return None

    def poll(self, timeout_ms: int = 0) -> list[ShuntEventRecord]:
        """Wait up to ``timeout_ms`` (-1: forever) for records; return all that are ready."""
        self.prog.bpf.ring_buffer_poll(int(timeout_ms))
        out, self._pending = self._pending, []
        return out

    @staticmethod
    def endpoints(event: ShuntEventRecord) -> tuple[Any, int, Any, int]:
        """(addr1, port1, addr2, port2) of the event's key, as ipaddress objects."""
        return key_endpoints(event.key)
