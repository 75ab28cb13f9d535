"""ShuntTable: the daemon's only handle on the `flows` and `ip_pairs` maps.

Every write is a defined outcome, never an exception on the hot path: a full map is
``ShuntResult.FULL`` (the flow simply stays visible: fail open) and is counted. Unshunt is an
atomic read-and-delete, so no dropped packet falls between the final read and the delete.

Keys are endpoint-neutral (side 1 / side 2, see bpf/shuntd.h); which side is orig is the
Connection's business. ``flow_key()`` returns the side of the endpoints as given, so the caller
can map the counters once.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

from shuntd.datapath import batch, libbpf
from shuntd.datapath.lease import LeaseWriter
from shuntd.datapath.program import (
    CFG_PASS_ALL,
    F_EARLY,
    F_LEASE_EVENT_SENT,
    Address,
    XdpProgram,
    layout_struct,
    lease_deadline_ns,
    map_time_to_wall,
)

DEFAULT_LEASE_SECONDS = 30.0


class ShuntResult(enum.Enum):
    OK = "ok"  # entry created; packets are dropped from now on
    EXISTS = "exists"  # already shunted (entry untouched)
    FULL = "full"  # map full: not shunted, traffic stays visible
    ERROR = "error"  # any other kernel refusal: not shunted (see ShuntTable.last_error)

    # Members are singletons compared by identity: hash them so too (Enum's own __hash__ is a
    # Python call; `results` counts one insert per shunt).
    __hash__ = object.__hash__


class ShuntCounters(NamedTuple):
    """What XDP counted for one entry. Side 1/2 as in the key; bytes are IP bytes.
    (A named tuple: made once per map read, on the shunt path.)"""

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


# ShuntCounters(...) without its generated __new__ (a Python call): every field given, in order.
_new_counters = tuple.__new__

# struct flow_value as read (every field ShuntCounters has, in offset order) and as written
# by an insert (the rest zero).
_VALUE_READ = ("pkts1", "bytes1", "pkts2", "bytes2", "last_seen_ns", "lease_expiry_ns",
               "flags", "event_seq", "trigger", "tcp.0.next", "tcp.0.ack", "tcp.0.next_wraps",
               "tcp.0.ack_wraps", "tcp.1.next", "tcp.1.ack", "tcp.1.next_wraps",
               "tcp.1.ack_wraps")
_VALUE_WRITE = ("lease_expiry_ns", "trigger", "tcp.0.next", "tcp.0.ack", "tcp.1.next",
                "tcp.1.ack")
# Only its TCP positions (ShuntTable.lookup_tcp).
_VALUE_TCP = ("tcp.0.next", "tcp.0.ack", "tcp.0.next_wraps", "tcp.0.ack_wraps", "tcp.1.next",
              "tcp.1.ack", "tcp.1.next_wraps", "tcp.1.ack_wraps")
# Who made it and until when (ShuntTable.lookup_flags: adopting an early shunt).
_VALUE_FLAGS = ("lease_expiry_ns", "flags", "trigger")


class _Map:
    """One hash map: fd, types, capacity, a running count of our entries, and a value buffer
    with the layouts that read and write it (one ctypes call per map operation)."""

    __slots__ = ("table", "fd", "key_type", "value_type", "capacity", "count", "lease",
                 "_vbuf", "_vaddr", "_read", "_read_tcp", "_read_flags", "_write", "_lookup",
                 "_take", "_update")

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
        self._vbuf = ctypes.create_string_buffer(ctypes.sizeof(self.value_type))
        self._vaddr = ctypes.addressof(self._vbuf)
        self._read = layout_struct(self.value_type, _VALUE_READ).unpack_from
        self._read_tcp = layout_struct(self.value_type, _VALUE_TCP).unpack_from
        self._read_flags = layout_struct(self.value_type, _VALUE_FLAGS).unpack_from
        self._write = layout_struct(self.value_type, _VALUE_WRITE).pack
        lib = libbpf.lib()
        self._lookup = lib.bpf_map_lookup_elem
        self._take = lib.bpf_map_lookup_and_delete_elem
        self._update = lib.bpf_map_update_elem

    def counters(self, value: Any) -> ShuntCounters:
        """ShuntCounters of a value (its buffer: the map's own, or a ctypes value)."""
        (p1, b1, p2, b2, seen, lease, flags, event_seq, trigger, n1, a1, nw1, aw1, n2, a2, nw2,
         aw2) = self._read(value)
        return _new_counters(ShuntCounters, (p1, b1, p2, b2, seen, lease, flags, trigger,
                                             event_seq, n1, a1, n2, a2, (nw1, aw1, nw2, aw2)))

    def update(self, key: bytes, trigger: int, deadline: int,
               tcp_start: tuple[int, int, int, int] | None) -> int:
        """Insert (BPF_NOEXIST); 0 or a positive errno."""
        n1, a1, n2, a2 = tcp_start or (0, 0, 0, 0)
        ret = self._update(self.fd, key, self._write(deadline, trigger, n1, a1, n2, a2),
                           libbpf.BPF_NOEXIST)
        if ret < 0:
            return -ret if ret != -1 else ctypes.get_errno()
        return 0

    def read(self, key: bytes, delete: bool) -> ShuntCounters | None:
        """The entry's counters (atomically deleted with `delete`); None when absent."""
        if not self._fetch(key, delete):
            return None
        return self.counters(self._vbuf)

    def read_tcp(self, key: bytes) -> tuple[int, ...] | None:
        """The entry's TCP positions (_VALUE_TCP); None when absent."""
        if not self._fetch(key, False):
            return None
        return self._read_tcp(self._vbuf)

    def read_flags(self, key: bytes) -> tuple[int, int, int] | None:
        """The entry's (lease_expiry_ns, flags, trigger); None when absent."""
        if not self._fetch(key, False):
            return None
        return self._read_flags(self._vbuf)

    def _fetch(self, key: bytes, delete: bool) -> bool:
        """The entry's value into the buffer (atomically deleted with `delete`); False when
        absent."""
        ret = (self._take if delete else self._lookup)(self.fd, key, self._vaddr)
        if ret >= 0:
            return True
        if ret == -errno.ENOENT:
            return False
        err = -ret if ret != -1 else (ctypes.get_errno() or errno.EINVAL)
        what = "bpf_map_lookup_and_delete_elem" if delete else "bpf_map_lookup_elem"
        raise OSError(err, f"{what}: {os.strerror(err)}")


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

    def flow_key_bytes(self, src: bytes, sport: int, dst: bytes, dport: int,
                       proto: int) -> tuple[bytes, int]:
        """flow_key() of wire addresses without VLANs, as bytes (every method takes them)."""
        return self.prog.flow_key_bytes(src, sport, dst, dport, proto)

    def flow_key_fields(self, key: bytes) -> tuple[bytes, int, bytes, int]:
        """(addr1, port1, addr2, port2) of a flow key's bytes, as wire addresses."""
        return self.prog.flow_key_fields(key)

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
        err = m.update(bytes(key), trigger, self._deadline(lease_seconds), tcp_start)
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

    @staticmethod
    def _take(m: _Map, key: Any) -> ShuntCounters | None:
        counters = m.read(bytes(key), True)
        if counters is not None:
            m.count = max(0, m.count - 1)
        return counters

    # -- look up ---------------------------------------------------------------------------
    def lookup_key(self, key: Any) -> ShuntCounters | None:
        return self._get(self._flows, key)

    def lookup_tcp(self, key: bytes) -> tuple[int, ...] | None:
        """A flow entry's TCP positions only, as lookup_key() reads them: (tcp_next1,
        tcp_ack1, their wraps, tcp_next2, tcp_ack2, their wraps); None when absent. (The FIN
        and RST path: no ShuntCounters made.)"""
        return self._flows.read_tcp(key)

    def lookup_flags(self, key: bytes) -> tuple[int, int, int] | None:
        """A flow entry's (lease_expiry_ns, flags, trigger) only; None when absent. (Whether
        an entry is an early shunt XDP made, and with which trigger: no ShuntCounters made.)"""
        return self._flows.read_flags(key)

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
        return m.read(bytes(key), False)

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
            return m.lease.renew_many(keys, deadline)
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
                value.flags &= ~(F_LEASE_EVENT_SENT | F_EARLY)
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
            yield key, self._flows.counters(value)

    def pair_entries(self) -> Iterator[tuple[Any, ShuntCounters]]:
        for key, value in batch.iter_items(self._pairs.fd, self._pairs.key_type,
                                           self._pairs.value_type):
            yield key, self._pairs.counters(value)

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

