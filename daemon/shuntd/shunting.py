"""The shunt lifecycle: policy `Actions` over a `ShuntTable`, leases, ring events, counter merge.

A connection's shunt state lives in `conn.ext["shunt"]` (`ConnShunt`): counters taken from the
map when an entry ends are added there, so a connection shunted twice reports the sum. What
XDP dropped is never counted in orig_pkts etc.; it is reported in the extra conn.log columns
(`SHUNT_CONN_FIELDS`) and in shunt.log, one record per shunt episode.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable
from typing import Any

from shuntd.conn.record import addr_text
from shuntd.datapath.program import key_endpoints
from shuntd.datapath.ring import LeaseExpiredEvent, TcpCloseEvent
from shuntd.datapath.table import ShuntCounters, ShuntResult, ShuntTable
from shuntd.packet import Packet

log = logging.getLogger(__name__)

EXT_KEY = "shunt"

SHUNT_LOG_FIELDS: list[tuple[str, str]] = [
    ("ts", "time"), ("uid", "string"),
    ("id.orig_h", "addr"), ("id.orig_p", "port"), ("id.resp_h", "addr"), ("id.resp_p", "port"),
    ("proto", "enum"), ("kind", "string"), ("trigger", "string"),
    ("start", "time"), ("end", "time"), ("end_reason", "string"),
    ("orig_shunted_pkts", "count"), ("orig_shunted_bytes", "count"),
    ("resp_shunted_pkts", "count"), ("resp_shunted_bytes", "count"),
]

# Stable trigger codes so a later run can name an orphaned entry's trigger.
_KNOWN_TRIGGERS = ("ssl", "bulk", "ip_pair", "ipsec", "wireguard", "manual", "test")
_PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp"}


def trigger_code(trigger: str) -> int:
    if trigger in _KNOWN_TRIGGERS:
        return _KNOWN_TRIGGERS.index(trigger) + 1
    return (zlib.crc32(trigger.encode()) & 0x7FFFFFFF) | 0x40000000


def trigger_name(code: int) -> str:
    if 1 <= code <= len(_KNOWN_TRIGGERS):
        return _KNOWN_TRIGGERS[code - 1]
    return f"#{code}"


class ConnShunt:
    """A connection's shunt history: trigger, live map key, counters of ended episodes."""

    __slots__ = ("trigger", "key", "orig_side", "start", "orig_pkts", "orig_bytes",
                 "resp_pkts", "resp_bytes", "missed_before")

    def __init__(self, trigger: str) -> None:
        self.trigger = trigger
        self.key: Any = None          # FlowKey while an entry is in the map
        self.orig_side = 1            # side of the originator in the key
        self.start = 0.0
        self.missed_before = 0        # conn.missed_bytes when first shunted
        self.orig_pkts = self.orig_bytes = self.resp_pkts = self.resp_bytes = 0


class PairShunt:
    __slots__ = ("key", "a", "b", "trigger", "start", "until")

    def __init__(self, key: Any, a: str, b: str, trigger: str, start: float,
                 until: float | None) -> None:
        self.key, self.a, self.b, self.trigger = key, a, b, trigger
        self.start, self.until = start, until


def shunt_conn_values(conn: Any) -> tuple:
    """The extra conn.log columns (SHUNT_CONN_FIELDS order) of a connection."""
    st: ConnShunt | None = conn.ext.get(EXT_KEY) if conn.ext else None
    if st is None:
        return (False, None, 0, 0, 0, 0)
    return (True, st.trigger, st.orig_pkts, st.orig_bytes, st.resp_pkts, st.resp_bytes)


