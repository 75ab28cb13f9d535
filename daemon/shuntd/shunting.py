"""The shunt lifecycle: policy `Actions` over a `ShuntTable`, leases, ring events, counter merge.

A connection's shunt state lives in `conn.ext["shunt"]` (`ConnShunt`): counters taken from the
map when an entry ends are added there, so a connection shunted twice reports the sum. What
XDP dropped is never counted in orig_pkts etc.; it is reported in the extra conn.log columns
(`SHUNT_CONN_FIELDS`) and in shunt.log, one record per shunt episode.

What the dropped TCP packets would have told the analyser is brought back ("catch-up"), so
conn_state, orig_bytes/resp_bytes and history come out as Zeek's: the XDP entry records the
history letters (D/A per side, in order of first appearance) and each side's last sequence and
ack numbers; a FIN/RST ring event carries its own seq/ack and the letters before it. Before
the FIN/RST is fed to the TCP analyser, and again when the entry ends, the letters are added
and each endpoint's sequence space is moved forward past the dropped data without a content
gap (shunted data is not missed). Ring events are applied in capture order: each is a timer at
its own timestamp, so every packet XDP passed before it is analysed first.
"""

from __future__ import annotations

import logging
import math
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

from shuntd.capture.ring import TALLY_PKT_SHIFT
from shuntd.conn.hooks import EngineHooks
from shuntd.conn.record import addr_text
from shuntd.conn.settings import TUNNEL_UDP_PORTS
from shuntd.conn.tcp import HIST_ACK_PKT, HIST_DATA_PKT, TCPAnalyzer, TCPEndpoint
from shuntd.conn.tcpstate import INACTIVE, RESET
from shuntd.datapath.program import (
    CFG_IGNORE_VLANS,
    F_EARLY,
    HEADER,
    key_endpoints,
    map_time_to_wall,
    monotonic_ns,
)
from shuntd.datapath.ring import EarlyEvent, LeaseExpiredEvent, TcpCloseEvent
from shuntd.datapath.table import ShuntCounters, ShuntResult, ShuntTable
from shuntd.events import REMOVAL_HOOKS_KEY, TIMING_OUT_HOOKS_KEY
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
_TRIGGER_CODES = {t: i + 1 for i, t in enumerate(_KNOWN_TRIGGERS)}
_PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp"}
_LETTERS_SHIFT = HEADER["SHUNT_F_TCP_LETTERS_SHIFT"]
_RANK_SHIFT = HEADER["SHUNT_F_TCP_RANK_SHIFT"]
M32 = 0xFFFFFFFF
# A late packet's Ethernet type, IPv4 + TCP header (ShuntManager.late_frame), from the frame's
# byte 12: type + version/IHL + TOS, total length, fragment field + TTL + protocol, seq, ack,
# data offset + flags.
_LATE_HDR = struct.Struct("!IHxxIxx12xIIH")
_LATE_SNAP = 54  # Ethernet + IPv4 without options + TCP without options
_HALF = 0x80000000
_ONE_PKT = 1 << TALLY_PKT_SHIFT
_TALLY_BYTES = _ONE_PKT - 1
# Pending history letters of late packets (ShuntManager.late_frame): tracker side 0 data, side 0
# ack, side 1 data, side 1 ack; applied in order of first appearance by _flush_late.
_LATE_LETTERS = ((0, HIST_DATA_PKT, "D"), (0, HIST_ACK_PKT, "A"),
                 (1, HIST_DATA_PKT, "D"), (1, HIST_ACK_PKT, "A"))


# Seconds of network time after an EARLY ring event (an early shunt XDP made) by which the
# connection's own shunt() should have adopted the entry; then it is adopted anyway, or ended
# (ShuntManager._early_due). Like FIN/RST events it is a timer at the event's time: it runs once
# the capture has caught up that far, so the handshake packets still in the ring count first.
EARLY_ADOPT_MARGIN = 2.0
# Seconds after a LEASE_EXPIRED event of an early entry that is not ours before it is taken as
# orphaned: the worker that adopted it (--workers) ends it itself at the event's time.
EARLY_REAP_MARGIN = 2.0

# Services of connections that carry other traffic: XDP sees only outer headers, so shunting
# one would drop everything inside it, unseen.
TUNNEL_SERVICES = frozenset({"vxlan", "geneve", "gtpv1", "teredo", "ayiya"})


def _tunnel_refusal(conn: Any) -> str | None:
    """Why `conn` must not be shunted by flow (None: it may be). A connection that came out
    of a tunnel has tunnel_parents before any of its events (conn/tunnels.py `check`)."""
    if conn.tunnel_parents:
        return "it is inside a tunnel, which XDP does not decapsulate"
    service = conn.service
    carried = TUNNEL_SERVICES.intersection(service) if service else None
    if carried:
        return f"it is a {', '.join(sorted(carried))} tunnel: shunting it would hide its contents"
    if conn.ip_proto == 17 and conn.resp_p in TUNNEL_UDP_PORTS:
        return (f"UDP port {conn.resp_p} carries tunnels (before any confirmation): "
                "shunting it could hide their contents")
    return None


def trigger_code(trigger: str) -> int:
    code = _TRIGGER_CODES.get(trigger)
    if code is not None:
        return code
    return (zlib.crc32(trigger.encode()) & 0x7FFFFFFF) | 0x40000000


def trigger_name(code: int) -> str:
    if 1 <= code <= len(_KNOWN_TRIGGERS):
        return _KNOWN_TRIGGERS[code - 1]
    return f"#{code}"


