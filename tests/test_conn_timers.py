"""Timers in network time, removal paths and termination order (zeek-conn.md §5)."""

from __future__ import annotations

import pytest
from conn_packets import C_ADDR, T0, TcpScript, run_packets, summary, udp_packet
from shuntd.conn.hooks import EngineHooks
from shuntd.conn.settings import EngineSettings
from shuntd.conn.timers import TimerManager


def test_timer_manager_fires_in_time_order_at_or_before_now() -> None:
    tm = TimerManager()
    fired: list[tuple[str, float]] = []
    tm.schedule(10.0, lambda t: fired.append(("b", t)))
    tm.schedule(5.0, lambda t: fired.append(("a", t)))
    tm.schedule(10.0, lambda t: fired.append(("c", t)))
    tm.advance(9.999)
    assert fired == [("a", 9.999)]
    tm.advance(10.0)
    assert fired == [("a", 9.999), ("b", 10.0), ("c", 10.0)]


def test_timer_manager_cancel_and_max_expires() -> None:
    tm = TimerManager(max_expires=2)
    fired: list[int] = []
    handles = [tm.schedule(float(i), lambda t, i=i: fired.append(i)) for i in range(5)]
    handles[1].cancel()
    tm.advance(100.0)
    assert fired == [0, 2]          # at most 2 per advance; the cancelled one is skipped
    tm.advance(100.0)
    assert fired == [0, 2, 3, 4]


def test_expire_all_runs_only_termination_timers() -> None:
    tm = TimerManager()
    fired: list[str] = []
    tm.schedule(50.0, lambda t: fired.append("plain"))
    tm.schedule(60.0, lambda t: fired.append("term"), at_termination=True)
    tm.expire_all()
    assert fired == ["term"]
    assert len(tm) == 0


class _Veto(EngineHooks):
    def __init__(self) -> None:
        self.calls = 0

    def connection_timing_out(self, conn) -> bool:
        self.calls += 1
        return True


def test_case63_timing_out_veto_keeps_connection() -> None:
    s = TcpScript().steps("C S; S SA; C A")
    s.send("C", "D100", at=0.2 + 300.5)
    hooks = _Veto()
    rows = run_packets(s.packets, hooks=hooks)
    assert hooks.calls == 1
    assert [summary(r)[:12] for r in rows] == ["S1 ShAD 100/"]


class _PerService(EngineHooks):
    """Uses the per-service override like Conn::analyzer_inactivity_timeouts does."""

    def connection_established(self, conn) -> None:
        conn.tracker.set_inactivity_timeout(conn, 10.0)


def test_set_inactivity_timeout_override_from_hook() -> None:
    s = TcpScript(**{"s": ("10.0.0.2", 7000)}).steps("C S; S SA; C A")
    s.send("C", "D100", at=0.2 + 10.5)
    rows = run_packets(s.packets, hooks=_PerService())
    assert [summary(r) for r in rows] == ["S1 ShA 0/0 2(80)/1(40)", "OTH D -/- 1(140)/0(0)"]


def test_close_delay_keeps_connection_for_late_packets() -> None:
    # Final ACK 4 s after the second FIN (< tcp_close_delay 5 s): same connection.
    s = TcpScript().steps("C S; S SA; C A; C D100; S A; S D200; C A; C FA; S FA")
    s.send("C", "A", at=0.8 + 4.0)
    assert [summary(r) for r in run_packets(s.packets)] == [
        "SF ShADadFf 100/200 6(340)/4(360)"]
    # With --tcp-close-delay 2 it is removed first; the ACK starts a new connection.
    rows = run_packets(s.packets, EngineSettings(tcp_close_delay=2.0))
    assert [summary(r) for r in rows] == ["SF ShADadFf 100/200 5(300)/4(360)",
                                          "OTH A -/- 1(40)/0(0)"]


def test_attempt_delay_setting() -> None:
    s = TcpScript()
    s.send("C", "S", seq=1000, at=0)
    s.send("C", "S", seq=1000, at=3)
    assert len(run_packets(s.packets)) == 1
    assert len(run_packets(s.packets, EngineSettings(tcp_attempt_delay=2.0))) == 2