class ShuntManager:
    """Implements `policy.Actions` for the live daemon, and keeps map entries and connections
    in step (ring events, leases, removal)."""

    def __init__(self, table: ShuntTable, tracker: Any, thresholds: Any,
                 write_shunt_row: Callable[[tuple], None],
                 shunted_inactivity_timeout: float = 60.0) -> None:
        self.table = table
        self.tracker = tracker
        self.thresholds = thresholds  # the EventDispatcher (threshold framework)
        self.write_shunt_row = write_shunt_row
        self.shunted_inactivity_timeout = shunted_inactivity_timeout
        self.flows: dict[bytes, Any] = {}  # key bytes -> Connection
        self.pairs: dict[bytes, PairShunt] = {}
        self.refused_full = 0
        self._full_episode = False
        self.shutting_down = False
        # Told of every insert attempt as (trigger, result): the daemon's metrics.
        self.on_insert: Callable[[str, str], None] | None = None

    # -- policy Actions ------------------------------------------------------------------
    def shunt(self, conn: Any, trigger: str) -> str:
        result = self._shunt(conn, trigger)
        if self.on_insert is not None:
            self.on_insert(trigger, result)
        return result

    def _shunt(self, conn: Any, trigger: str) -> str:
        if conn.removed:
            return "error"
        st: ConnShunt | None = conn.ext.get(EXT_KEY) if conn.ext else None
        if st is not None and st.key is not None:
            return "exists"
        key, orig_side = self.table.flow_key(conn.orig_h, conn.orig_p, conn.resp_h,
                                             conn.resp_p, conn.ip_proto)
        result = self.table.shunt_key(key, trigger_code(trigger))
        if result is ShuntResult.FULL:
            self.refused_full += 1
            if not self._full_episode:
                self._full_episode = True
                log.warning("shunt map full (%d entries): connection %s stays analysed "
                            "(fail open); further refusals are counted, not logged",
                            self.table.capacity, conn.uid)
            return result.value
        if result is ShuntResult.ERROR:
            log.warning("cannot shunt %s: %s", conn.uid, self.table.last_error)
            return result.value
        if result is ShuntResult.EXISTS:
            return result.value  # somebody else's entry (adopted): leave it alone
        if self._full_episode:
            self._full_episode = False
            log.info("shunt map has room again (%d refusals in the full episode)",
                     self.refused_full)
        if st is None:
            st = ConnShunt(trigger)
            st.missed_before = conn.missed_bytes
            if conn.ext is None:
                conn.ext = {}
            conn.ext[EXT_KEY] = st
            self.thresholds.register_removal_hook(conn, self._on_removal)
        st.trigger = trigger
        st.key = key
        st.orig_side = orig_side
        st.start = self.tracker.network_time
        self.flows[bytes(key)] = conn
        return "ok"

    def shunt_ip_pair(self, addr1: str, addr2: str, trigger: str,
                      duration: float | None) -> str:
        result = self._shunt_ip_pair(addr1, addr2, trigger, duration)
        if self.on_insert is not None:
            self.on_insert(trigger, result)
        return result

    def _shunt_ip_pair(self, addr1: str, addr2: str, trigger: str,
                       duration: float | None) -> str:
        key, _ = self.table.pair_key(addr1, addr2)
        result = self.table.shunt_pair(addr1, addr2, trigger=trigger_code(trigger))
        if result is ShuntResult.OK:
            now = self.tracker.network_time
            self.pairs[bytes(key)] = PairShunt(key, addr1, addr2, trigger, now,
                                               now + duration if duration else None)
        elif result is ShuntResult.FULL:
            self.refused_full += 1
            log.warning("ip pair map full: %s <-> %s stays analysed", addr1, addr2)
        return result.value

    def unshunt(self, conn: Any) -> bool:
        return self._end_flow(conn, "manual")

    def set_bytes_threshold(self, conn: Any, nbytes: int, is_orig: bool) -> bool:
        return self.thresholds.set_bytes_threshold(conn, nbytes, is_orig)

    def set_packets_threshold(self, conn: Any, npackets: int) -> bool:
        # Zeek's thresholds are per direction: watch both, the first crossing fires.
        a = self.thresholds.set_packets_threshold(conn, npackets, True)
        b = self.thresholds.set_packets_threshold(conn, npackets, False)
        return a or b

    # -- lifecycle -----------------------------------------------------------------------
    def _end_flow(self, conn: Any, reason: str) -> bool:
        st: ConnShunt | None = conn.ext.get(EXT_KEY) if conn.ext else None
        if st is None or st.key is None:
            return False
        key = st.key
        st.key = None
        self.flows.pop(bytes(key), None)
        c = self.table.unshunt_key(key)
        if c is None:
            return False
        op, ob = c.side(st.orig_side)
        rp, rb = c.side(3 - st.orig_side)
        st.orig_pkts += op
        st.orig_bytes += ob
        st.resp_pkts += rp
        st.resp_bytes += rb
        last = c.last_seen
        if last is not None and (op or rp) and last > conn.last_time:
            conn.last_time = last  # duration covers the dropped packets
        end = last if last is not None else self.tracker.network_time
        self.write_shunt_row((st.start, conn.uid, addr_text(conn.orig_h), conn.orig_p,
                              addr_text(conn.resp_h), conn.resp_p, conn.proto, "flow",
                              st.trigger, st.start, end, reason, op, ob, rp, rb))
        return True

    def _on_removal(self, conn: Any) -> None:
        st: ConnShunt | None = conn.ext.get(EXT_KEY) if conn.ext else None
        if st is not None:
            # Once shunted the analyser sees no content: the "gap" the FIN reveals is the
            # shunted data, which XDP counted; it is not missed (missed_bytes stays honest).
            conn.missed_bytes = min(conn.missed_bytes, st.missed_before)
        hist = conn.history
        if "R" in hist or "r" in hist:
            reason = "rst"
        elif "F" in hist or "f" in hist:
            reason = "fin"
        else:
            reason = "shutdown" if self.shutting_down else "timeout"
        self._end_flow(conn, reason)

    def timing_out(self, conn: Any) -> bool:
        """connection_timing_out: keep a shunted connection whose entry still sees traffic."""
        st: ConnShunt | None = conn.ext.get(EXT_KEY) if conn.ext else None
        if st is None or st.key is None:
            return False
        c = self.table.lookup_key(st.key)
        if c is None or c.last_seen is None:
            return False
        return time.time() - c.last_seen < self.shunted_inactivity_timeout

    def apply(self, event: TcpCloseEvent | LeaseExpiredEvent) -> None:
        if isinstance(event, TcpCloseEvent):
            self._apply_close(event)
            return
        if event.is_pair:
            p = self.pairs.get(event.key_bytes)
            if p is not None:
                self._end_pair(p, "lease")
            return
        conn = self.flows.get(event.key_bytes)
        if conn is not None:
            self._end_flow(conn, "lease")

    def _apply_close(self, ev: TcpCloseEvent) -> None:
        """Feed the FIN/RST XDP dropped to the TCP analyser, as if it had been seen (not
        counted in ConnSize: XDP counted it)."""
        a1, p1, a2, p2 = key_endpoints(ev.key)
        if ev.side == 1:
            src, sport, dst, dport = a1.packed, p1, a2.packed, p2
        else:
            src, sport, dst, dport = a2.packed, p2, a1.packed, p1
        if src < dst or (src == dst and sport <= dport):
            tkey, side = (6, src, sport, dst, dport), 0
        else:
            tkey, side = (6, dst, dport, src, sport), 1
        conn = self.tracker.conns.get(tkey)
        if conn is None:
            return
        pkt = Packet()
        pkt.ts = max(ev.ts, self.tracker.network_time)
        pkt.src, pkt.dst, pkt.sport, pkt.dport, pkt.proto = src, dst, sport, dport, 6
        pkt.tcp_flags, pkt.seq, pkt.ack = ev.tcp_flags, ev.seq, ev.ack
        pkt.window = 65535
        pkt.payload_len = ev.payload_len
        pkt.payload = memoryview(b"")
        pkt.ip_len = ev.ip_len
        pkt.tcp_hdr_len = 20
        pkt.tcp_hdr_ok = pkt.l4_ok = True
        pkt.frag = 0
        pkt.checksum_ok = None
        pkt.vlan = pkt.inner_vlan = 0
        pkt.ip_version = 4 if len(src) == 4 else 6
        self.tracker.advance(pkt.ts)
        conn.analyzer.process(conn, pkt, side, side == conn.orig_side)

    def _end_pair(self, p: PairShunt, reason: str) -> None:
        self.pairs.pop(bytes(p.key), None)
        c = self.table.unshunt_pair(p.a, p.b)
        if c is None:
            return
        self._pair_row(p.key, p.trigger, p.start, c, reason)

    def _pair_row(self, key: Any, trigger: str, start: float, c: ShuntCounters,
                  reason: str) -> None:
        a1, _p1, a2, _p2 = key_endpoints(key)
        end = c.last_seen if c.last_seen is not None else self.tracker.network_time
        self.write_shunt_row((start, None, str(a1), None, str(a2), None, None, "ip_pair",
                              trigger, start, end, reason, c.pkts1, c.bytes1, c.pkts2, c.bytes2))

    def renew(self) -> None:
        """Renew the leases of our own entries; end IP-pair shunts whose duration ran out."""
        keys = [conn.ext[EXT_KEY].key for conn in self.flows.values()]
        if keys:
            self.table.renew_keys(keys)
        now = self.tracker.network_time
        for p in list(self.pairs.values()):
            if p.until is not None and now >= p.until:
                self._end_pair(p, "timeout")
            else:
                self.table.renew_pair_key(p.key)

    def clear_orphans(self) -> int:
        """Log and delete every entry left in the maps by an earlier run."""
        n = 0
        now = time.time()
        for key, _c in list(self.table.entries()):
            c = self.table.unshunt_key(key)
            if c is None:
                continue
            a1, p1, a2, p2 = key_endpoints(key)
            start = c.last_seen if c.last_seen is not None else now
            self.write_shunt_row((start, None, str(a1), p1, str(a2), p2,
                                  _PROTO_NAMES.get(int(key.proto), "unknown_transport"),
                                  "flow", trigger_name(c.trigger), None, c.last_seen or now,
                                  "orphaned", c.pkts1, c.bytes1, c.pkts2, c.bytes2))
            n += 1
        for key, _c in list(self.table.pair_entries()):
            a1, _p1, a2, _p2 = key_endpoints(key)
            c = self.table.unshunt_pair(a1, a2, int(key.vlan_outer), int(key.vlan_inner))
            if c is None:
                continue
            self.write_shunt_row((c.last_seen or now, None, str(a1), None, str(a2), None, None,
                                  "ip_pair", trigger_name(c.trigger), None, c.last_seen or now,
                                  "orphaned", c.pkts1, c.bytes1, c.pkts2, c.bytes2))
            n += 1
        return n

    def shutdown_pairs(self) -> None:
        for p in list(self.pairs.values()):
            self._end_pair(p, "shutdown")