class ConnShunt:
    """A connection's shunt history: trigger, live map key, counters of ended episodes, and
    what the late packets of the live episode did and the connection was not yet told
    (`late`: the two `LateSide`s while the episode takes late packets; `letters`, `order`,
    `dirty`: see `ShuntManager.late_frame`)."""

    __slots__ = ("trigger", "key", "orig_side", "start", "orig_pkts", "orig_bytes",
                 "resp_pkts", "resp_bytes", "anchor", "late", "late_keys", "letters", "order",
                 "dirty", "refs", "refs_at")

    def __init__(self, trigger: str) -> None:
        self.trigger = trigger
        self.key: bytes | None = None  # the flow key's bytes while an entry is in the map
        self.orig_side = 1            # side of the originator in the key
        self.start = 0.0
        # (next seq, ack sent) of tracker side 0, then side 1, when this episode began:
        # XDP tracks them from there (shuntd.h, flow_value.tcp).
        self.anchor: tuple[int, int, int, int] = (0, 0, 0, 0)
        self.orig_pkts = self.orig_bytes = self.resp_pkts = self.resp_bytes = 0
        self.late: tuple[LateSide, LateSide] | None = None
        self.late_keys: tuple[bytes, bytes] | None = None  # their keys in ShuntManager.late
        self.letters = 0          # _LATE_LETTERS bits pending
        self.order: list[int] = []  # those bits, in order of first appearance
        self.dirty = False        # in ShuntManager.pending
        # The entry's (next, ack sent) per tracker side as 64-bit values (_map_tcp), read
        # when `refs_at` ring events had been received: a FIN/RST event received by then
        # was written after XDP moved them past it (ShuntManager._apply_close).
        self.refs: tuple[int, int, int, int] | None = None
        self.refs_at = 0


class LateSide:
    """The late packets of one tracker side of a shunted connection (the value of
    `ShuntManager.late`, a tally of the capture ring, see CaptureRing.poll): counts until the
    episode ends; the time of the last one; the sequence and ack numbers since the last
    `_flush_late`, as a forward-only chain from the first one (`seq0`, `seq`: None when nothing
    is pending). `fast`: the kinds of frame (1: ACK with payload, 2: ACK without) the ring may
    count itself, as their letter is pending and both chains are started (0 after a flush).
    `armed`: the kinds whose letter a flush already gave the connection; the chains then run
    on from what was applied (`seq0`, `ack0`) instead of starting again, as XDP's run over a
    whole episode, so after a flush the ring counts them again once `rearm` (one cheap call per
    side and batch, not a `late_frame`) put the connection back in `pending`."""

    __slots__ = ("conn", "st", "side", "tally", "last_ts", "seq0", "seq", "ack0",
                 "ack", "data_bit", "ack_bit", "fast", "armed", "pending")

    def __init__(self, conn: Any, st: ConnShunt, side: int,
                 pending: dict[ConnShunt, None] | None = None) -> None:
        self.conn, self.st, self.side = conn, st, side
        self.pending = pending if pending is not None else {}
        self.tally = 0  # packets << TALLY_PKT_SHIFT + IP bytes (one addition per packet)
        self.last_ts = 0.0
        self.seq0: int = 0
        self.seq: int | None = None
        self.ack0: int = 0
        self.ack: int | None = None
        self.data_bit, self.ack_bit = (1, 2) if side == 0 else (4, 8)
        self.fast = 0
        self.armed = 0

    @property
    def pkts(self) -> int:
        return self.tally >> TALLY_PKT_SHIFT

    @property
    def bytes(self) -> int:
        return self.tally & _TALLY_BYTES

    def rearm(self) -> bool:
        """The capture ring's first frame of an armed kind since the last flush: the ring may
        count this side's armed kinds again; the connection is pending again."""
        self.fast |= self.armed
        st = self.st
        if not st.dirty:
            st.dirty = True
            self.pending[st] = None
        return True


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


def _near(x32: int, ref64: int) -> int:
    """The 64-bit value of a 32-bit seq/ack: the highest one not above `ref64`."""
    return ref64 - ((ref64 - x32) & M32)


def _skip(ep: TCPEndpoint, seq64: int, acked: bool) -> None:
    """Move the reassembler past data XDP dropped, with no content gap (it was shunted, not
    missed); `acked` also releases what the peer acknowledged, as the ack would have."""
    rel = seq64 - ep.start_seq
    reasm = ep.reassembler()
    if rel > reasm.lrs:
        reasm.lrs = rel
    if acked and rel > reasm.trim_seq:
        reasm.trim_to_seq(rel)


def advance_seq(ep: TCPEndpoint, seq64: int) -> None:
    """The endpoint sent dropped data up to `seq64` (its next sequence number)."""
    state = ep.state
    rel = seq64 - ep.start_seq
    if state == INACTIVE or state == RESET or rel <= ep.last_rel:
        # Never seen (no origin to move from), reset (Zeek's update_last_seq ignores what
        # follows a RST), or nothing new.
        return
    ep.last_rel = rel  # last_seq = seq64 & M32, seq_wraps = seq64 >> 32
    _skip(ep, seq64, False)


def advance_ack(ep: TCPEndpoint, ack64: int) -> None:
    """The peer acknowledged the endpoint's data up to `ack64` in a dropped packet."""
    rel = ack64 - ep.start_seq
    if ep.state == INACTIVE or rel <= ep.ack_rel:
        return
    ep.ack_rel = rel  # ack_seq = ack64 & M32, ack_wraps = ack64 >> 32
    _skip(ep, ack64, True)


def _tcp_anchor(conn: Any) -> tuple[int, int, int, int]:
    """(next, ack sent) of tracker side 0, then of side 1, as 64-bit values."""
    e0, e1 = conn.side0, conn.side1
    s0, s1 = e0.start_seq, e1.start_seq
    return (s0 + e0.last_rel, s1 + e1.ack_rel, s1 + e1.last_rel, s0 + e0.ack_rel)