def test_termination_flushes_attempts_first_then_key_order() -> None:
    # Established connection to .9 (key sorts after), then an attempt to .3: at the end the
    # attempt (AttemptTimer, do_expire) is logged before the drained connections, which
    # follow in raw session-key order.
    pkts = TcpScript(s=("10.0.0.9", 80)).steps("C S; S SA; C A").packets
    pkts += TcpScript(s=("10.0.0.8", 80), t=T0 + 1).steps("C S; S SA").packets
    pkts += TcpScript(s=("10.0.0.3", 80), t=T0 + 2).steps("C S").packets
    pkts.append(udp_packet(C_ADDR, 5555, "10.0.0.2", 5000, b"x", T0 + 2.5))
    rows = run_packets(pkts)
    assert [(r["id.resp_h"], r["conn_state"]) for r in rows] == [
        ("10.0.0.3", "S0"), ("10.0.0.2", "S0"), ("10.0.0.8", "S1"), ("10.0.0.9", "S1")]


def test_termination_key_order_across_families_ports_and_protocols() -> None:
    # Zeek's raw key: both addresses as 16 bytes (IPv4 mapped to ::ffff:a.b.c.d), the lower
    # one first, then their ports (big-endian), then the protocol: a 2001:db8:: pair sorts
    # after every IPv4 pair (0x20.. > 0x00..); equal pairs go by port, then by protocol.
    pkts = [
        udp_packet("2001:db8::1", 5000, "2001:db8::2", 53, b"a", T0),
        udp_packet("10.0.0.1", 7000, "10.0.0.2", 53, b"b", T0 + 0.1),
        udp_packet("10.0.0.1", 6000, "10.0.0.2", 53, b"c", T0 + 0.2),
        udp_packet("10.0.0.1", 6000, "10.0.0.2", 54, b"d", T0 + 0.3),
        udp_packet("9.0.0.1", 9000, "10.0.0.2", 53, b"e", T0 + 0.4),
    ]
    pkts += TcpScript(c=("10.0.0.1", 6000), s=("10.0.0.2", 53), t=T0 + 0.5).steps(
        "C S; S SA; C A").packets
    rows = run_packets(pkts)
    assert [(r["id.orig_h"], r["id.orig_p"], r["id.resp_p"], r["proto"]) for r in rows] == [
        ("9.0.0.1", 9000, 53, "udp"),
        ("10.0.0.1", 6000, 53, "tcp"),
        ("10.0.0.1", 6000, 53, "udp"),
        ("10.0.0.1", 6000, 54, "udp"),
        ("10.0.0.1", 7000, 53, "udp"),
        ("2001:db8::1", 5000, 53, "udp"),
    ]


@pytest.mark.parametrize(("proto_timeout", "field"), [
    (30.0, "udp_inactivity_timeout")])
def test_udp_timeout_setting(proto_timeout: float, field: str) -> None:
    pkts = [udp_packet(C_ADDR, 40000, "10.0.0.2", 5000, b"a", T0),
            udp_packet(C_ADDR, 40000, "10.0.0.2", 5000, b"b", T0 + 45)]
    assert len(run_packets(pkts)) == 1
    assert len(run_packets(pkts, EngineSettings(**{field: proto_timeout}))) == 2


