"""The TCP analyzer: endpoint states, sequence bookkeeping, history letters, closing and the
TCP-specific timers, following Zeek's TCPSessionAdapter::Process (spec §§1.5-1.10, 2, 5.3).

Per packet (already checksum- and header-validated by the tracker) `process()` runs Zeek's
steps in Zeek's order. Sequence arithmetic is 32-bit with explicit wrap counters; relative
sequence numbers are 64-bit, as in Zeek. An endpoint stores its last and acked sequence
numbers with their wrap counters as 64-bit values relative to its start (small ints).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shuntd.conn.connection import history_plus
from shuntd.conn.reassembly import Reassembler
from shuntd.conn.size import EndpointCounters
from shuntd.conn.tcpstate import (
    CLOSED,
    ESTABLISHED,
    HANDSHAKE_STATES,
    INACTIVE,
    PARTIAL,
    RESET,
    SYN_ACK_SENT,
    SYN_SENT,
)

if TYPE_CHECKING:
    from shuntd.conn.connection import Connection
    from shuntd.conn.hooks import EngineHooks
    from shuntd.conn.settings import EngineSettings
    from shuntd.conn.timers import Timer
    from shuntd.conn.tracker import ConnTracker
    from shuntd.packet import Packet

M32 = 0xFFFFFFFF
M64 = (1 << 64) - 1
TOO_LARGE_SEQ_DELTA = 1048576

FIN = 0x01
SYN = 0x02
RST = 0x04
ACK = 0x10

# History masks (TCP_Endpoint::HistoryMasks); resp uses mask << 16.
HIST_SYN_PKT = 0x1
HIST_FIN_PKT = 0x2
HIST_RST_PKT = 0x4
HIST_FIN_RST_PKT = 0x8
HIST_DATA_PKT = 0x10
HIST_ACK_PKT = 0x20
HIST_MULTI_FLAG_PKT = 0x40

ORIG_BIT = 1
RESP_BIT = 2


_LOWER = {"S": "s", "H": "h", "F": "f", "R": "r", "D": "d", "A": "a", "I": "i", "Q": "q"}


def _letter(conn: Connection, side: int, mask: int, code: str) -> bool:
    """Once-only letter of the endpoint on `side` for its current role; True if already
    seen (TCPEndpoint.check_history, for callers that know the side)."""
    if (mask == HIST_ACK_PKT or mask == HIST_DATA_PKT) and conn.history == "H":
        # A SYN-ACK that elicits ACK/data: flip and rewrite the history (spec §3.3).
        conn.flip_roles(add_caret=False)
        conn.history = "^h"
    if side != conn.orig_side:
        mask <<= 16
        code = _LOWER[code]
    return conn.check_history(mask, code)


def _add_letter(conn: Connection, side: int, code: str) -> None:
    """A repeated letter (a SYN/FIN/RST at a new sequence number) for the endpoint on `side`."""
    conn.history = history_plus(conn.history, code if side == conn.orig_side else _LOWER[code])


def seq_delta(a: int, b: int) -> int:
    """int32(a - b)."""
    d = (a - b) & M32
    return d - 0x100000000 if d & 0x80000000 else d


class EndpointRare:
    """The part of a TCP endpoint only FIN, RST, closing and the logarithmic letters touch:
    made on first use, so the many open connections that saw none of them do not carry it."""

    __slots__ = ("FIN_cnt", "FIN_seq", "did_close", "hist_last_SYN", "hist_last_FIN",
                 "hist_last_RST", "scaled")

    def __init__(self) -> None:
        self.FIN_cnt = 0
        self.did_close = False
        self.hist_last_SYN = 0
        self.FIN_seq = 0
        self.hist_last_FIN = 0
        self.hist_last_RST = 0
        # Counters of the C/T/W/G letters, [count, threshold] per letter.
        self.scaled: dict[str, list[int]] = {}


class TCPEndpoint(EndpointCounters):
    """One host's half of a TCP connection (Zeek's TCP_Endpoint)."""

    # `side` and `peer` are derived from the connection (two slots less per endpoint).
    # Zeek's last_seq/seq_wraps and ack_seq/ack_wraps are kept as one 64-bit value each,
    # relative to start_seq (`last_rel`, `ack_rel`): usually small ints, which Python
    # shares, where 32-bit sequence numbers cost 32 B each. Properties give Zeek's view.
    __slots__ = (
        "analyzer", "state", "prev_state", "start_seq", "last_rel", "ack_rel",
        "rare", "reasm",
    )

    def __init__(self, analyzer: TCPAnalyzer) -> None:
        self.num_pkts = 0         # EndpointCounters, without the call
        self.num_bytes_ip = 0
        self.analyzer = analyzer
        self.state = INACTIVE
        self.prev_state = INACTIVE
        self.start_seq = 0        # 32-bit, as on the wire
        self.last_rel = 0         # ((seq_wraps << 32) | last_seq) - start_seq
        self.ack_rel = 0          # ((ack_wraps << 32) | ack_seq) - start_seq
        self.rare: EndpointRare | None = None   # FIN_cnt, did_close, ... (properties below)
        # Made on first use (`reassembler()`): one-sided flows (scans) never need one.
        self.reasm: Reassembler | None = None

    @property
    def side(self) -> int:
        """This endpoint's side in the flow key."""
        return 1 if self.analyzer.conn.side1 is self else 0

    @property
    def peer(self) -> TCPEndpoint:
        conn = self.analyzer.conn
        return conn.side0 if conn.side1 is self else conn.side1

    def _rare(self) -> EndpointRare:
        rare = self.rare
        if rare is None:
            rare = self.rare = EndpointRare()
        return rare

    @property
    def FIN_cnt(self) -> int:
        return 0 if self.rare is None else self.rare.FIN_cnt

    @FIN_cnt.setter
    def FIN_cnt(self, v: int) -> None:
        self._rare().FIN_cnt = v

    @property
    def did_close(self) -> bool:
        return self.rare is not None and self.rare.did_close

    @did_close.setter
    def did_close(self, v: bool) -> None:
        self._rare().did_close = v

    @property
    def hist_last_SYN(self) -> int:
        return 0 if self.rare is None else self.rare.hist_last_SYN

    @hist_last_SYN.setter
    def hist_last_SYN(self, v: int) -> None:
        if v or self.rare is not None:   # a SYN at relative 0 (the usual) needs no object
            self._rare().hist_last_SYN = v

    @property
    def FIN_seq(self) -> int:
        return 0 if self.rare is None else self.rare.FIN_seq

    @FIN_seq.setter
    def FIN_seq(self, v: int) -> None:
        self._rare().FIN_seq = v

    @property
    def hist_last_FIN(self) -> int:
        return 0 if self.rare is None else self.rare.hist_last_FIN

    @hist_last_FIN.setter
    def hist_last_FIN(self, v: int) -> None:
        self._rare().hist_last_FIN = v

    @property
    def hist_last_RST(self) -> int:
        return 0 if self.rare is None else self.rare.hist_last_RST

    @hist_last_RST.setter
    def hist_last_RST(self, v: int) -> None:
        self._rare().hist_last_RST = v

    def reassembler(self) -> Reassembler:
        reasm = self.reasm
        if reasm is None:
            reasm = self.reasm = Reassembler(self)
        return reasm

    # --- sequence space ------------------------------------------------------------------------
    # Zeek's four fields, as views over start_seq + last_rel / ack_rel (64-bit values).
    @property
    def last_seq(self) -> int:
        return (self.start_seq + self.last_rel) & M32

    @last_seq.setter
    def last_seq(self, v: int) -> None:
        self.last_rel = ((self.seq_wraps << 32) | v) - self.start_seq

    @property
    def seq_wraps(self) -> int:
        return (self.start_seq + self.last_rel) >> 32

    @seq_wraps.setter
    def seq_wraps(self, v: int) -> None:
        self.last_rel = ((v << 32) | self.last_seq) - self.start_seq

    @property
    def ack_seq(self) -> int:
        return (self.start_seq + self.ack_rel) & M32

    @ack_seq.setter
    def ack_seq(self, v: int) -> None:
        self.ack_rel = ((self.ack_wraps << 32) | v) - self.start_seq

    @property
    def ack_wraps(self) -> int:
        return (self.start_seq + self.ack_rel) >> 32

    @ack_wraps.setter
    def ack_wraps(self, v: int) -> None:
        self.ack_rel = ((v << 32) | self.ack_seq) - self.start_seq

    def init_seqs(self, start: int, ack: int, last: int) -> None:
        """Set start_seq, ack_seq and last_seq (32-bit values) as Zeek's init_endpoint and
        the faked handshake do: the wrap counters are kept."""
        old = self.start_seq
        seq_wraps = (old + self.last_rel) >> 32
        ack_wraps = (old + self.ack_rel) >> 32
        self.start_seq = start
        self.last_rel = ((seq_wraps << 32) | last) - start
        self.ack_rel = ((ack_wraps << 32) | ack) - start

    def no_data_acked(self) -> bool:
        ack = self.ack_rel
        return ack == 0 or ack == 1

    @property
    def size(self) -> int:
        """Bytes sent, from sequence numbers (TCP_Endpoint::Size, spec §1.6)."""
        if (self.prev_state == SYN_SENT and self.state == RESET
                and self.peer.state == INACTIVE and not self.no_data_acked()):
            return 0
        last = self.last_rel
        ack = self.ack_rel
        size = (last if last > ack else ack) & M64
        if size != 0:
            size -= 1
            rare = self.rare   # (self.FIN_cnt > 0, without the property)
            if rare is not None and rare.FIN_cnt > 0 and size != 0:
                size -= 1
        return size

    # --- states --------------------------------------------------------------------------------
    def set_state(self, new_state: int) -> None:
        state = self.state
        if new_state != state:
            if new_state not in HANDSHAKE_STATES and state in HANDSHAKE_STATES:
                conn = self.analyzer.conn
                peer = conn.side0 if conn.side1 is self else conn.side1
                if peer.state in HANDSHAKE_STATES:
                    tracker = conn.tracker
                    tracker.set_inactivity_timeout(conn,
                                                   tracker.settings.tcp_inactivity_timeout)
            self.prev_state = state
            self.state = new_state

    # --- history -------------------------------------------------------------------------------
    def check_history(self, conn: Connection, mask: int, code: str) -> bool:
        """Once-only letter for this endpoint's current role; True if already seen."""
        return _letter(conn, self.side, mask, code)

    def add_history(self, conn: Connection, code: str) -> None:
        conn.history = history_plus(conn.history,
                                    code if self.side == conn.orig_side else code.lower())

    def _scaled(self, conn: Connection, code: str) -> None:
        """Zeek's ScaledHistoryEntry: the letter at 1, 10, 100, ... occurrences."""
        scaled = self._rare().scaled
        counter = scaled.get(code)
        if counter is None:
            counter = scaled[code] = [0, 1]
        n = counter[0] = counter[0] + 1
        t = counter[1]
        if n == t:
            conn.history = history_plus(conn.history,
                                    code if self.side == conn.orig_side else code.lower())
            if t < 0xFFFFFFFF // 10:
                counter[1] = t * 10

    def checksum_error(self, conn: Connection) -> None:
        self._scaled(conn, "C")

    def did_rxmit(self, conn: Connection) -> None:
        self._scaled(conn, "T")

    def zero_window(self, conn: Connection) -> None:
        self._scaled(conn, "W")

    def gap_letter(self, conn: Connection) -> None:
        self._scaled(conn, "G")