def _map_tcp(anchor: tuple[int, int, int, int], c: ShuntCounters) -> tuple[int, ...]:
    """The entry's (next, ack sent) per side as 64-bit values: XDP counts wraps since the
    anchor (shuntd.h)."""
    a0, a1, a2, a3 = anchor
    w0, w1, w2, w3 = c.tcp_wraps
    return (((a0 >> 32) + w0) << 32 | c.tcp_next1, ((a1 >> 32) + w1) << 32 | c.tcp_ack1,
            ((a2 >> 32) + w2) << 32 | c.tcp_next2, ((a3 >> 32) + w3) << 32 | c.tcp_ack2)


# How far XDP's starting values of an early shunt can be from the connection's at adoption
# (acks of pure ACK packets XDP does not look at, a racing packet): far less than this.
_EARLY_SLACK = 1 << 28


def _early_anchor(anchor: tuple[int, int, int, int],
                  c: ShuntCounters) -> tuple[int, int, int, int]:
    """The anchor of an early shunt XDP made: XDP counts wraps from its own starting values,
    which may differ a little from the connection's (XDP takes acks from payload packets only,
    and a racing packet may have moved it on), so each value's upper half is the one XDP's
    start had. That is the connection's own unless its value is within _EARLY_SLACK of a 2^32
    boundary (however much XDP dropped before the adoption: a daemon running behind); only
    there it is taken from the entry's value nearest the connection's, less the entry's wraps
    (right while less than 2^31 was dropped before the adoption)."""
    w0, w1, w2, w3 = c.tcp_wraps
    out = []
    for a, x, w in ((anchor[0], c.tcp_next1, w0), (anchor[1], c.tcp_ack1, w1),
                    (anchor[2], c.tcp_next2, w2), (anchor[3], c.tcp_ack2, w3)):
        if _EARLY_SLACK <= a & M32 <= M32 - _EARLY_SLACK:
            out.append(a)
            continue
        hi = (_near(x, a + 0x7FFFFFFF) >> 32) - w
        out.append(hi << 32 | (a & M32))
    return out[0], out[1], out[2], out[3]


def _shunted(conn: Any) -> bool:
    """The connection has an entry of its own now (a ConnShunt whose shunt has ended does not
    count: a later early shunt of it is still to be settled)."""
    st: ConnShunt | None = conn.ext.get(EXT_KEY) if conn.ext else None
    return st is not None and st.key is not None


def _letter_order(letters: int) -> tuple[tuple[int, int, str], ...]:
    """(tracker side, history mask, letter) of each letter present in a 12-bit letters
    value, in the order its ranks give (letter i: tracker side i >> 1, D then A)."""
    present = [i for i in range(4) if letters >> i & 1]
    present.sort(key=lambda i: (letters >> (_RANK_SHIFT - _LETTERS_SHIFT + 2 * i)) & 3)
    return tuple((i >> 1, HIST_ACK_PKT, "A") if i & 1 else (i >> 1, HIST_DATA_PKT, "D")
                 for i in present)


# Every letters value's order, made once (4 presence bits and 4 two-bit ranks: 4,096 values).
_LETTER_ORDER = tuple(_letter_order(x) for x in range(1 << 12))


def add_letters(conn: Any, letters: int) -> None:
    """History letters of dropped packets (bits 0-11 of SHUNT_F_TCP_*, shifted down), in the
    order XDP first saw them; each is added once per endpoint role, as Zeek does."""
    order = _LETTER_ORDER[letters & 0xFFF]
    if order:
        sides = conn.sides
        for side, mask, code in order:
            # Already there for the endpoint's role (shifted for the responder, as _arm reads
            # it) and no SYN-ACK flip due: check_history would change nothing. The usual
            # case: a shunted session's D and A letters came with its handshake.
            if (conn.hist_seen & (mask if side == conn.orig_side else mask << 16)
                    and conn.history != "H"):
                continue
            sides[side].check_history(conn, mask, code)


_PORTS = struct.Struct("!HH")


def _late_keys(proto: int, orig_h: bytes, orig_p: int, resp_h: bytes,
               resp_p: int) -> tuple[bytes, bytes] | None:
    """The `ShuntManager.late` keys of an IPv4 TCP connection: the header bytes (src addr,
    dst addr, src port, dst port) of its originator's packets, then of its responder's
    (a flip swaps the two, so forgetting them needs no record of which was which)."""
    if proto != 6 or len(orig_h) != 4:
        return None
    return (orig_h + resp_h + _PORTS.pack(orig_p, resp_p),
            resp_h + orig_h + _PORTS.pack(resp_p, orig_p))


def _arm(conn: Any, sides: tuple[LateSide, LateSide],
         tcp_start: tuple[int, int, int, int]) -> None:
    """Arm (`LateSide.armed`) the kinds of late packet whose history letter the connection
    already has, their chains running from its state at the shunt (the entry's anchor, as
    XDP's: `tcp_start`, the next seq and ack sent of tracker side 0, then of side 1): the
    capture ring counts them from the first one, without a `late_frame` call.
    Not while an endpoint is inactive or reset, nor on a lone SYN-ACK ("H": a letter would
    flip the roles)."""
    if conn.history == "H":
        return
    e0, e1 = conn.side0, conn.side1
    if e0.state == INACTIVE or e0.state == RESET or e1.state == INACTIVE or e1.state == RESET:
        return
    seen = conn.hist_seen
    for s in sides:
        shift = 0 if s.side == conn.orig_side else 16
        kinds = ((1 if seen & (HIST_DATA_PKT << shift) else 0)
                 | (2 if seen & (HIST_ACK_PKT << shift) else 0))
        if kinds:
            s.armed = kinds
            if s.side:  # (ep.last_seq, peer.ack_seq)
                s.seq0 = s.seq = tcp_start[2]
                s.ack0 = s.ack = tcp_start[3]
            else:
                s.seq0 = s.seq = tcp_start[0]
                s.ack0 = s.ack = tcp_start[1]


