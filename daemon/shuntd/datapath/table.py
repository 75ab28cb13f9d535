"""ShuntTable: the daemon's only handle on the `flows` and `ip_pairs` maps.

Every write is a defined outcome, never an exception on the hot path: a full map is
``ShuntResult.FULL`` (the flow simply stays visible: fail open) and is counted. Unshunt is an
atomic read-and-delete, so no dropped packet falls between the final read and the delete.

Keys are endpoint-neutral (side 1 / side 2, see bpf/shuntd.h); which side is orig is the
Connection's business. ``flow_key()`` returns the side of the endpoints as given, so the caller
can map the counters once.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from shuntd.datapath import batch, libbpf
from shuntd.datapath.lease import LeaseWriter
from shuntd.datapath.program import (
    CFG_PASS_ALL,
    F_LEASE_EVENT_SENT,
    Address,
    XdpProgram,
    lease_deadline_ns,
    map_time_to_wall,
)

DEFAULT_LEASE_SECONDS = 30.0


class ShuntResult(enum.Enum):
    OK = "ok"  # entry created; packets are dropped from now on
    EXISTS = "exists"  # already shunted (entry untouched)
    FULL = "full"  # map full: not shunted, traffic stays visible
    ERROR = "error"  # any other kernel refusal: not shunted (see ShuntTable.last_error)


@dataclass(frozen=True, slots=True)
class ShuntCounters:
    """What XDP counted for one entry. Side 1/2 as in the key; bytes are IP bytes."""

    pkts1: int
    bytes1: int
    pkts2: int
    bytes2: int
    last_seen_ns: int  # CLOCK_MONOTONIC of the last dropped packet, 0 if none
    lease_expiry_ns: int
    flags: int
    trigger: int
    event_seq: int
    # TCP flow entries (shuntd.h): each side's highest next seq and ack sent, and how often
    # each wrapped since the entry was made; the history letters are in `flags`.
    tcp_next1: int = 0
    tcp_ack1: int = 0
    tcp_next2: int = 0
    tcp_ack2: int = 0
    tcp_wraps: tuple[int, int, int, int] = (0, 0, 0, 0)  # next1, ack1, next2, ack2

    @classmethod
    def from_value(cls, v: Any) -> ShuntCounters:
        return cls(int(v.pkts1), int(v.bytes1), int(v.pkts2), int(v.bytes2),
                   int(v.last_seen_ns), int(v.lease_expiry_ns), int(v.flags),
                   int(v.trigger), int(v.event_seq), int(v.tcp[0].next), int(v.tcp[0].ack),
                   int(v.tcp[1].next), int(v.tcp[1].ack),
                   (int(v.tcp[0].next_wraps), int(v.tcp[0].ack_wraps),
                    int(v.tcp[1].next_wraps), int(v.tcp[1].ack_wraps)))

    @property
    def last_seen(self) -> float | None:
        """Wall-clock time (Unix seconds) of the last dropped packet, None if none."""
        return map_time_to_wall(self.last_seen_ns) if self.last_seen_ns else None

    def side(self, side: int) -> tuple[int, int]:
        """(packets, ip_bytes) sent by side 1 or 2."""
        if side == 1:
            return self.pkts1, self.bytes1
        if side == 2:
            return self.pkts2, self.bytes2
        raise ValueError(f"side must be 1 or 2, not {side!r}")


class _Map:
    """One hash map: fd, types, capacity, a running count of our entries."""

    __slots__ = ("table", "fd", "key_type", "value_type", "capacity", "count", "lease")

    def __init__(self, table: Any):
        self.table = table
        try:
            self.lease: LeaseWriter | None = LeaseWriter(table)
        except OSError:
            self.lease = None  # old kernel (no BPF atomics): renew by rewrite
        self.fd = table.map_fd
        self.key_type = table.Key
        self.value_type = table.Leaf
        self.capacity = int(table.max_entries)
        self.count = sum(1 for _ in batch.iter_items(self.fd, self.key_type, self.value_type))


class ShuntTable:
    """Shunt, unshunt, look up, renew and sweep entries of one loaded program."""

    def __init__(self, prog: XdpProgram, lease_seconds: float = DEFAULT_LEASE_SECONDS):
        if lease_seconds <= 0:
            raise ValueError(f"lease must be positive, got {lease_seconds}")
        self.prog = prog
        self.lease_seconds = lease_seconds
        self._flows = _Map(prog.flows)  # counts adopted (pinned) entries too
        self._pairs = _Map(prog.ip_pairs)
        self.results: dict[ShuntResult, int] = dict.fromkeys(ShuntResult, 0)
        self.last_error: str = ""

    # -- keys ------------------------------------------------------------------------------
    def flow_key(self, src: Address, sport: int, dst: Address, dport: int, proto: int,
                 vlan: int = 0, inner_vlan: int = 0) -> tuple[Any, int]:
        """(canonical key, side of (src, sport))."""
        return self.prog.flow_key(src, sport, dst, dport, proto, vlan, inner_vlan)

    def pair_key(self, a: Address, b: Address, vlan: int = 0,
                 inner_vlan: int = 0) -> tuple[Any, int]:
        return self.prog.pair_key(a, b, vlan, inner_vlan)

    # -- shunt -----------------------------------------------------------------------------
    def shunt_flow(self, src: Address, sport: int, dst: Address, dport: int, proto: int,
                   vlan: int = 0, inner_vlan: int = 0, trigger: int = 0,
                   lease_seconds: float | None = None) -> ShuntResult:
        key, _ = self.flow_key(src, sport, dst, dport, proto, vlan, inner_vlan)
        return self.shunt_key(key, trigger, lease_seconds)

    def shunt_key(self, key: Any, trigger: int = 0, lease_seconds: float | None = None,
                  tcp_start: tuple[int, int, int, int] | None = None) -> ShuntResult:
        """Insert a flow entry built with flow_key(). `tcp_start`: the TCP connection's
        (next1, ack1, next2, ack2) now, from where XDP tracks them (shuntd.h)."""
        return self._insert(self._flows, key, trigger, lease_seconds, tcp_start)

    def shunt_pair(self, a: Address, b: Address, vlan: int = 0, inner_vlan: int = 0,
                   trigger: int = 0, lease_seconds: float | None = None) -> ShuntResult:
        """Drop everything between two addresses, any protocol."""
        key, _ = self.pair_key(a, b, vlan, inner_vlan)
        result = self._insert(self._pairs, key, trigger, lease_seconds)
        if result is ShuntResult.OK:
            self.prog.pair_added(key)  # else XDP never consults ip_pairs for this pair
        return result

    def _insert(self, m: _Map, key: Any, trigger: int, lease_seconds: float | None,
                tcp_start: tuple[int, int, int, int] | None = None) -> ShuntResult:
        value = self.prog.new_value(self._deadline(lease_seconds), trigger)
        if tcp_start is not None:
            value.tcp[0].next, value.tcp[0].ack, value.tcp[1].next, value.tcp[1].ack = tcp_start
        err = libbpf.map_update(m.fd, key, value, libbpf.BPF_NOEXIST)
        if err == 0:
            m.count += 1
            result = ShuntResult.OK
        elif err == errno.EEXIST:
            result = ShuntResult.EXISTS
        elif err == errno.E2BIG:
            result = ShuntResult.FULL
            m.count = max(m.count, m.capacity)
        else:
            result = ShuntResult.ERROR
            self.last_error = f"map update: {errno.errorcode.get(err, err)}"
        self.results[result] += 1
        return result

    # -- unshunt ---------------------------------------------------------------------------
    def unshunt_flow(self, src: Address, sport: int, dst: Address, dport: int, proto: int,
                     vlan: int = 0, inner_vlan: int = 0) -> ShuntCounters | None:
        key, _ = self.flow_key(src, sport, dst, dport, proto, vlan, inner_vlan)
        return self.unshunt_key(key)

    def unshunt_key(self, key: Any) -> ShuntCounters | None:
        """Delete the entry and return its final counters (None if it was not there)."""
        return self._take(self._flows, key)

    def unshunt_pair(self, a: Address, b: Address, vlan: int = 0,
                     inner_vlan: int = 0) -> ShuntCounters | None:
        key, _ = self.pair_key(a, b, vlan, inner_vlan)
        counters = self._take(self._pairs, key)
        if counters is not None:
            self.prog.pair_removed(key)
        return counters

    def _take(self, m: _Map, key: Any) -> ShuntCounters | None:
        value = m.value_type()
        if not libbpf.map_lookup_and_delete(m.fd, key, value):
            return None
        m.count = max(0, m.count - 1)
        return ShuntCounters.from_value(value)

    # -- look up ---------------------------------------------------------------------------
    def lookup_key(self, key: Any) -> ShuntCounters | None:
        return self._get(self._flows, key)

    def lookup_flow(self, src: Address, sport: int, dst: Address, dport: int, proto: int,
                    vlan: int = 0, inner_vlan: int = 0) -> ShuntCounters | None:
        key, _ = self.flow_key(src, sport, dst, dport, proto, vlan, inner_vlan)
        return self._get(self._flows, key)

    def lookup_pair(self, a: Address, b: Address, vlan: int = 0,
                    inner_vlan: int = 0) -> ShuntCounters | None:
        key, _ = self.pair_key(a, b, vlan, inner_vlan)
        return self._get(self._pairs, key)

    @staticmethod
    def _get(m: _Map, key: Any) -> ShuntCounters | None:
        value = m.value_type()
        return ShuntCounters.from_value(value) if libbpf.map_lookup(m.fd, key, value) else None

    # -- leases ----------------------------------------------------------------------------
    def renew_key(self, key: Any, lease_seconds: float | None = None) -> bool:
        """Push a flow entry's lease forward; False if the entry is gone."""
        return self._renew(self._flows, [key], lease_seconds) == 1

    def renew_keys(self, keys: list[Any], lease_seconds: float | None = None) -> int:
        """Renew several flow entries (one deadline for all); returns how many exist."""
        return self._renew(self._flows, keys, lease_seconds)

    def renew_pair_key(self, key: Any, lease_seconds: float | None = None) -> bool:
        return self._renew(self._pairs, [key], lease_seconds) == 1

    def renew_all(self, lease_seconds: float | None = None) -> int:
        """Renew every flow and pair entry (one batch sweep each); returns how many."""
        n = 0
        for m in (self._flows, self._pairs):
            keys = [k for k, _ in batch.iter_items(m.fd, m.key_type, m.value_type)]
            n += self._renew(m, keys, lease_seconds)
        return n

    def _renew(self, m: _Map, keys: list[Any], lease_seconds: float | None) -> int:
        """Set the lease (and clear the lease-event flag) of each key, in place."""
        deadline = self._deadline(lease_seconds)
        if m.lease is not None:
            return sum(m.lease.renew(key, deadline) for key in keys)
        return self._renew_by_rewrite(m, keys, deadline)

    @staticmethod
    def _renew_by_rewrite(m: _Map, keys: list[Any], deadline: int) -> int:
        """Fallback (kernel refused the renew program): read-modify-write of whole values.
        Packets XDP counts between the read and the write of an entry are lost."""
        items = []
        for key in keys:
            value = m.value_type()
            if libbpf.map_lookup(m.fd, key, value):
                value.lease_expiry_ns = deadline
                value.flags &= ~F_LEASE_EVENT_SENT
                items.append((key, value))
        if not items:
            return 0
        return batch.update_many(m.fd, m.key_type, m.value_type, items)

    def _deadline(self, lease_seconds: float | None) -> int:
        return lease_deadline_ns(self.lease_seconds if lease_seconds is None else lease_seconds)

    # -- sweep and size ----------------------------------------------------------------------
    def entries(self) -> Iterator[tuple[Any, ShuntCounters]]:
        """Every flow entry (batched). Keys are copies, safe to keep."""
        for key, value in batch.iter_items(self._flows.fd, self._flows.key_type,
                                           self._flows.value_type):
            yield key, ShuntCounters.from_value(value)

    def pair_entries(self) -> Iterator[tuple[Any, ShuntCounters]]:
        for key, value in batch.iter_items(self._pairs.fd, self._pairs.key_type,
                                           self._pairs.value_type):
            yield key, ShuntCounters.from_value(value)

    @property
    def occupancy(self) -> int:
        return self._flows.count

    @property
    def capacity(self) -> int:
        return self._flows.capacity

    @property
    def pair_occupancy(self) -> int:
        return self._pairs.count

    @property
    def pair_capacity(self) -> int:
        return self._pairs.capacity

    def recount(self) -> None:
        """Resynchronise the occupancy counts with the maps (one sweep each)."""
        for m in (self._flows, self._pairs):
            m.count = sum(1 for _ in batch.iter_items(m.fd, m.key_type, m.value_type))

    def close(self) -> None:
        """Release the renew programs (the maps belong to the XdpProgram)."""
        for m in (self._flows, self._pairs):
            if m.lease is not None:
                m.lease.close()

    # -- config ----------------------------------------------------------------------------
    def set_pass_all(self, on: bool) -> None:
        """Emergency switch: XDP passes every packet and touches no entry."""
        if on:
            self.prog.set_flags(CFG_PASS_ALL)
        else:
            self.prog.clear_flags(CFG_PASS_ALL)