class AnalyzerRare:
    """Analyzer state only closes, resets, half closes, deferred closes and extra timers
    need (made on first use: most open connections never need it)."""

    __slots__ = ("is_active", "close_deferred", "deferred_gen_event", "expire2_at", "close_at",
                 "extra")

    def __init__(self) -> None:
        self.is_active = True
        self.close_deferred = False
        self.deferred_gen_event = False
        self.expire2_at: float | None = None
        self.close_at: float | None = None
        self.extra: list[Timer] | None = None


class TCPAnalyzer:
    """Zeek's TCPSessionAdapter for one connection."""

    __slots__ = (
        "conn", "first_packet_seen", "is_partial",
        # Analyzer timers as times (None = not pending), checked through the connection's
        # single heap entry (ConnTracker.arm): the periodic ExpireTimer chain, the extra
        # chain started by a half close (in `rare`), the AttemptTimer and the delete timer.
        # Rare extra timers (a second attempt timer, reset and partial-close timers) are
        # heap Timers (`extra`, in `rare`).
        "expire_at", "attempt_at",
        "rare",  # AnalyzerRare: is_active, close_deferred, ..., expire2_at, close_at, extra
    )

    def __init__(self) -> None:
        self.conn: Connection = None  # type: ignore[assignment]  # set by attach()
        self.first_packet_seen = 0
        self.is_partial = False
        self.expire_at: float | None = None
        self.attempt_at: float | None = None
        self.rare: AnalyzerRare | None = None

    def _rare(self) -> AnalyzerRare:
        rare = self.rare
        if rare is None:
            rare = self.rare = AnalyzerRare()
        return rare

    @property
    def is_active(self) -> bool:
        """False once finished or reset (Zeek's IsActive)."""
        return self.rare is None or self.rare.is_active

    @is_active.setter
    def is_active(self, v: bool) -> None:
        if not v or self.rare is not None:
            self._rare().is_active = v

    @property
    def close_deferred(self) -> bool:
        return self.rare is not None and self.rare.close_deferred

    @close_deferred.setter
    def close_deferred(self, v: bool) -> None:
        if v or self.rare is not None:
            self._rare().close_deferred = v

    @property
    def deferred_gen_event(self) -> bool:
        return self.rare is not None and self.rare.deferred_gen_event

    @deferred_gen_event.setter
    def deferred_gen_event(self, v: bool) -> None:
        if v or self.rare is not None:
            self._rare().deferred_gen_event = v

    @property
    def expire2_at(self) -> float | None:
        return None if self.rare is None else self.rare.expire2_at

    @expire2_at.setter
    def expire2_at(self, v: float | None) -> None:
        if v is not None or self.rare is not None:
            self._rare().expire2_at = v

    @property
    def close_at(self) -> float | None:
        return None if self.rare is None else self.rare.close_at

    @close_at.setter
    def close_at(self, v: float | None) -> None:
        if v is not None or self.rare is not None:
            self._rare().close_at = v

    @property
    def extra(self) -> list[Timer] | None:
        return None if self.rare is None else self.rare.extra

    @extra.setter
    def extra(self, v: list[Timer] | None) -> None:
        if v is not None or self.rare is not None:
            self._rare().extra = v

    # The tracker's, not copies: four slots less per connection.
    @property
    def tracker(self) -> ConnTracker:
        return self.conn.tracker

    @property
    def settings(self) -> EngineSettings:
        return self.conn.tracker.settings

    @property
    def hooks(self) -> EngineHooks:
        return self.conn.tracker.hooks

    @property
    def want_stream(self) -> bool:
        return self.conn.tracker.want_stream

    def make_endpoints(self) -> tuple[TCPEndpoint, TCPEndpoint]:
        return (TCPEndpoint(self), TCPEndpoint(self))

    def attach(self, conn: Connection) -> None:
        """Called once the connection exists: Zeek's adapter-creation ExpireTimer."""
        self.conn = conn
        tracker = conn.tracker
        when = self.expire_at = tracker.network_time + tracker.settings.tcp_SYN_timeout
        tracker.arm(conn, when)

    # --- timers --------------------------------------------------------------------------------
    def next_due(self) -> float | None:
        """Earliest pending slot timer."""
        best = self.expire_at
        when = self.attempt_at
        if when is not None and (best is None or when < best):
            best = when
        rare = self.rare
        if rare is not None:
            for when in (rare.expire2_at, rare.close_at):
                if when is not None and (best is None or when < best):
                    best = when
        return best

    def run_due(self, due: float, now: float) -> None:
        """Fire the slot timer due at `due` (ties in Zeek's scheduling order)."""
        if self.expire_at == due:
            self.expire_at = None
            self._expire_timer(now, 1)
        elif self.attempt_at == due:
            self.attempt_at = None
            self._attempt_timer(now)
        else:
            rare = self.rare   # (expire2_at and close_at live there)
            if rare is None:
                return
            if rare.expire2_at == due:
                rare.expire2_at = None
                self._expire_timer(now, 2)
            elif rare.close_at == due:
                rare.close_at = None
                self._delete_timer(now)

    def termination_timers(self) -> None:
        """At end of input, the pending slot AttemptTimer becomes a termination heap timer."""
        if self.attempt_at is not None:
            when, self.attempt_at = self.attempt_at, None
            self._add_extra(when, self._attempt_timer, at_termination=True)

    def _add_extra(self, when: float, cb, at_termination: bool = False) -> None:
        timer = self.tracker.timers.schedule(when, cb, at_termination)
        if self.extra is None:
            self.extra = [timer]
        else:
            self.extra = [t for t in self.extra if not t.cancelled]  # drop fired ones
            self.extra.append(timer)

    def cancel_timers(self) -> None:
        """Zeek's CancelTimers: every analyzer timer (not the session's inactivity timer)."""
        self.expire_at = self.attempt_at = None
        rare = self.rare
        if rare is None:
            return
        rare.expire2_at = rare.close_at = None
        extra = rare.extra
        if extra is not None:
            cancel = self.conn.tracker.timers.cancel
            for t in extra:
                cancel(t)
            rare.extra = None

    def _expire_timer(self, t: float, chain: int = 1) -> None:
        """Zeek's ExpireTimer: remove an idle closed/empty connection, else check again
        `tcp_session_timer` later (chain 1: the periodic check, 2: after a half close,
        0: a further chain kept as a heap timer)."""
        conn = self.conn
        if conn.removed or not self.is_active:
            return
        orig = conn.orig
        resp = conn.resp
        if conn.last_time + self.settings.tcp_connection_linger < t:
            if orig.did_close or resp.did_close:
                if ((orig.did_close and resp.did_close) or orig.state == RESET
                        or resp.state == RESET or orig.state == INACTIVE
                        or resp.state == INACTIVE):
                    self.is_active = False
                    self.tracker.remove(conn)
                    return
            if resp.state == INACTIVE and orig.state == INACTIVE:
                self.tracker.remove(conn)
                return
        when = t + self.settings.tcp_session_timer
        if chain == 0:
            self._add_extra(when, self._expire_timer_extra)
            return
        if chain == 1:
            self.expire_at = when
        else:
            self.expire2_at = when
        self.tracker.arm(conn, when)

    def _expire_timer_extra(self, t: float) -> None:
        self._expire_timer(t, 0)

    def _attempt_timer(self, t: float) -> None:
        conn = self.conn
        if conn.removed or not self.is_active:
            return
        if conn.orig.state in (SYN_SENT, SYN_ACK_SENT) and conn.resp.state == INACTIVE:
            self.is_active = False
            self.tracker.remove(conn)

    def _reset_timer(self, t: float) -> None:
        """Zeek's ResetTimer (only scheduled when connection_reset is handled)."""
        conn = self.conn
        if conn.removed or not self.is_active:
            return
        if not (conn.orig.did_close and conn.resp.did_close):
            self._connection_reset()
        self.tracker.remove(conn)

    def _partial_close_timer(self, t: float) -> None:
        """Zeek's PartialCloseTimer (only scheduled when connection_partial_close is handled)."""
        conn = self.conn
        if conn.removed or not self.is_active:
            return
        orig = conn.orig
        resp = conn.resp
        if (orig.state != INACTIVE and resp.state != INACTIVE
                and (not orig.did_close or not resp.did_close)):
            if orig.state == RESET or resp.state == RESET:
                return  # the RST presumably caused the partial close: not reported
            self.hooks.connection_partial_close(conn)
            self.tracker.remove(conn)

    def _delete_timer(self, t: float) -> None:
        conn = self.conn
        if not conn.removed:
            conn.tracker.remove(conn)

    def _connection_reset(self) -> None:
        """Zeek's ConnectionReset: the connection_reset event, and the adapter goes inactive."""
        self.is_active = False
        self.hooks.connection_reset(self.conn)

    # --- flips ---------------------------------------------------------------------------------
    def flipped(self, conn: Connection) -> None:
        fps = self.first_packet_seen
        self.first_packet_seen = ((RESP_BIT if fps & ORIG_BIT else 0)
                                  | (ORIG_BIT if fps & RESP_BIT else 0))
        self.is_partial = False

    # --- per packet ----------------------------------------------------------------------------
    def is_reuse(self, pkt: Packet) -> bool:
        """TCPSessionAdapter::IsReuse (spec §2.8)."""
        flags = pkt.tcp_flags
        if pkt.tcp_hdr_len < 20 or not flags & SYN:
            return False
        conn = self.conn
        if conn.orig_side:   # (conn.orig, conn.resp without the properties: every SYN-ACK)
            orig, resp = conn.side1, conn.side0
        else:
            orig, resp = conn.side0, conn.side1
        conn_orig = orig
        if flags & ACK:
            if orig.state != INACTIVE:
                return False
            conn_orig = resp
        if not (orig.did_close or resp.did_close):
            seq = pkt.seq
            if seq == conn_orig.start_seq:
                return False
            if (not flags & ACK and conn_orig.state == SYN_ACK_SENT and resp.state == INACTIVE
                    and seq == resp.start_seq):
                return False
        return True

    def bad_checksum(self, conn: Connection, side: int) -> None:
        conn.endpoint(side).checksum_error(conn)

    def process(self, conn: Connection, pkt: Packet, side: int, is_orig: bool) -> None:
        t = pkt.ts
        flags = pkt.tcp_flags
        f_syn = flags & SYN
        f_fin = flags & FIN
        f_rst = flags & RST
        f_ack = flags & ACK
        base_seq = pkt.seq
        ack_seq = pkt.ack
        endpoint: TCPEndpoint = conn.side1 if side else conn.side0
        peer = conn.side0 if side else conn.side1
        length = pkt.payload_len

        # SetPartialStatus (a no-op once both directions were seen)
        both_seen = self.first_packet_seen == ORIG_BIT | RESP_BIT
        if both_seen:
            pass
        elif is_orig:
            if not self.first_packet_seen & ORIG_BIT:
                self.is_partial = (not f_syn) or bool(f_ack)
        elif not self.first_packet_seen & RESP_BIT and not self.is_partial:
            self.is_partial = not f_syn

        seg_len = length
        if f_syn:
            seg_len += 1
        if f_fin:
            seg_len += 1
        if f_rst:
            seg_len -= length
        seq_one_past = (base_seq + seg_len) & M32

        # init_endpoint (established endpoints first: most packets)
        st = endpoint.state
        if st == ESTABLISHED or st == PARTIAL:
            if f_syn:
                endpoint.init_seqs(base_seq, base_seq, seq_one_past)
        elif st == INACTIVE:
            if f_syn:
                endpoint.init_seqs(base_seq, base_seq, seq_one_past)
            else:
                start = (base_seq - 1) & M32
                endpoint.init_seqs(start, start, base_seq)
        elif st == SYN_SENT or st == SYN_ACK_SENT:
            if f_syn and base_seq != endpoint.start_seq:
                endpoint.init_seqs(base_seq, base_seq, seq_one_past)
        elif st == RESET:
            if f_syn and endpoint.prev_state == INACTIVE:
                endpoint.init_seqs(base_seq, base_seq, seq_one_past)

        start = endpoint.start_seq
        last64 = start + endpoint.last_rel     # (seq_wraps << 32) | last_seq
        if last64 <= base_seq:
            # Fast path of get_relative_seq: no wraps and no wrap in this packet.
            if base_seq - last64 >= 0x80000000:
                rel_seq, seq_underflow = self._relative_seq(endpoint, base_seq, last64, 0)
            else:
                d = (base_seq - start) & M32
                if d & 0x80000000:
                    rel_seq, seq_underflow = (d - 0x100000000) & M64, True
                else:
                    rel_seq, seq_underflow = d, False
        else:
            rel_seq, seq_underflow = self._relative_seq(endpoint, base_seq, last64 & M32,
                                                        last64 >> 32)

        if flags & 0x07:
            self._update_history(conn, side, flags, endpoint, rel_seq, length)
        elif length or f_ack:
            # Fast path for the common A/D letters: nothing to do once the letter was seen
            # (unless the history is exactly "H", which triggers the second-packet flip).
            mask = HIST_DATA_PKT if length else HIST_ACK_PKT
            if side != conn.orig_side:
                mask <<= 16
            if not conn.hist_seen & mask or conn.history == "H":
                _letter(conn, side, HIST_DATA_PKT if length else HIST_ACK_PKT,
                        "D" if length else "A")

        # update_window: only the zero-window letter matters for the log.
        if (pkt.window == 0 and not f_rst and peer.state != CLOSED
                and endpoint.state != RESET):
            endpoint.zero_window(conn)

        # (not endpoint.did_close or not peer.did_close, without the properties)
        ep_rare = endpoint.rare
        peer_rare = peer.rare
        if ep_rare is None or peer_rare is None or not (ep_rare.did_close
                                                        and peer_rare.did_close):
            conn.last_time = t

        if f_fin:
            ep_rare = endpoint._rare()
            ep_rare.FIN_cnt += 1
            ep_rare.FIN_seq = (rel_seq + seg_len) & M64

        rel_ack = 0
        if f_ack:
            if peer.state == INACTIVE:
                rel_ack = 1
                v = (ack_seq - 1) & M32
                peer.init_seqs(v, v, v)
            else:
                peer_start = peer.start_seq
                ack64 = peer_start + peer.ack_rel     # (ack_wraps << 32) | ack_seq
                peer_ack = ack64 & M32
                if ack64 <= ack_seq:
                    # Fast path of get_relative_seq (no wraps, none in this packet).
                    d = (ack_seq - peer_start) & M32
                    if d & 0x80000000:
                        rel_ack, ack_underflow = (d - 0x100000000) & M64, True
                    else:
                        rel_ack, ack_underflow = d, False
                else:
                    rel_ack, ack_underflow = self._relative_seq(peer, ack_seq, peer_ack,
                                                                ack64 >> 32)
                if ack_underflow:
                    rel_ack = 0
                elif not f_rst:
                    delta_ack = (ack_seq - peer_ack) & M32
                    if delta_ack & 0x80000000:
                        delta_ack -= 0x100000000
                    if ack_seq == 0 and delta_ack > TOO_LARGE_SEQ_DELTA:
                        pass
                    elif delta_ack > 0:
                        ack_wraps = ack64 >> 32
                        if ack_seq < peer_ack:       # TCP_Endpoint::UpdateAckSeq
                            ack_wraps += 1
                        ack_rel = ((ack_wraps << 32) | ack_seq) - peer_start
                        # Usually all the peer sent is acked: share its last_rel's int
                        # object (32 B when it is large) instead of keeping an equal one.
                        peer_last = peer.last_rel
                        peer.ack_rel = peer_last if ack_rel == peer_last else ack_rel

        # update_last_seq (start_seq has not changed since it was read above)
        last_rel = endpoint.last_rel
        last64 = start + last_rel
        last_seq = last64 & M32
        delta_last = (seq_one_past - last_seq) & M32
        if delta_last & 0x80000000:
            delta_last -= 0x100000000
        st = endpoint.state
        if (f_syn or f_rst) and (delta_last > TOO_LARGE_SEQ_DELTA
                                 or delta_last < -TOO_LARGE_SEQ_DELTA):
            pass
        elif (f_fin and last_rel & M32 == 1) or (st != RESET and delta_last > 0):
            # (f_fin and last_seq == start_seq + 1, in 32 bits)
            seq_wraps = last64 >> 32
            if seq_one_past < last_seq:              # TCP_Endpoint::UpdateSeq
                seq_wraps += 1
            endpoint.last_rel = ((seq_wraps << 32) | seq_one_past) - start
        elif st == RESET:
            pass
        elif length > 0:
            endpoint.did_rxmit(conn)

        if st == INACTIVE or flags & 0x07:
            do_close, gen_event = self._update_state_machine(
                endpoint, peer, base_seq, ack_seq, length, delta_last, is_orig, flags)
        else:
            # Without SYN/FIN/RST only an INACTIVE endpoint changes state.
            do_close = gen_event = False

        if f_ack:
            reasm = peer.reasm
            # A new reassembler's trim point is 1: only an ack beyond it does anything.
            if reasm is None:
                if rel_ack > 1:
                    peer.reassembler().ack_received(rel_ack)
            elif rel_ack > reasm.trim_seq:
                reasm.ack_received(rel_ack)

        # CheckPIA_FirstPacket (bits are only ever set or swapped: both stay both)
        if not both_seen:
            if is_orig:
                self.first_packet_seen |= ORIG_BIT
            else:
                self.first_packet_seen |= RESP_BIT

        if length > 0 and not f_rst and not seq_underflow:
            payload = pkt.payload
            if len(payload) >= length:
                rel_data_seq = rel_seq + 1 if f_syn else rel_seq
                reasm = endpoint.reasm
                if reasm is None:
                    reasm = endpoint.reassembler()
                if conn.tracker.want_stream:
                    reasm.data_sent(rel_data_seq, bytes(payload[:length]))
                else:
                    reasm.data_len_sent(rel_data_seq, length)  # only lengths matter

        ep_rare = endpoint.rare
        if (ep_rare is not None and ep_rare.FIN_cnt) or endpoint.state >= CLOSED:  # or RESET
            reasm = endpoint.reasm
            if reasm is None:
                endpoint.reassembler().check_eof()
            elif not reasm.did_eof:
                reasm.check_eof()

        if do_close:
            self._connection_closed(endpoint, peer, gen_event)

    @staticmethod
    def _relative_seq(ep: TCPEndpoint, cur: int, last: int, wraps: int) -> tuple[int, bool]:
        """get_relative_seq: (uint64 relative seq, underflow)."""
        d = (cur - last) & M32
        if d & 0x80000000:
            if wraps and cur > last:
                wraps -= 1
        elif d:
            if cur < last:
                wraps += 1
        if wraps == 0:
            d = (cur - ep.start_seq) & M32
            if d & 0x80000000:
                return (d - 0x100000000) & M64, True
            return d, False
        return (((wraps << 32) | cur) - ep.start_seq) & M64, False

    @staticmethod
    def _update_history(conn: Connection, side: int, flags: int, ep: TCPEndpoint,
                        rel_seq: int, length: int) -> None:
        """The letters of a packet with SYN, FIN or RST (`ep` is on `side`)."""
        f_syn = flags & SYN
        f_fin = flags & FIN
        f_rst = flags & RST
        bits = (1 if f_syn else 0) + (1 if f_fin else 0) + (1 if f_rst else 0)
        if bits > 1:
            if f_fin and f_rst:
                _letter(conn, side, HIST_FIN_RST_PKT, "I")
            else:
                _letter(conn, side, HIST_MULTI_FLAG_PKT, "Q")
        elif bits == 1:
            if f_syn:
                code = "H" if flags & ACK else "S"
                if _letter(conn, side, HIST_SYN_PKT, code) and rel_seq != ep.hist_last_SYN:
                    _add_letter(conn, side, code)
                ep.hist_last_SYN = rel_seq
            if f_fin:
                end = (rel_seq + length) & M64
                if _letter(conn, side, HIST_FIN_PKT, "F") and end != ep.hist_last_FIN:
                    _add_letter(conn, side, "F")
                ep.hist_last_FIN = end
            if f_rst:
                if _letter(conn, side, HIST_RST_PKT, "R") and rel_seq != ep.hist_last_RST:
                    _add_letter(conn, side, "R")
                ep.hist_last_RST = rel_seq

    # --- state machine -------------------------------------------------------------------------
    def _update_state_machine(self, ep: TCPEndpoint, peer: TCPEndpoint, base_seq: int,
                              ack_seq: int, length: int, delta_last: int, is_orig: bool,
                              flags: int) -> tuple[bool, bool]:
        st = ep.state
        if st == INACTIVE:
            return self._inactive(ep, peer, base_seq, length, is_orig, flags)
        if st == SYN_SENT or st == SYN_ACK_SENT:
            do_close = gen_event = False
            if flags & FIN:
                ep.set_state(CLOSED)
                do_close = gen_event = True
            if flags & RST:
                ep.set_state(RESET)
                self._connection_reset()
                do_close = True
            return do_close, gen_event
        if st == ESTABLISHED or st == PARTIAL:
            do_close = gen_event = False
            if flags & SYN:
                if st == PARTIAL and peer.state == INACTIVE and not flags & ACK:
                    ep.set_state(SYN_SENT)
            if flags & FIN and not flags & RST:
                ep.set_state(CLOSED)
                if peer.state == RESET and peer.prev_state == CLOSED:
                    peer.set_state(CLOSED)
                do_close = gen_event = True
            if flags & RST:
                ep.set_state(RESET)
                do_close = True
                if peer.state != RESET or peer.prev_state != ESTABLISHED:
                    self._connection_reset()
            return do_close, gen_event
        if st == CLOSED:
            do_close = False
            if flags & RST and ep.peer.state != CLOSED:
                ep.set_state(RESET)
                if not ep.did_close:
                    do_close = True
                if self.tracker.want_reset_timer:  # Zeek: only if connection_reset is handled
                    self._add_extra(self.tracker.current_ts + self.settings.tcp_reset_delay,
                                    self._reset_timer, at_termination=True)
            return do_close, False
        return False, False  # RESET: weirds only

    def _inactive(self, ep: TCPEndpoint, peer: TCPEndpoint, base_seq: int, length: int,
                  is_orig: bool, flags: int) -> tuple[bool, bool]:
        do_close = gen_event = False
        conn = self.conn
        tracker = conn.tracker
        if flags & SYN:
            if is_orig:
                ep.set_state(SYN_ACK_SENT if flags & ACK else SYN_SENT)
                delay = tracker.settings.tcp_attempt_delay
                if delay:
                    when = tracker.current_ts + delay
                    if when == self.expire_at:
                        when = self.expire_at   # share the float (24 B per connection)
                    if self.attempt_at is None:
                        self.attempt_at = when
                        tracker.arm(conn, when)
                    else:   # a second orig SYN after a flip: Zeek has two AttemptTimers
                        self._add_extra(when, self._attempt_timer, at_termination=True)
            else:
                if flags & ACK:
                    pass  # bad_SYN_ack weird only
                elif peer.state == SYN_ACK_SENT and base_seq == ep.start_seq:
                    # SYN/SYN-ACK reversal: flip and establish (spec §3.3).
                    self.is_partial = False
                    conn.flip_roles()
                    peer.set_state(ESTABLISHED)
                    self.first_packet_seen |= ORIG_BIT
                if peer.state == SYN_SENT:
                    peer.set_state(ESTABLISHED)
                ep.set_state(ESTABLISHED)
                if peer.state != PARTIAL:
                    # connection_established, raised by the tracker once it has counted
                    # the packet (a tracker flag: one slot less per connection).
                    tracker.established_pending = conn
        if flags & FIN:
            ep.set_state(CLOSED)
            do_close = gen_event = True
        if flags & RST:
            ep.set_state(RESET)
            is_reject = False
            if is_orig:
                if peer.state == ESTABLISHED:
                    is_reject = True
            elif peer.state == SYN_SENT or peer.state == SYN_ACK_SENT:
                is_reject = True
            do_close = True
            gen_event = not is_reject
        if ep.state == INACTIVE:
            if not is_orig and length == 0 and conn.orig.state == SYN_SENT:
                pass
            elif flags & ACK and peer.state == ESTABLISHED:
                ep.set_state(ESTABLISHED)
                self.is_partial = False
                self.first_packet_seen |= ORIG_BIT if is_orig else RESP_BIT
            else:
                ep.set_state(PARTIAL)
        return do_close, gen_event

    # --- closing -------------------------------------------------------------------------------
    def _connection_closed(self, ep: TCPEndpoint, peer: TCPEndpoint, gen_event: bool) -> None:
        if (ep.reasm or ep.reassembler()).data_pending():
            self.close_deferred = True
            if not self.deferred_gen_event:
                self.deferred_gen_event = gen_event
            return
        # (The properties' logic on the `rare` objects: this runs for every closing side.)
        rare = self.rare
        if rare is not None:
            rare.close_deferred = False
        ep_rare = ep._rare()
        if ep_rare.did_close:
            return
        ep_rare.did_close = True
        peer_rare = peer.rare
        complete = (ep.state == RESET or (peer_rare is not None and peer_rare.did_close)
                    or peer.state == INACTIVE)
        conn = self.conn
        tracker = conn.tracker
        if complete:
            if ep.prev_state != INACTIVE or peer.state != INACTIVE:
                if rare is not None and rare.deferred_gen_event:
                    gen_event = True
                    rare.deferred_gen_event = False
                if gen_event:
                    self.is_active = False  # ConnectionFinished
            self.cancel_timers()
            delay = tracker.settings.tcp_close_delay
            when = self.close_at = conn.last_time + delay if delay else conn.last_time
            tracker.arm(conn, when)
        elif ep.prev_state != INACTIVE:
            # A second ExpireTimer chain, looking for the other side closing too.
            when = conn.last_time + tracker.settings.tcp_session_timer
            if self.expire2_at is None:
                self.expire2_at = when
                tracker.arm(conn, when)
            else:
                self._add_extra(when, self._expire_timer_extra)
        elif tracker.want_partial_close_timer:  # only if connection_partial_close is handled
            self._add_extra(conn.last_time + tracker.settings.tcp_partial_close_delay,
                            self._partial_close_timer)

    def endpoint_eof(self, ep: TCPEndpoint) -> None:
        if self.close_deferred:
            self._connection_closed(ep, ep.peer, self.deferred_gen_event)
            self.close_deferred = False

    # --- summary -------------------------------------------------------------------------------
    @staticmethod
    def conn_state(conn: Connection) -> str:
        """conn_state() of base/protocols/conn/main.zeek for TCP (spec §1.7)."""
        o = conn.orig
        r = conn.resp
        os_ = o.state
        rs = r.state
        o_inactive = os_ == INACTIVE or os_ == PARTIAL
        r_inactive = rs == INACTIVE or rs == PARTIAL
        if rs == RESET:
            if os_ == SYN_SENT or os_ == SYN_ACK_SENT or (
                    os_ == RESET and o.size == 0 and r.size == 0):
                return "REJ"
            if o_inactive:
                return "RSTRH"
            return "RSTR"
        if os_ == RESET:
            if r_inactive:
                return "RSTOS0" if _rstos0_history(conn.history) else "OTH"
            return "RSTO"
        if os_ == CLOSED and rs == CLOSED:
            return "SF"
        if os_ == CLOSED:
            return "SH" if r_inactive else "S2"
        if rs == CLOSED:
            return "SHR" if o_inactive else "S3"
        if os_ == SYN_SENT and rs == INACTIVE:
            return "S0"
        if os_ == ESTABLISHED and rs == ESTABLISHED:
            return "S1"
        return "OTH"


def _rstos0_history(h: str) -> bool:
    """History matches /^\\^?S[^HAFGIQ]*R.*$/."""
    if h.startswith("^"):
        h = h[1:]
    if not h.startswith("S"):
        return False
    for ch in h[1:]:
        if ch == "R":
            return True
        if ch in "HAFGIQ":
            return False
    return False