class _ResetHandler(EngineHooks):
    """Like a Zeek script handling connection_reset: that arms the TCP ResetTimer."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def connection_reset(self, conn) -> None:
        self.calls.append(round(conn.tracker.network_time - T0, 3))


def _fin_then_rst() -> TcpScript:
    # C closes (FIN at 0.3, S still open), then resets from CLOSED at 2.0 (Zeek's
    # UpdateClosedState: ResetTimer at 2.0 + tcp_reset_delay when connection_reset is
    # handled). S keeps ACKing at 6.0 and 7.5.
    s = TcpScript().steps("C S; S SA; C A; C FA")
    s.send("C", "R", at=2.0)
    s.send("S", "A", at=6.0)
    s.send("S", "A", at=7.5)
    return s


def test_reset_timer_only_with_a_connection_reset_handler() -> None:
    s = _fin_then_rst()
    # No handler (Zeek's default scripts): no ResetTimer. The expire checks (5.0 -> 6.0,
    # the half-close chain 6.3 -> 7.5) find last_time + 5 s not yet passed: one connection.
    rows = run_packets(s.packets)
    assert [summary(r) for r in rows] == ["RSTO ShAFRa 0/0 4(160)/3(120)"]
    # With a handler the ResetTimer (due 7.0) fires at the 7.5 packet, before it is
    # processed: connection_reset, removal; the ACK at 7.5 is a new connection.
    hooks = _ResetHandler()
    rows = run_packets(s.packets, hooks=hooks)
    assert hooks.calls == [7.5]
    assert [summary(r) for r in rows][0] == "RSTO ShAFRa 0/0 4(160)/2(80)"
    assert len(rows) == 2 and rows[0]["duration"] == pytest.approx(6.0)


def test_reset_delay_setting() -> None:
    # --tcp-reset-delay 5.6: due at 7.6, after the last packet: the ResetTimer is a
    # termination timer (do_expire), so it still fires at the end, with one connection.
    hooks = _ResetHandler()
    rows = run_packets(_fin_then_rst().packets, EngineSettings(tcp_reset_delay=5.6),
                       hooks=hooks)
    assert [summary(r) for r in rows] == ["RSTO ShAFRa 0/0 4(160)/3(120)"]
    assert hooks.calls == [7.5]


class _PartialCloseHandler(EngineHooks):
    def __init__(self) -> None:
        self.calls = 0

    def connection_partial_close(self, conn) -> None:
        self.calls += 1


def _fin_first() -> TcpScript:
    # Midstream: S sends data (first packet, flipped: S is the responder), then C's first
    # packet is a FIN, from INACTIVE, while S is active and open: a partial close (Zeek's
    # ConnectionClosed: PartialCloseTimer at last_time + tcp_partial_close_delay when
    # connection_partial_close is handled, else no extra timer at all).
    s = TcpScript()
    s.send("S", "D100", at=0.0)
    s.send("C", "FA", at=0.1)
    s.send("S", "D100", at=3.5)
    return s


def test_partial_close_timer_only_with_a_handler() -> None:
    s = _fin_first()
    rows = run_packets(s.packets)
    assert [summary(r) for r in rows] == ["SH ^dF 0/200 1(40)/2(280)"]
    hooks = _PartialCloseHandler()
    rows = run_packets(s.packets, hooks=hooks)
    assert hooks.calls == 1
    assert [summary(r) for r in rows][0] == "SH ^dF 0/100 1(40)/1(140)"
    assert len(rows) == 2


def test_partial_close_delay_setting() -> None:
    # Due at 0.1 + 4 = 4.1, after the 3.5 packet; a partial-close timer does not act at
    # termination (Zeek schedules it without do_expire): one connection, no event.
    hooks = _PartialCloseHandler()
    rows = run_packets(_fin_first().packets, EngineSettings(tcp_partial_close_delay=4.0),
                       hooks=hooks)
    assert len(rows) == 1 and hooks.calls == 0


def test_one_timer_entry_per_connection() -> None:
    # The connection's checks (inactivity, expire chain, attempt) share one deadline.
    from shuntd.conn.tracker import ConnTracker
    tracker = ConnTracker(EngineSettings())
    for pkt in TcpScript().steps("C S; S SA; C A; C D100").packets:
        tracker.process(pkt)
    (conn,) = tracker.conns.values()
    live = list(tracker.timers.pending())
    assert len(live) == 1 and live[0][2] is conn
    assert live[0][0] == pytest.approx(T0 + 5.0)   # the first ExpireTimer check


def test_half_close_starts_a_second_expire_chain() -> None:
    # C closes at 4.0 while S is open (incomplete close: Zeek adds an ExpireTimer at
    # last_time + tcp_session_timer = 10.0 besides the periodic one: 5.0, then 11.0), then
    # resets at 4.1. UDP packets elsewhere move the clock. At 10.5 the half-close check
    # finds C closed and reset and idle for > tcp_connection_linger: removed, so S's ACK at
    # 10.7 starts a new connection (the periodic check alone would wait until 11.0).
    s = TcpScript().steps("C S; S SA; C A")
    s.send("C", "FA", at=4.0)
    s.send("C", "R", at=4.1)
    pkts = s.packets
    pkts.append(udp_packet(C_ADDR, 5555, "10.0.0.7", 5000, b"x", T0 + 5.0))
    pkts.append(udp_packet(C_ADDR, 5555, "10.0.0.7", 5000, b"y", T0 + 10.5))
    s2 = TcpScript()
    s2.nxt = dict(s.nxt)
    s2.send("S", "A", at=10.7)
    pkts += s2.packets
    rows = [r for r in run_packets(pkts) if r["proto"] == "tcp"]
    assert [summary(r) for r in rows][0] == "RSTO ShAFR 0/0 4(160)/1(40)"
    assert rows[0]["duration"] == pytest.approx(4.1)
    assert len(rows) == 2


def test_deadlines_and_timers_keep_scheduling_order_across_slots() -> None:
    # Later timers wait in per-slot dicts without a sequence number (timers.py); equal due
    # times must still fire in scheduling order, whether set before or after the clock
    # reached their slot, and a re-set deadline goes behind what was scheduled meanwhile.
    fired: list[str] = []
    tm = TimerManager(on_deadline=lambda owner, t: fired.append(owner))
    tm.set_deadline("A", 20.0)
    tm.schedule(20.0, lambda t: fired.append("T"))
    tm.set_deadline("B", 20.0)
    tm.clear_deadline("A", 20.0)
    tm.set_deadline("A", 20.0)
    tm.advance(19.99)                      # another slot: nothing due, nothing moved
    assert fired == []
    tm.set_deadline("C", 20.1)             # the slot of 20.0 .. 20.125
    tm.advance(20.0)                       # reaches it: A, T, B, C move to the heap
    assert fired == ["T", "B", "A"]
    tm.schedule(20.1, lambda t: fired.append("U"))   # straight into the heap, after C
    tm.set_deadline("D", 20.1)
    tm.clear_deadline("C", 20.1)
    tm.set_deadline("C", 20.1)
    tm.advance(20.1)
    assert fired == ["T", "B", "A", "U", "D", "C"]


def _random_timer_run(seed: int) -> tuple[list, list]:
    """(fired, expected) for random schedules, cancels, deadline moves and clock steps;
    expected from a reference: one list sorted by (due time, scheduling order), at most
    max_expires fired per advance."""
    import random

    rnd = random.Random(seed)
    max_expires = rnd.choice([2, 300])
    got: list[tuple[str, float]] = []
    tm = TimerManager(max_expires, on_deadline=lambda o, t: got.append((o, t)))
    ref: list[tuple[float, int, str]] = []   # (when, seq, name) pending
    want: list[tuple[str, float]] = []
    handles: dict[str, object] = {}
    deadlines: dict[str, float] = {}
    now = 100.0
    for n in range(250):
        op = rnd.random()
        when = round(now + rnd.choice([0, 0.05, 0.125, 0.3, 1.0, 2.5, -0.2]), 3)
        if op < 0.3:
            name = f"t{n}"
            handles[name] = tm.schedule(when, lambda t, name=name: got.append((name, t)))
            ref.append((when, n, name))
        elif op < 0.6:
            name = f"d{rnd.randrange(8)}"
            if name in deadlines:
                tm.clear_deadline(name, deadlines[name])
                ref = [e for e in ref if e[2] != name]
            tm.set_deadline(name, when)
            deadlines[name] = when
            ref.append((when, n, name))
        elif op < 0.7 and handles:
            name = rnd.choice(sorted(handles))
            tm.cancel(handles.pop(name))   # type: ignore[arg-type]
            ref = [e for e in ref if e[2] != name]
        else:
            now = round(now + rnd.choice([0, 0.01, 0.125, 0.5, 2.0]), 3)
            tm.advance(now)
            ref.sort()
            due = [e for e in ref if e[0] <= now][:max_expires]
            ref = ref[len(due):]
            want += [(name, now) for _w, _s, name in due]
            for _w, _s, name in due:
                handles.pop(name, None)
                deadlines.pop(name, None)
    return got, want


def test_timer_manager_matches_one_priority_queue() -> None:
    for seed in range(60):
        got, want = _random_timer_run(seed)
        assert len(want) > 50 and got == want, f"seed {seed}"
