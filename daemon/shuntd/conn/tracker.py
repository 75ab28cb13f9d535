"""ConnTracker: packets -> connections, timers in network time, removal -> records.

Mirrors Zeek's session manager + IPBasedAnalyzer (spec §0.3 step 5, §3.2, §5): lookup by an
endpoint-neutral key, first-packet flip decision, TCP reuse, per-protocol analysis, ConnSize,
inactivity and TCP timers, and the termination order of §5.5. Records leave through `sink`.
"""

from __future__ import annotations

from collections.abc import Callable

from shuntd.conn.bound import ConnBound
from shuntd.conn.connection import Connection
from shuntd.conn.hooks import EngineHooks
from shuntd.conn.icmp import ICMPAnalyzer
from shuntd.conn.key import icmp_ports, make_key
from shuntd.conn.record import conn_record
from shuntd.conn.settings import EngineSettings
from shuntd.conn.site import LocalNets
from shuntd.conn.tcp import ACK, SYN, TCPAnalyzer
from shuntd.conn.tcpstate import INACTIVE
from shuntd.conn.timers import TimerManager
from shuntd.conn.tunnels import Tunnels
from shuntd.conn.udp import HIST_ORIG_DATA_PKT, HIST_RESP_DATA_PKT, UDPAnalyzer, UDPEndpoint
from shuntd.conn.uid import UidGenerator
from shuntd.packet import PROTO_AMSDU, Packet

BROADCAST4 = b"\xff\xff\xff\xff"
_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"

RecordSink = Callable[[Connection, tuple], None]

# A stored key shares its parts with other connections' keys: one int object per port
# number (made once, 1.8 MB) and one bytes object per recently seen address.
_PORT_INTS = tuple(range(65536))
_ADDR_MEMO_MAX = 65536


def _discard(conn: Connection, row: tuple) -> None:
    """Default sink: records are only passed to `hooks.connection_logged`."""


def session_key_bytes(conn: Connection) -> bytes:
    """Zeek's raw session key, the termination order under a fixed seed (spec §5.5)."""
    proto, a, pa, b, pb = conn.key
    if len(a) == 4:
        a = _MAPPED_PREFIX + a
        b = _MAPPED_PREFIX + b
    return a + b + pa.to_bytes(2, "big") + pb.to_bytes(2, "big") + proto.to_bytes(2, "little")


def session_key_order(conn: Connection) -> tuple:
    """A sort key in the order of session_key_bytes, made cheaper: its parts have fixed
    sizes (16-byte addresses, ports and an IP protocol number below 256), so comparing the
    parts one by one orders as comparing the whole byte strings."""
    proto, a, pa, b, pb = conn.key
    if len(a) == 4:
        return (_MAPPED_PREFIX + a, _MAPPED_PREFIX + b, pa, pb, proto)
    return (a, b, pa, pb, proto)


class TrackerStats:
    """Counters of packets the tracker did not turn into connection activity."""

    __slots__ = ("packets", "fragments", "truncated_header", "bad_tcp_header", "connections")

    def __init__(self) -> None:
        self.packets = 0
        self.fragments = 0
        self.truncated_header = 0
        self.bad_tcp_header = 0
        self.connections = 0


