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


@pytest.mark.parametrize(("proto_timeout", "field"), [
    (30.0, "udp_inactivity_timeout")])
def test_udp_timeout_setting(proto_timeout: float, field: str) -> None:
    pkts = [udp_packet(C_ADDR, 40000, "10.0.0.2", 5000, b"a", T0),
            udp_packet(C_ADDR, 40000, "10.0.0.2", 5000, b"b", T0 + 45)]
    assert len(run_packets(pkts)) == 1
    assert len(run_packets(pkts, EngineSettings(**{field: proto_timeout}))) == 2