class ShuntManager:
    """Implements `policy.Actions` for the live daemon, and keeps map entries and connections
    in step (ring events, leases, removal)."""

    def __init__(self, table: ShuntTable, tracker: Any, thresholds: Any,
                 write_shunt_row: Callable[[tuple], None],
                 shunted_inactivity_timeout: float = 60.0) -> None:
        self.table = table
        self.tracker = tracker
        self.thresholds = thresholds  # the EventDispatcher (threshold framework)
        if thresholds is not None:  # the threshold actions below, without a call in between
            self.set_bytes_threshold = thresholds.set_bytes_threshold  # type: ignore[method-assign]
            self.set_packets_threshold = (  # type: ignore[method-assign]
                thresholds.set_packets_thresholds)
        self.write_shunt_row = write_shunt_row
        self.shunted_inactivity_timeout = shunted_inactivity_timeout
        self.flows: dict[bytes, Any] = {}  # key bytes -> Connection
        # Shunted IPv4 TCP connections by the 12 bytes src addr, dst addr, src port, dst port
        # of a frame's headers, each direction: its LateSide. See late_frame().
        self.late: dict[bytes, LateSide] = {}
        # Connections (ConnShunt) with late packets not yet applied to the TCP state.
        self.pending: dict[ConnShunt, None] = {}  # (ordered set: removal in O(1))
        # Frames captured after this time may follow ring events not read yet: late_frame
        # leaves them to the caller, which reads the events first (daemon.Engine.capture).
        self.horizon = float("inf")
        # Reads the ring events that came since (the caller's), sets and returns `horizon`.
        self.refresh: Callable[[], float] | None = None
        self._timers = getattr(tracker, "timers", None)
        self._heap = getattr(self._timers, "heap", None)  # kept for the manager's lifetime
        hooks = getattr(tracker, "hooks", None)
        # Whether network time must reach the hooks packet by packet (as tracker.process).
        self._tick_hooks = hooks is not None and type(hooks).tick is not EngineHooks.tick
        self.pairs: dict[bytes, PairShunt] = {}
        self.received = 0  # ring events given to apply() so far (TcpCloseEvent.received)
        self.refused_full = 0
        self._full_episode = False
        self._tunnel_warned = False
        self.shutting_down = False
        # Told of every insert attempt as (trigger, result): the daemon's metrics. Besides
        # the policy's results (`ok`, `exists`, `full`, `error`): `adopted` (the insert found
        # an early shunt XDP made for this connection with this trigger and took it over; the
        # policy is told `ok`) and `adopted_late` (taken over at an EARLY event's margin,
        # without a shunt() by then).
        self.on_insert: Callable[[str, str], None] | None = None
        # The trigger a loaded policy declares with EARLY_SHUNT (policyfile.early_trigger):
        # the name an early shunt adopted without the policy's shunt() gets. None: none does.
        self.early_trigger: str | None = None
        # The tracker's connection key has no VLAN (Zeek's default conn key): match XDP's
        # flow and pair keys the same way, so tagged traffic is shunted like untagged.
        prog = getattr(table, "prog", None)
        if prog is not None:
            prog.set_flags(CFG_IGNORE_VLANS)

    # -- policy Actions ------------------------------------------------------------------
    def shunt(self, conn: Any, trigger: str) -> str:
        result = self._shunt(conn, trigger)
        if self.on_insert is not None:
            self.on_insert(trigger, result)
        return "ok" if result == "adopted" else result

    def _shunt(self, conn: Any, trigger: str) -> str:
        if conn.removed:
            return "error"
        st: ConnShunt | None = conn.ext.get(EXT_KEY) if conn.ext else None
        if st is not None and st.key is not None:
            return "exists"
        proto, x, px, y, py = conn.key
        if conn.orig_side:
            orig_h, orig_p, resp_h, resp_p = y, py, x, px
        else:
            orig_h, orig_p, resp_h, resp_p = x, px, y, py
        # _tunnel_refusal's cases, tested inline first (every TLS session comes here once)
        rare = conn.rare
        service = conn.service
        if ((rare is not None and rare.tunnel_parents)
                or (service and not TUNNEL_SERVICES.isdisjoint(service))
                or (proto == 17 and resp_p in TUNNEL_UDP_PORTS)):
            why = _tunnel_refusal(conn)
            if why is not None:
                if not self._tunnel_warned:
                    self._tunnel_warned = True
                    log.warning("not shunting %s: %s (fail open; further refusals are "
                                "counted as result=error, not logged)", conn.uid, why)
                return "error"
        key, orig_side = self.table.flow_key_bytes(orig_h, orig_p, resp_h, resp_p, proto)
        if type(conn.analyzer) is TCPAnalyzer:
            e0, e1 = conn.side0, conn.side1   # _tcp_anchor, inline
            s0, s1 = e0.start_seq, e1.start_seq
            n0 = s0 + e0.last_rel
            a0 = s1 + e1.ack_rel
            n1 = s1 + e1.last_rel
            a1 = s0 + e0.ack_rel
            anchor: tuple[int, int, int, int] | None = (n0, a0, n1, a1)
            tcp_start: tuple[int, int, int, int] | None = (n0 & M32, a0 & M32, n1 & M32,
                                                           a1 & M32)
        else:
            anchor = tcp_start = None
        code = _TRIGGER_CODES.get(trigger)
        if code is None:
            code = trigger_code(trigger)
        result = self.table.shunt_key(key, code, tcp_start=tcp_start)
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
            # An early shunt XDP made for this connection with this trigger: ours from now
            # on. Any other entry is somebody else's (an earlier run's, another connection's
            # of ours on the same ports): leave it alone.
            if key in self.flows:
                return result.value
            c = self.table.lookup_key(key)
            if c is None or not c.flags & F_EARLY or c.trigger != code:
                return result.value
            adopted = True
            if anchor is not None:
                anchor = _early_anchor(anchor, c)
        else:
            adopted = False
        if self._full_episode:
            self._full_episode = False
            log.info("shunt map has room again (%d refusals in the full episode)",
                     self.refused_full)
        if st is None:
            st = ConnShunt(trigger)
            ext = conn.ext
            if ext is None:
                conn.ext = ext = {}
            ext[EXT_KEY] = st
            # register_removal_hook and register_timing_out_hook, inline: a connection
            # without a ConnShunt has neither of ours yet.
            hooks = ext.get(REMOVAL_HOOKS_KEY)
            if hooks is None:
                ext[REMOVAL_HOOKS_KEY] = [self._on_removal]
            else:
                hooks.append(self._on_removal)
            hooks = ext.get(TIMING_OUT_HOOKS_KEY)
            if hooks is None:
                ext[TIMING_OUT_HOOKS_KEY] = [self.timing_out]
            else:
                hooks.append(self.timing_out)
        st.trigger = trigger
        st.key = key
        st.orig_side = orig_side
        st.start = self.tracker.network_time
        st.refs = None  # a new entry: nothing read from it yet
        if anchor is not None:
            st.anchor = anchor
            keys = _late_keys(proto, orig_h, orig_p, resp_h, resp_p)
            if keys is not None:  # tracker side of the originator, then of the responder
                st.late = sides = (LateSide(conn, st, 0, self.pending),
                                   LateSide(conn, st, 1, self.pending))
                st.late_keys = keys
                late = self.late
                if conn.orig_side:
                    late[keys[0]], late[keys[1]] = sides[1], sides[0]
                else:
                    late[keys[0]], late[keys[1]] = sides
                _arm(conn, sides, tcp_start)  # type: ignore[arg-type]
        self.flows[key] = conn
        return "adopted" if adopted else "ok"

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
        return self.thresholds.set_packets_thresholds(conn, npackets)

    # -- lifecycle -----------------------------------------------------------------------
    def _end_flow(self, conn: Any, reason: str) -> bool:
        st: ConnShunt | None = conn.ext.get(EXT_KEY) if conn.ext else None
        if st is None or st.key is None:
            return False
        key = st.key
        st.key = None
        self.flows.pop(key, None)
        lop, lob, lrp, lrb = self._forget_late(conn, st)
        c = self.table.unshunt_key(key)
        if c is None:
            # The entry is gone (not ours to log); its late packets still count.
            st.orig_pkts += lop
            st.orig_bytes += lob
            st.resp_pkts += lrp
            st.resp_bytes += lrb
            return False
        if isinstance(conn.analyzer, TCPAnalyzer) and (c.pkts1 or c.pkts2):
            self._catch_up(conn, st, c)
        if st.orig_side == 1:
            op, ob, rp, rb = c.pkts1 + lop, c.bytes1 + lob, c.pkts2 + lrp, c.bytes2 + lrb
        else:
            op, ob, rp, rb = c.pkts2 + lop, c.bytes2 + lob, c.pkts1 + lrp, c.bytes1 + lrb
        st.orig_pkts += op
        st.orig_bytes += ob
        st.resp_pkts += rp
        st.resp_bytes += rb
        last = map_time_to_wall(c.last_seen_ns) if c.last_seen_ns else None  # c.last_seen
        if last is not None and (op or rp) and last > conn.last_time:
            conn.last_time = last  # duration covers the dropped packets
        end = last if last is not None else self.tracker.network_time
        self.write_shunt_row((st.start, conn.uid, addr_text(conn.orig_h), conn.orig_p,
                              addr_text(conn.resp_h), conn.resp_p, conn.proto, "flow",
                              st.trigger, st.start, end, reason, op, ob, rp, rb))
        return True

    def _forget_late(self, conn: Any, st: ConnShunt) -> tuple[int, int, int, int]:
        """Apply what late packets left pending and stop taking them; returns their counts
        (orig pkts, orig bytes, resp pkts, resp bytes)."""
        keys = st.late_keys
        if keys is not None:
            st.late_keys = None
            late = self.late
            late.pop(keys[0], None)
            late.pop(keys[1], None)
        sides = st.late
        if sides is None:
            return (0, 0, 0, 0)
        if sides[0].tally or sides[1].tally:  # (none: the flush would change nothing)
            self._flush_late(st)
        st.late = None  # no cycle connection -> ext -> ConnShunt -> LateSide -> connection
        if st.dirty:
            st.dirty = False
            del self.pending[st]
        o, r = sides[conn.orig_side], sides[1 - conn.orig_side]  # (after a flip by the flush)
        return (o.pkts, o.bytes, r.pkts, r.bytes)

    def flush_pending(self) -> None:
        """Apply every connection's pending late packets (end of a capture batch, or before
        the analyser sees a packet that may belong to one of them)."""
        todo = list(self.pending)  # a flush may end another's shunt (a policy's handler)
        self.pending.clear()
        for st in todo:
            st.dirty = False
        for st in todo:
            self._flush_late(st)

    @staticmethod
    def _flush_late(st: ConnShunt) -> None:
        """Tell the connection what its late packets since the last flush did, as the
        analyser would have packet by packet: history letters in order of first appearance,
        last_time, and each endpoint's sequence and ack numbers moved forward."""
        sides = st.late
        if sides is None:
            return
        conn = sides[0].conn
        if st.order:
            for bit in st.order:
                side, mask, code = _LATE_LETTERS[bit.bit_length() - 1]
                conn.sides[side].check_history(conn, mask, code)
            st.order.clear()
            st.letters = 0
        e0, e1 = conn.sides
        s0, s1 = sides
        late_ts = s0.last_ts if s0.last_ts > s1.last_ts else s1.last_ts
        if late_ts > conn.last_time and not (e0.did_close and e1.did_close):
            conn.last_time = late_ts  # as the analyser (Zeek: not once both sides closed)
        for s in sides:
            # Armed before: the chains ran on from what was applied (seq0, ack0); nothing new
            # when they did not move. advance_seq / advance_ack inline, on the endpoint's
            # 64-bit values (start_seq + last_rel / ack_rel): a flush per connection and batch.
            kept = s.armed
            seq = s.seq
            if seq is not None and not (kept and seq == s.seq0):
                ep = e1 if s.side else e0
                if ep.state != INACTIVE and ep.state != RESET:
                    start = ep.start_seq
                    cur = start + ep.last_rel
                    ref = cur + 0x7FFFFFFF
                    nxt = ref - ((ref - s.seq0) & M32) + (seq - s.seq0)
                    if nxt > cur:
                        ep.last_rel = rel = nxt - start
                        reasm = ep.reasm or ep.reassembler()  # _skip(ep, nxt, False)
                        if rel > reasm.lrs:
                            reasm.lrs = rel
            ack = s.ack
            if ack is not None and not (kept and ack == s.ack0):
                peer = e0 if s.side else e1
                if peer.state != INACTIVE:
                    start = peer.start_seq
                    cur = start + peer.ack_rel
                    ref = cur + 0x7FFFFFFF
                    nxt = ref - ((ref - s.ack0) & M32) + (ack - s.ack0)
                    if nxt > cur:
                        peer.ack_rel = rel = nxt - start
                        reasm = peer.reasm or peer.reassembler()  # _skip(peer, nxt, True)
                        if rel > reasm.lrs:
                            reasm.lrs = rel
                        if rel > reasm.trim_seq:
                            reasm.trim_to_seq(rel)
            # The kinds the ring counted (`fast`) have their letter in the history now and
            # both chains started: armed, the chains run on from here.
            s.armed = kept = kept | s.fast
            s.fast = 0
            if kept:
                s.seq0, s.ack0 = seq, ack  # type: ignore[assignment]
            else:
                s.seq = s.ack = None

    def _not_late(self, s: LateSide) -> bool:
        """A frame of a shunted connection the analyser gets after all: what came before it
        is applied first."""
        st = s.st
        if st.dirty:
            st.dirty = False
            del self.pending[st]
            self._flush_late(st)
        sides = st.late
        if sides is not None:
            # The analyser may change the history's roles: letters and chains start again.
            for x in sides:
                if x.armed:
                    x.armed = x.fast = 0
                    x.seq = x.ack = None
        return False

    def late_frame(self, s: LateSide, buf: Any, start: int, snap: int, wire_len: int,
                   ts: float) -> bool:
        """Account a late packet of a shunted TCP connection as XDP would have; False: not one
        (the caller analyses the frame as usual). `s` is the `late` entry of the frame's bytes
        26-38 (addresses and ports), the frame is `buf[start:start + snap]` (the capture ring
        calls this before it makes any object of the frame).

        Packets of a session that XDP passed before its entry landed (they were on the wire,
        in the capture ring or in this batch when the policy decided) carry nothing the
        analyser still wants. Near capacity the daemon runs tens of milliseconds behind the
        capture, so they can outnumber the handshake itself; analysing each costs as much as
        any packet. Instead they are counted as shunted, and their history letters, sequence
        and ack numbers are kept as `tcp_track()` in the XDP program records them for the
        entry (SYN, FIN and RST are left to the analyser, as XDP sends those as events): as
        the entry's, they are applied to the connection once (`_flush_late`: at the end of
        the batch, before the analyser sees another packet of it, and when the shunt ends).
        Ethernet + IPv4 (no options, not a fragment) + TCP only; neither checksum is checked
        (XDP's rule: what it drops is counted unchecked). Once a side's letter for a kind of
        packet is pending and its chains are started (`LateSide.fast`), or given to the
        connection already (`LateSide.armed`: after a flush, or from the shunt on), the
        capture ring counts its next packets of that kind itself, the same way
        (CaptureRing.poll tallies, before `late_due()`; it reports their time through
        `late_clock`)."""
        if snap < _LATE_SNAP:
            return self._not_late(s)
        if ts > self.horizon:
            # Ring events may have come since the last read: read them (each is applied at
            # its own time, the timers below) rather than leave the packet to the analyser.
            refresh = self.refresh
            if refresh is None or ts > refresh():
                return self._not_late(s)
        head, ip_len, frag_proto, seq, ack, of = _LATE_HDR.unpack_from(buf, start + 12)
        thl = (of >> 10) & 0x3C
        payload = ip_len - 20 - thl
        if (head >> 8 != 0x080045 or frag_proto & 0x3FFF00FF != 6 or of & 0x07 or thl < 20
                or payload < 0 or wire_len < 14 + ip_len):
            return self._not_late(s)
        st = s.st
        tracker = self.tracker
        if ts > tracker.network_time:
            timers = self._timers
            heap = self._heap
            if ts >= timers.wake_at or (heap and heap[0][0] <= ts) or self._tick_hooks:
                tracker.advance(ts)  # timers due first: they may end this shunt
                if st.key is None:
                    return False
            else:
                tracker.network_time = timers.now = ts  # as tracker.process
        s.tally += ip_len + _ONE_PKT
        if ts > s.last_ts:
            s.last_ts = ts
        if not st.dirty:
            st.dirty = True
            self.pending[st] = None
        bit = s.data_bit if payload else (s.ack_bit if of & 0x10 else 0)
        if bit and not st.letters & bit:
            st.letters |= bit
            st.order.append(bit)
        # Sequence and ack numbers move forward only, by less than half the space (XDP's
        # rule, tcp_track); inline, not a shared helper: this runs for every late packet.
        x = (seq + payload) & M32
        cur = s.seq
        if cur is None:
            s.seq0 = s.seq = x
        else:
            d = (x - cur) & M32
            if 0 < d < _HALF:
                s.seq = cur + d
        if of & 0x10:
            cur = s.ack
            if cur is None:
                s.ack0 = s.ack = ack
            else:
                d = (ack - cur) & M32
                if 0 < d < _HALF:
                    s.ack = cur + d
            s.fast |= 1 if payload else 2  # the ring may count the next ones of this kind
        return True

    def late_due(self) -> float:
        """Time before which the capture ring may count late packets itself (its tallies,
        CaptureRing.poll): no timer is due and no ring event unread (`horizon`) before it."""
        timers = self._timers
        if timers is None or self._tick_hooks:
            return -math.inf
        due = self.horizon
        if timers.wake_at < due:
            due = timers.wake_at
        heap = self._heap
        if heap and heap[0][0] < due:
            due = heap[0][0]
        return due

    def late_clock(self, ts: float) -> None:
        """Network time moves to the capture ring's last tallied late packet (as late_frame)."""
        tracker = self.tracker
        if ts > tracker.network_time:
            tracker.network_time = self._timers.now = ts

    @staticmethod
    def _catch_up(conn: Any, st: ConnShunt, c: ShuntCounters) -> None:
        """What the entry's dropped packets would have done to history and sequence space."""
        add_letters(conn, (c.flags >> _LETTERS_SHIFT) & 0xFFF)
        n0, a0, n1, a1 = _map_tcp(st.anchor, c)
        e0, e1 = conn.sides
        if c.pkts1:
            advance_seq(e0, n0)
            advance_ack(e1, a0)
        if c.pkts2:
            advance_seq(e1, n1)
            advance_ack(e0, a1)

    def _on_removal(self, conn: Any) -> None:
        hist = conn.history
        if "R" in hist or "r" in hist:
            reason = "rst"
        elif "F" in hist or "f" in hist:
            reason = "fin"
        else:
            reason = "shutdown" if self.shutting_down else "timeout"
        self._end_flow(conn, reason)

    def timing_out(self, conn: Any) -> bool:
        """connection_timing_out (a timing-out hook of every connection it shunts): keep a
        shunted connection whose entry still sees traffic."""
        st: ConnShunt | None = conn.ext.get(EXT_KEY) if conn.ext else None
        if st is None or st.key is None:
            return False
        c = self.table.lookup_key(st.key)
        if c is None or c.last_seen is None:
            return False
        return time.time() - c.last_seen < self.shunted_inactivity_timeout

    def apply(self, event: TcpCloseEvent | LeaseExpiredEvent) -> None:
        """Apply a ring event once the capture has caught up with it: as a timer at the
        event's time, so packets XDP passed before it (still in the capture ring when the
        event arrives) are analysed first."""
        self.received += 1
        kind = type(event)
        if kind is TcpCloseEvent:
            event.received = self.received
        elif kind is EarlyEvent:
            self.tracker.timers.schedule(event.ts + EARLY_ADOPT_MARGIN, self._early_due,
                                         at_termination=True, arg=event)
            return
        self.tracker.timers.schedule(event.ts, self._apply_now, at_termination=True,
                                     arg=event)

    def _apply_now(self, event: TcpCloseEvent | LeaseExpiredEvent, _now: float) -> None:
        if type(event) is TcpCloseEvent:
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
        elif not self.shutting_down:
            # Not ours: an early shunt nobody adopted within its lease? (With --workers the
            # one that adopted it ends it itself, now: look after a margin.)
            self.tracker.timers.schedule(event.ts + EARLY_REAP_MARGIN, self._reap_due,
                                         arg=event.key_bytes)

    def _reap_due(self, key: bytes, _now: float) -> None:
        self.reap_early(key)

    def _early_due(self, ev: EarlyEvent, _now: float) -> None:
        """EARLY_ADOPT_MARGIN after XDP made an early shunt, the connection's own shunt() has
        not adopted it (the handshake's last packet lost to a capture drop, or the analyser
        disagreeing): adopt it anyway if the connection is ours and TLS (its ClientHello
        confirmed `ssl` at the stream's start), so its counters reach conn.log; end it if the
        connection is not TLS to the analyser (fail open: XDP's handshake parser alone never
        keeps a connection hidden). Another worker's or an unknown connection: left to
        reap_early when its lease runs out."""
        key = ev.key_bytes
        if key in self.flows:
            return  # adopted (the usual case)
        conn = self._tracker_conn(key)
        if conn is not None and not conn.removed:
            self._settle_early(conn, key)

    def _settle_early(self, conn: Any, key: bytes) -> None:
        """An early shunt of a connection of ours that its shunt() did not adopt (_early_due,
        or a FIN/RST of it before that): adopt it if the connection is TLS to the analyser,
        else end it (`unconfirmed`); either way its counters go to the connection."""
        if not isinstance(conn.analyzer, TCPAnalyzer) or _shunted(conn):
            return  # shunted now (its own entry, or this one adopted)
        f = self.table.lookup_flags(key)
        if f is None or not f[1] & F_EARLY:
            return  # gone (its lease ran out, or a FIN/RST ended it), or not XDP's
        early = self.early_trigger
        trigger = early if early and trigger_code(early) == f[2] else trigger_name(f[2])
        result = self._shunt(conn, trigger)
        if result != "adopted" and result != "ok":  # ("ok": the entry went meanwhile)
            self._no_early(key)
            self.reap_early(key, "unconfirmed", lapsed_only=False)  # refused, e.g. a tunnel
            return
        service = conn.service
        if not service or "ssl" not in service:
            self._no_early(key)  # before the entry goes: no window for another handshake
            self._end_flow(conn, "unconfirmed")
        elif self.on_insert is not None:
            self.on_insert(trigger, "adopted_late" if result == "adopted" else result)

    def _no_early(self, key: bytes) -> None:
        """XDP makes no early shunt of this flow again (a connection that is not TLS to the
        analyser would otherwise get one per ClientHello-shaped exchange it repeats)."""
        mark = getattr(getattr(self.table, "prog", None), "no_early", None)
        if mark is None:
            return
        try:
            mark(key)
        except Exception as exc:  # (bcc raises Exception) only the mark is lost: fail open
            log.warning("could not mark %s against early shunts: %s", key.hex(), exc)

    def _tracker_conn(self, key: bytes) -> Any:
        """The tracker's TCP connection of a flow key's bytes (None: not tracked)."""
        a1, p1, a2, p2 = self.table.flow_key_fields(key)
        if a1 < a2 or (a1 == a2 and p1 <= p2):
            tkey = (6, a1, p1, a2, p2)
        else:
            tkey = (6, a2, p2, a1, p1)
        return self.tracker.conns.get(tkey)

    def reap_early(self, key: bytes, reason: str = "orphaned", lapsed_only: bool = True) -> bool:
        """Take an early shunt XDP made that is not ours, and log it like an orphan (nobody
        adopted it, so nothing XDP counted is lost and the map does not keep it).
        `lapsed_only`: only once its lease ran out (no worker renews it). True if taken."""
        if key in self.flows:
            return False
        f = self.table.lookup_flags(key)
        if f is None or not f[1] & F_EARLY or (lapsed_only and f[0] > monotonic_ns()):
            return False
        c = self.table.unshunt_key(key)
        if c is None:
            return False
        self._orphan_row(self.table.prog.FlowKey.from_buffer_copy(key), c, reason)
        return True

    def reap_all_early(self) -> int:
        """Shutdown, after every connection was logged: take the early shunts still in the
        map that nobody adopted (the process that owns the config, once XDP makes no more)."""
        keys = [bytes(k) for k, c in self.table.entries() if c.flags & F_EARLY]
        return sum(self.reap_early(k, lapsed_only=False) for k in keys)

    def _apply_close(self, ev: TcpCloseEvent) -> None:
        """Feed the FIN/RST XDP dropped to the TCP analyser, as if it had been seen (not
        counted in ConnSize: XDP counted it)."""
        conn = None if ev.via_pair else self.flows.get(ev.key_bytes)
        if conn is not None:
            # One of ours: both keys order endpoints alike (XDP side 1/2 = tracker side 0/1).
            side = ev.side - 1
            _proto, a, pa, b, pb = conn.key
            src, sport, dst, dport = (a, pa, b, pb) if side == 0 else (b, pb, a, pa)
        else:
            a1, p1, a2, p2 = self.table.flow_key_fields(ev.key_bytes)
            if ev.side == 1:
                src, sport, dst, dport = a1, p1, a2, p2
            else:
                src, sport, dst, dport = a2, p2, a1, p1
            if src < dst or (src == dst and sport <= dport):
                tkey, side = (6, src, sport, dst, dport), 0
            else:
                tkey, side = (6, dst, dport, src, sport), 1
            conn = self.tracker.conns.get(tkey)
            if conn is not None and not ev.via_pair and not _shunted(conn):
                # An early shunt its shunt() has not adopted (the analyser did not see the
                # handshake complete): settled first, so what XDP dropped goes to this
                # connection, whose end this is.
                self._settle_early(conn, ev.key_bytes)
        if conn is None or not isinstance(conn.analyzer, TCPAnalyzer):
            return
        if side:
            ep, peer = conn.side1, conn.side0
        else:
            ep, peer = conn.side0, conn.side1
        ext = conn.ext
        st: ConnShunt | None = ext.get(EXT_KEY) if ext else None
        # Without the entry's numbers: the values closest ahead (TCP's own rule).
        ref_next = ep.start_seq + ep.last_rel + 0x7FFFFFFF
        ref_ack = peer.start_seq + peer.ack_rel + 0x7FFFFFFF
        if st is not None:
            if st.dirty:
                self._not_late(st.late[0])  # the late packets came first
            if not ev.via_pair and st.key is not None:
                add_letters(conn, ev.tcp_letters)
                m = st.refs
                if m is None or not 0 < ev.received <= st.refs_at:
                    # Read after this event arrived: past its FIN/RST (XDP moves them before
                    # it writes the event), and one read serves every event received by then
                    # (the same values a later read would give: both within 2^32 of it).
                    t = self.table.lookup_tcp(st.key)
                    if t is None:
                        m = None
                    else:
                        a0, a1, a2, a3 = st.anchor
                        m = st.refs = (((a0 >> 32) + t[2]) << 32 | t[0],
                                       ((a1 >> 32) + t[3]) << 32 | t[1],
                                       ((a2 >> 32) + t[6]) << 32 | t[4],
                                       ((a3 >> 32) + t[7]) << 32 | t[5])
                        st.refs_at = self.received
                if m is not None:  # XDP side 1/2 = tracker side 0/1
                    ref_next, ref_ack = (m[2], m[3]) if side else (m[0], m[1])
        # Everything before this FIN/RST was dropped: its data, and the data it acks.
        end = ev.seq if ev.rst else ev.seq + ev.payload_len
        advance_seq(ep, _near(end & M32, ref_next))
        if ev.tcp_flags & 0x10 and not ev.rst:  # Zeek ignores a RST's ack (update_ack)
            advance_ack(peer, _near(ev.ack, ref_ack))
        pkt = Packet()
        pkt.ts = max(ev.ts, conn.last_time)
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
        keys = list(self.flows)  # (each connection's ConnShunt.key)
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
            self._orphan_row(key, c, "orphaned", now)
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

    def _orphan_row(self, key: Any, c: ShuntCounters, reason: str,
                    now: float | None = None) -> None:
        """shunt.log row of a flow entry no connection of ours owns (side 1 as orig)."""
        if now is None:
            now = time.time()
        a1, p1, a2, p2 = key_endpoints(key)
        start = c.last_seen if c.last_seen is not None else now
        self.write_shunt_row((start, None, str(a1), p1, str(a2), p2,
                              _PROTO_NAMES.get(int(key.proto), "unknown_transport"),
                              "flow", trigger_name(c.trigger), None, c.last_seen or now,
                              reason, c.pkts1, c.bytes1, c.pkts2, c.bytes2))

    def shutdown_pairs(self) -> None:
        for p in list(self.pairs.values()):
            self._end_pair(p, "shutdown")