class ConnTracker:
    """Connection table and engine clock. Feed `process(pkt)`, end with `finish()`."""

    def __init__(self, settings: EngineSettings | None = None,
                 hooks: EngineHooks | None = None, sink: RecordSink | None = None,
                 uid_seed: int | None = None) -> None:
        self.settings = settings or EngineSettings()
        self.hooks = hooks or EngineHooks()
        self.sink = sink or _discard
        # Each connection's checks share one deadline (`arm`), which calls _conn_timer.
        self.timers = TimerManager(self.settings.max_timer_expires,
                                   on_deadline=self._conn_timer)
        self._heap = self.timers.heap  # the manager keeps this list object for its lifetime
        self._addrs: dict[bytes, bytes] = {}    # see _shared_key
        self.addr_texts: dict[bytes, str] = {}  # conn.log's address texts (memo_addr_text)
        self.conns: dict[tuple, Connection] = {}
        self.network_time = 0.0
        self.current_ts = 0.0
        # A connection the TCP analyzer has just established: connection_established is
        # raised once the packet has been counted.
        self.established_pending: Connection | None = None
        self.stats = TrackerStats()
        self.bound = ConnBound(self.settings.max_connections)  # connection bound (conn/bound.py)
        self.uids = UidGenerator(uid_seed)
        self.local_nets = LocalNets(self.settings.local_nets,
                                    self.settings.private_address_space_is_local)
        s = self.settings
        self._likely_tcp = s.likely_tcp_ports
        self._likely_udp = s.likely_udp_ports
        self._ignore_checksums = s.ignore_checksums
        # Stateless analysers, shared by all UDP / ICMP (and unknown-protocol) connections.
        self._udp_analyzer = UDPAnalyzer()
        self._icmp_analyzer = ICMPAnalyzer()
        # Copy TCP payload for the stream only if somebody listens (saves a copy per packet).
        self.want_stream = (type(self.hooks).tcp_deliver is not EngineHooks.tcp_deliver
                            and getattr(self.hooks, "wants_stream", True))
        self._want_tick = type(self.hooks).tick is not EngineHooks.tick
        self._want_packet = type(self.hooks).packet is not EngineHooks.packet
        self.tunnels = Tunnels(self)  # decapsulation, tunnel_parents (conn/tunnels.py)
        # Zeek schedules these TCP timers only when a script handles the event.
        hooks_type = type(self.hooks)
        self.want_reset_timer = hooks_type.connection_reset is not EngineHooks.connection_reset
        self.want_partial_close_timer = (hooks_type.connection_partial_close
                                         is not EngineHooks.connection_partial_close)

    # --- clock ---------------------------------------------------------------------------------
    def advance(self, ts: float) -> None:
        """Move network time to `ts` (never backwards) and fire due timers."""
        if ts > self.network_time:
            self.network_time = ts
        self.timers.advance(self.network_time)
        self.hooks.tick(self.network_time)

    # --- packets -------------------------------------------------------------------------------
    def process(self, pkt: Packet) -> Connection | None:
        """Account one decoded, defragmented packet; returns its connection if any."""
        self.stats.packets += 1
        ts = self.current_ts = pkt.ts
        now = self.network_time
        if ts > now:
            # The timer manager's clock moves with every packet: timers scheduled while this
            # packet is handled (polls, thresholds) count from now, not from the last expiry.
            now = self.network_time = self.timers.now = ts
        heap = self._heap  # peek inline: most packets have no due timer
        if (heap and heap[0][0] <= now) or now >= self.timers.wake_at:
            self.timers.advance(now)
        if self._want_tick:
            self.hooks.tick(now)
        if pkt.frag:
            self.stats.fragments += 1
            return None
        if not pkt.l4_ok:
            self.stats.truncated_header += 1
            return None
        proto = pkt.proto
        if proto == 6 or proto == 17:
            src = pkt.src
            dst = pkt.dst
            sport = pkt.sport
            dport = pkt.dport
            if src < dst or (src == dst and sport <= dport):
                key = (proto, src, sport, dst, dport)
                side = 0
            else:
                key = (proto, dst, dport, src, sport)
                side = 1
        elif proto == 1 or proto == 58:
            sp, dp, one_way = icmp_ports(proto, pkt.sport, pkt.dport)
            key, side = make_key(proto, pkt.src, sp, pkt.dst, dp, one_way)
        elif proto == 4 or proto == 41 or proto == 47:
            self.tunnels.ip(pkt)  # IP-in-IP and GRE: the tunnel is not a connection (Zeek)
            return None
        elif proto == PROTO_AMSDU:
            self.tunnels.amsdu(pkt)  # an 802.11 A-MSDU: each subframe is a packet (Zeek)
            return None
        else:
            key, side = make_key(proto, pkt.src, 0, pkt.dst, 0)

        conn = self.conns.get(key)
        if conn is None:
            if proto == 17:
                conn = self._new_udp(pkt, key, side)
            else:
                conn = self._new_connection(pkt, key, side)
        elif proto == 6 and pkt.tcp_flags & SYN and conn.analyzer.is_reuse(pkt):
            self.remove(conn)
            conn = self._new_connection(pkt, key, side)
        elif self.tunnels.depth:
            self.tunnels.check(conn)  # tunnel_changed before the packet's events (Zeek)

        is_orig = side == conn.orig_side
        if proto == 6:
            # TCP inline: this is the per-packet hot path.
            if not pkt.tcp_hdr_ok:
                self.stats.bad_tcp_header += 1
                return conn
            an = conn.analyzer
            if pkt.checksum_ok is False and not self._ignore_checksums:
                an.bad_checksum(conn, side)
                return conn
            an.process(conn, pkt, side, is_orig)
            ep = conn.side1 if side else conn.side0
            ep.num_pkts += 1
            ep.num_bytes_ip += pkt.ip_len
            established = self.established_pending   # set by the analyzer
            if established is not None:
                self.established_pending = None
                self._established(established)
            if self._want_packet:
                self.hooks.packet(conn, pkt, side == conn.orig_side)
        elif proto == 17:
            self._udp(conn, pkt, side, is_orig)
            self.tunnels.udp(conn, pkt, is_orig)  # VXLAN, Teredo, GTP... (after the UDP analyzer)
        elif proto == 1 or proto == 58:
            self._icmp(conn, pkt, side, is_orig)
        else:
            conn.last_time = pkt.ts
            conn.endpoint(side).count(pkt.ip_len)
            self.hooks.packet(conn, pkt, is_orig)
        return conn

    def _udp(self, conn: Connection, pkt: Packet, side: int, is_orig: bool) -> None:
        if pkt.checksum_ok is False and not self._ignore_checksums:
            conn.analyzer.bad_checksum(conn, side)
            return
        conn.last_time = pkt.ts
        # The history letter and the role-bound byte count (udp.py's endpoint fields).
        if is_orig:
            if not conn.hist_seen & HIST_ORIG_DATA_PKT:
                conn.check_history(HIST_ORIG_DATA_PKT, "D")
        elif not conn.hist_seen & HIST_RESP_DATA_PKT:
            conn.check_history(HIST_RESP_DATA_PKT, "d")
        ep = conn.side1 if side else conn.side0
        n = ep.nbytes
        ep.nbytes = pkt.udp_len - 8 if n is None else n + pkt.udp_len - 8
        self.hooks.udp_payload(conn, is_orig, pkt.payload)
        # ConnSize counts with the direction the packet had before any app-layer flip.
        ep = conn.side1 if (conn.orig_side if is_orig else conn.orig_side ^ 1) else conn.side0
        ep.num_pkts += 1
        ep.num_bytes_ip += pkt.ip_len
        self.hooks.packet(conn, pkt, side == conn.orig_side)

    def _icmp(self, conn: Connection, pkt: Packet, side: int, is_orig: bool) -> None:
        if pkt.checksum_ok is False and not self._ignore_checksums:
            return
        conn.last_time = pkt.ts
        ICMPAnalyzer.account(conn, side, pkt.l4_len)
        if 8 + len(pkt.payload) >= pkt.l4_len:
            conn.endpoint(side).count(pkt.ip_len)
        self.hooks.packet(conn, pkt, is_orig)

    def _established(self, conn: Connection) -> None:
        """connection_established handlers: port inactivity timeouts, then the hook."""
        port = conn.resp_p
        if (conn.orig.state == INACTIVE and port not in self._likely_tcp
                and conn.orig_p in self._likely_tcp):
            port = conn.orig_p
        timeout = self.settings.port_inactivity_timeouts.get(port)
        if timeout is not None:
            self.set_inactivity_timeout(conn, timeout)
        self.hooks.connection_established(conn)

    # --- connections ---------------------------------------------------------------------------
    def _new_connection(self, pkt: Packet, key: tuple, side: int) -> Connection:
        if len(self.conns) >= self.bound.limit:  # connection bound (conn/bound.py)
            self.bound.make_room(self)
        proto = key[0]
        s = self.settings
        flip = False
        if proto == 6:
            analyzer: object = TCPAnalyzer()
            flags = pkt.tcp_flags
            if not flags & SYN or flags & ACK:
                likely = self._likely_tcp
                if pkt.sport in likely:
                    if pkt.dport in likely:
                        flip = not flags & SYN and pkt.sport < pkt.dport
                    else:
                        flip = True
            timeout = s.udp_inactivity_timeout  # TCP starts with the UDP value (spec §5.2)
        elif proto == 1 or proto == 58:
            analyzer = self._icmp_analyzer
            timeout = s.icmp_inactivity_timeout
        else:
            analyzer = self._icmp_analyzer
            timeout = s.unknown_ip_inactivity_timeout
        if flip and pkt.dst == BROADCAST4:
            flip = False
        sides = analyzer.make_endpoints()  # type: ignore[attr-defined]
        conn = self._add(pkt, key, side, sides, analyzer, flip)
        analyzer.attach(conn)  # type: ignore[attr-defined]
        return self._start(conn, timeout)

    def _new_udp(self, pkt: Packet, key: tuple, side: int) -> Connection:
        """_new_connection for UDP (most connections are DNS query/response pairs), with
        _add's and _start's steps inline: the stateless analyser attaches nothing, and
        nothing is armed before the inactivity deadline."""
        if len(self.conns) >= self.bound.limit:  # connection bound (conn/bound.py)
            self.bound.make_room(self)
        key = self._shared_key(key)
        ts = pkt.ts
        conn = Connection(None, key, ts, side, (UDPEndpoint(), UDPEndpoint()),
                          self._udp_analyzer, self)
        self.conns[key] = conn
        self.stats.connections += 1
        likely = self._likely_udp
        if pkt.sport in likely and pkt.dport not in likely and pkt.dst != BROADCAST4:
            conn.flip_roles()
        timeout = self.settings.udp_inactivity_timeout
        if timeout > 0:
            conn.inactivity_timeout = timeout
            conn.inact_from = ts
            conn.timer_at = when = ts + timeout
            self.timers.set_deadline(conn, when)
        if self.tunnels.depth:
            self.tunnels.check(conn)  # tunnel_parents set before new_connection (Zeek)
        self.hooks.new_connection(conn)
        return conn

    def _add(self, pkt: Packet, key: tuple, side: int, sides: tuple, analyzer: object,
             flip: bool) -> Connection:
        """A new connection in the table, its roles settled (the first steps of both paths)."""
        key = self._shared_key(key)
        conn = Connection(None, key, pkt.ts, side, sides, analyzer, self)
        self.conns[key] = conn
        self.stats.connections += 1
        if flip:
            conn.flip_roles()
        return conn

    def _start(self, conn: Connection, timeout: float) -> Connection:
        """Arm a new connection's inactivity deadline and announce it (the last steps)."""
        due = conn.timer_at
        if due is not None:   # (TCP: attach armed the SYN expiry)
            # set_inactivity_timeout, inline: the inactivity check is usually due after
            # the SYN expiry, so the deadline stands.
            if timeout != 0.0:
                conn.inactivity_timeout = timeout
                if timeout > 0:
                    conn.inact_from = start = conn.last_time
                    if start + timeout < due:
                        self.arm(conn, start + timeout)
        elif timeout > 0:   # set_inactivity_timeout, inline: nothing is armed yet
            conn.inactivity_timeout = timeout
            conn.inact_from = start = conn.last_time
            conn.timer_at = start + timeout
            self.timers.set_deadline(conn, start + timeout)
        if self.tunnels.depth:
            self.tunnels.check(conn)  # tunnel_parents set before new_connection (Zeek)
        self.hooks.new_connection(conn)
        return conn

    # --- per-connection deadline ---------------------------------------------------------------
    def arm(self, conn: Connection, when: float) -> None:
        """Make `conn`'s single deadline fire no later than `when`.

        Every timer of a connection (inactivity, and the TCP analyzer's expire/attempt/close
        checks) is a time in one of its slots; the timer manager holds one deadline per
        connection (`conn.timer_at`) at (or before) the earliest of them. Moving a check
        later costs nothing (the deadline finds nothing due and re-arms itself); only moving
        it earlier sets a new deadline.
        """
        due = conn.timer_at
        if due is not None:
            if due <= when:
                return
            self.timers.clear_deadline(conn, due)
        conn.timer_at = when
        self.timers.set_deadline(conn, when)

    def _conn_timer(self, conn: Connection, now: float) -> None:
        """The connection's deadline fired: run its earliest due check, re-arm for the next.

        One check per firing, so checks of different connections interleave in time order
        as Zeek's separate timers would (the re-armed deadline fires again in the same
        `advance` when the next check is also due)."""
        conn.timer_at = None
        if conn.removed:
            return
        an = conn.analyzer
        if type(an) is not TCPAnalyzer:
            self._inactivity_deadline(conn, now)
            return
        inact = None if conn.inact_from is None else conn.inact_from + conn.inactivity_timeout
        tcp_due = an.next_due() if type(an) is TCPAnalyzer else None
        if inact is not None and (tcp_due is None or inact <= tcp_due):
            if inact <= now:
                conn.inact_from = None
                self._inactivity_timer(conn, now)
        elif tcp_due is not None and tcp_due <= now:
            an.run_due(tcp_due, now)  # type: ignore[union-attr]
        if not conn.removed:
            self._rearm(conn)

    def _inactivity_deadline(self, conn: Connection, now: float) -> None:
        """_conn_timer of a connection whose only check is inactivity (UDP, ICMP, others):
        the same steps, inline (every such connection comes here at least twice: its first
        deadline finds the later packets and re-arms, the second removes it)."""
        start = conn.inact_from
        if start is None:
            return
        timeout = conn.inactivity_timeout
        when = start + timeout
        if when <= now:
            last = conn.last_time
            when = last + timeout
            if when <= now:   # _inactivity_timer: inactive long enough
                conn.inact_from = None
                if not self.hooks.connection_timing_out(conn):
                    self.remove(conn)
                elif not conn.removed:
                    # Vetoed: due again a timeout from now (a handler may have armed it).
                    conn.inact_from = now
                    self._rearm(conn)
                return
            conn.inact_from = last
        conn.timer_at = when   # (no deadline is pending: it has just fired)
        self.timers.set_deadline(conn, when)

    def _rearm(self, conn: Connection) -> None:
        when = None if conn.inact_from is None else conn.inact_from + conn.inactivity_timeout
        an = conn.analyzer
        if type(an) is TCPAnalyzer:
            tcp_due = an.next_due()
            if tcp_due is not None and (when is None or tcp_due < when):
                when = tcp_due
        if when is not None:
            self.arm(conn, when)

    def _shared_key(self, key: tuple) -> tuple:
        """An equal key made of shared objects: a million stored keys then do not hold a
        million copies of busy servers' addresses and of port numbers (memory only)."""
        proto, a, pa, b, pb = key
        addrs = self._addrs
        shared_a = addrs.get(a)
        shared_b = addrs.get(b)
        if shared_a is None or shared_b is None:
            if len(addrs) >= _ADDR_MEMO_MAX:
                addrs.clear()
            if shared_a is None:
                shared_a = addrs.setdefault(a, a)
            if shared_b is None:
                shared_b = addrs.setdefault(b, b)
        ports = _PORT_INTS
        return (proto, shared_a, ports[pa] if 0 <= pa < 65536 else pa, shared_b,
                ports[pb] if 0 <= pb < 65536 else pb)

    def set_inactivity_timeout(self, conn: Connection, timeout: float) -> None:
        """Session::SetInactivityTimeout: re-arm at last_time + timeout (0 = never)."""
        if timeout == conn.inactivity_timeout:
            return
        conn.inactivity_timeout = timeout
        if timeout > 0:
            conn.inact_from = conn.last_time
            self.arm(conn, conn.last_time + timeout)
        else:
            conn.inact_from = None

    def _inactivity_timer(self, conn: Connection, t: float) -> None:
        timeout = conn.inactivity_timeout
        if conn.last_time + timeout <= t:
            if self.hooks.connection_timing_out(conn):
                conn.inact_from = t   # due again at t + timeout
                return
            self.remove(conn)
        else:
            conn.inact_from = conn.last_time

    def remove(self, conn: Connection) -> None:
        """Finish a connection: state_remove hook, record, sink (exactly once). Afterwards a
        TCP connection's analyser no longer points back at it (its endpoints' `peer`/`side`
        are gone); its counters, history and record fields stay readable."""
        if conn.removed:
            return
        conn.removed = True
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        if conn.timer_at is not None:
            self.timers.clear_deadline(conn, conn.timer_at)
            conn.timer_at = None
        conn.inact_from = None
        if type(conn.analyzer) is TCPAnalyzer:
            conn.analyzer.cancel_timers()
        self.hooks.connection_state_remove(conn)
        row = conn_record(conn, self.local_nets, self.addr_texts)
        self.hooks.connection_logged(conn, row)
        self.sink(conn, row)
        if self.tunnels.active:
            self.tunnels.removed(conn)  # tunnel.log CLOSE of a UDP tunnel's connection
        if type(conn.analyzer) is TCPAnalyzer:
            # Break the connection <-> analyser cycle: the removed connection is then freed
            # at once by reference counting, not by the next full collection.
            conn.analyzer.conn = None

    def finish(self) -> None:
        """End of input (spec §5.5): expire termination timers, then drain in key order."""
        self.timers.now = max(self.timers.now, self.network_time)
        # Termination timers (TCP attempt/reset) live in connection slots: hand them to the
        # timer manager, in connection creation order, so they fire in time order with the
        # other termination timers (Zeek's timer_mgr->Expire()).
        for conn in list(self.conns.values()):
            an = conn.analyzer
            if type(an) is TCPAnalyzer:
                an.termination_timers()
        self.timers.expire_all()
        for conn in sorted(self.conns.values(), key=session_key_order):
            self.remove(conn)
