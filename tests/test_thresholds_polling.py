"""ConnThreshold and ConnPolling against the spec text (zeek-conn.md §7), through the tracker.

Every TCP packet of TcpScript has 20+20 header bytes, so IP bytes = 40 + payload (spec §10).
"""

from __future__ import annotations

import logging

from conn_packets import T0, TcpScript, run_packets
from shuntd.events import EventDispatcher


def _session() -> list:
    """C S @0; S SA @0.1; C A @0.2; C D100 @1.0; S D50 @1.1; C A @1.2; C FA @1.3; S FA @1.4"""
    s = TcpScript()
    s.send("C", "S", at=0.0).send("S", "SA", at=0.1).send("C", "A", at=0.2)
    s.send("C", "D100", at=1.0).send("S", "D50", at=1.1).send("C", "A", at=1.2)
    s.send("C", "FA", at=1.3).send("S", "FA", at=1.4)
    return s.packets


def _crossings(setup) -> list[tuple]:
    d = EventDispatcher()
    seen: list[tuple] = []
    for kind in ("bytes", "packets", "duration"):
        d.add_handler(f"{kind}_threshold_crossed",
                      lambda c, thr, is_orig, k=kind: seen.append(
                          (k, thr, is_orig, round(c.last_time - T0, 3))))
    d.add_handler("generic_packet_threshold_crossed",
                  lambda c, n: seen.append(("generic", n, None, round(c.last_time - T0, 3))))
    d.add_handler("new_connection", lambda c: setup(d, c))
    run_packets(_session(), hooks=d)
    return seen


def test_bytes_threshold_is_ip_bytes_and_inclusive() -> None:
    # orig IP bytes: 40 @0, 80 @0.2, 220 @1.0 -> 80 fires at the ACK (>=), 120 at the data.
    def setup(d, c):
        assert d.set_bytes_threshold(c, 120, True)
        assert d.set_bytes_threshold(c, 80, True)
        assert d.set_bytes_threshold(c, 90, False)     # resp: 40 @0.1, 130 @1.1
    assert _crossings(setup) == [("bytes", 80, True, 0.2), ("bytes", 120, True, 1.0),
                                 ("bytes", 90, False, 1.1)]


def test_one_packet_crossing_two_thresholds_fires_both_ascending() -> None:
    def setup(d, c):
        d.set_bytes_threshold(c, 200, True)
        d.set_bytes_threshold(c, 100, True)
    assert _crossings(setup) == [("bytes", 100, True, 1.0), ("bytes", 200, True, 1.0)]


def test_a_threshold_set_twice_fires_once() -> None:
    # Zeek keeps pending thresholds in sets: the bulk policy sets its byte thresholds again when
    # the second direction crosses its packets threshold. orig IP bytes reach 80 @0.2, 220 @1.0.
    def setup(d, c):
        d.set_bytes_threshold(c, 200, True)
        d.set_bytes_threshold(c, 80, True)
        d.set_bytes_threshold(c, 200, True)
        d.set_bytes_threshold(c, 80, True)
        d.set_packets_threshold(c, 2, True)
        d.set_packets_threshold(c, 2, True)
    assert _crossings(setup) == [("bytes", 80, True, 0.2), ("packets", 2, True, 0.2),
                                 ("bytes", 200, True, 1.0)]


def test_packets_threshold_per_direction() -> None:
    def setup(d, c):
        d.set_packets_threshold(c, 1, False)      # the SYN-ACK
        d.set_packets_threshold(c, 3, True)       # C S, C A, C D100
    assert _crossings(setup) == [("packets", 1, False, 0.1), ("packets", 3, True, 1.0)]


def test_several_of_one_kind_and_deletes() -> None:
    # orig packets: S @0, A @0.2, D100 @1.0, A @1.2, FA @1.3
    def setup(d, c):
        for n in (5, 2, 3, 4):
            assert d.set_packets_threshold(c, n, True)
        assert d.thresholds.delete_packets_threshold(c, 2, True)      # the smallest pending
        assert d.thresholds.delete_packets_threshold(c, 4, True)      # a later one
        assert not d.thresholds.delete_packets_threshold(c, 4, True)  # gone already
        assert not d.thresholds.delete_packets_threshold(c, 3, False)  # other direction
        assert not d.thresholds.delete_bytes_threshold(c, 100, True)
    assert _crossings(setup) == [("packets", 3, True, 1.0), ("packets", 5, True, 1.3)]


def test_bulk_shape_bytes_thresholds_set_when_packets_cross() -> None:
    # The bulk policy's shape: a packets threshold per direction, bytes thresholds set by the
    # crossing handler (orig IP bytes 220 @1.0, 300 @1.4; resp 40 @0.1, 130 @1.1, 170 @1.4).
    def setup(d, c):
        d.set_packets_threshold(c, 3, True)
        d.set_packets_threshold(c, 3, False)
        d.add_handler("packets_threshold_crossed", lambda conn, thr, is_orig: (
            d.set_bytes_threshold(conn, 200, True), d.set_bytes_threshold(conn, 60, False)))
    assert _crossings(setup) == [
        ("packets", 3, True, 1.0), ("bytes", 200, True, 1.0),   # already crossed: at once
        ("bytes", 60, False, 1.1),
        ("packets", 3, False, 1.4), ("bytes", 200, True, 1.4), ("bytes", 60, False, 1.4)]


def test_both_directions_on_new_connections_stay_per_connection() -> None:
    # set_packets_thresholds (the bulk policy's: both directions) on three sessions, B 0.03 s
    # and C 0.06 s behind A. Each: orig 3rd packet D100 @1.0, resp 3rd packet FA @1.4.
    # A alone also gets an orig bytes threshold at its handshake's ACK (IP bytes sent: 80
    # @0.2, 220 @1.0), which fires on D100 before the packets one. B crosses before C: each
    # must cross on its own packets, and only A has a bytes crossing.
    sessions = [TcpScript(c=(f"10.0.0.{i + 1}", 40000 + i)).steps("") for i in range(3)]
    for s, off in zip(sessions, (0.0, 0.03, 0.06), strict=True):
        for who, code, at in (("C", "S", 0.0), ("S", "SA", 0.1), ("C", "A", 0.2),
                              ("C", "D100", 1.0), ("S", "D50", 1.1), ("C", "A", 1.2),
                              ("C", "FA", 1.3), ("S", "FA", 1.4)):
            s.send(who, code, at=at + off)
    packets = sorted((p for s in sessions for p in s.packets), key=lambda p: p.ts)
    d = EventDispatcher()
    conns: list = []
    seen: list[tuple] = []

    def new(c):
        assert d.set_packets_thresholds(c, 3)
        conns.append(c)

    def established(c):
        if conns.index(c) == 0:
            d.set_bytes_threshold(c, 200, True)

    def crossed(kind):
        return lambda c, thr, is_orig: seen.append(
            ("ABC"[conns.index(c)], kind, thr, is_orig, round(c.last_time - T0, 3)))

    d.add_handler("new_connection", new)
    d.add_handler("connection_established", established)
    d.add_handler("packets_threshold_crossed", crossed("packets"))
    d.add_handler("bytes_threshold_crossed", crossed("bytes"))
    run_packets(packets, hooks=d)
    assert seen == [("A", "bytes", 200, True, 1.0), ("A", "packets", 3, True, 1.0),
                    ("B", "packets", 3, True, 1.03), ("C", "packets", 3, True, 1.06),
                    ("A", "packets", 3, False, 1.4), ("B", "packets", 3, False, 1.43),
                    ("C", "packets", 3, False, 1.46)]


def test_both_directions_when_one_has_crossed_already() -> None:
    # Set at the handshake's ACK @0.2: orig has sent 2 (S, A), resp 1 (SA): orig fires at
    # once, resp at its 2nd packet, D50 @1.1.
    d = EventDispatcher()
    seen: list[tuple] = []
    d.add_handler("connection_established", lambda c: d.set_packets_thresholds(c, 2))
    d.add_handler("packets_threshold_crossed", lambda c, thr, is_orig: seen.append(
        (thr, is_orig, round(c.last_time - T0, 3))))
    run_packets(_session(), hooks=d)
    assert seen == [(2, True, 0.2), (2, False, 1.1)]


def test_both_directions_with_generic_thresholds() -> None:
    # generic 4 = the 4th packet of the connection (D100 @1.0), after that packet's
    # direction check (orig's 3rd packet): both at 1.0; resp's 3rd packet FA @1.4.
    def setup(d, c):
        d.set_packets_thresholds(c, 3)
    d = EventDispatcher(generic_packet_thresholds=[4])
    seen: list[tuple] = []
    d.add_handler("packets_threshold_crossed", lambda c, thr, is_orig: seen.append(
        ("packets", thr, is_orig, round(c.last_time - T0, 3))))
    d.add_handler("generic_packet_threshold_crossed", lambda c, n: seen.append(
        ("generic", n, None, round(c.last_time - T0, 3))))
    d.add_handler("new_connection", lambda c: setup(d, c))
    run_packets(_session(), hooks=d)
    assert seen == [("packets", 3, True, 1.0), ("generic", 4, None, 1.0),
                    ("packets", 3, False, 1.4)]


def test_threshold_already_crossed_fires_immediately() -> None:
    d = EventDispatcher()
    seen: list[str] = []
    d.add_handler("bytes_threshold_crossed", lambda c, thr, o: seen.append(f"fired {thr}"))

    def established(c):
        seen.append("before set")
        d.set_bytes_threshold(c, 40, True)        # orig already sent 40 (the SYN)
        seen.append("after set")

    d.add_handler("connection_established", established)
    run_packets(_session(), hooks=d)
    assert seen == ["before set", "fired 40", "after set"]


def test_zero_threshold_rejected() -> None:
    def setup(d, c):
        assert not d.set_bytes_threshold(c, 0, True)
        assert not d.set_packets_threshold(c, 0, False)
        assert not d.set_duration_threshold(c, 0)
    assert _crossings(setup) == []


def test_duration_threshold_is_strict_and_needs_a_packet() -> None:
    # 1.0 s: the packet at exactly 1.0 does not cross (not >), the one at 1.1 does.
    def setup(d, c):
        d.set_duration_threshold(c, 1.0)
    assert _crossings(setup) == [("duration", 1.0, True, 1.1)]


def test_generic_packet_thresholds_on_equality() -> None:
    d = EventDispatcher(generic_packet_thresholds=[4, 2])
    seen: list[tuple] = []
    d.add_handler("generic_packet_threshold_crossed",
                  lambda c, n: seen.append((n, round(c.last_time - T0, 3))))
    run_packets(_session(), hooks=d)
    assert seen == [(2, 0.1), (4, 1.0)]


# -- ConnPolling ---------------------------------------------------------------------------

def test_polling_in_network_time_until_negative() -> None:
    d = EventDispatcher()
    calls: list[tuple] = []

    def poll(conn, cnt):
        calls.append((cnt, round(conn.tracker.timers.now - T0, 3)))
        return 0.5 if cnt < 3 else -1

    d.add_handler("new_connection", lambda c: d.watch(c, poll, 1, 0.4))
    # due at 0.4 -> runs at the first packet at/after it (1.0); then 1.0+0.5=1.5 -> none
    # before the trace ends (1.4) -> run once at termination, no re-arm.
    run_packets(_session(), hooks=d)
    assert calls == [(1, 1.0), (2, 1.4)]


def test_polling_stops_for_removed_connection() -> None:
    d = EventDispatcher()
    calls: list[int] = []
    d.add_handler("new_connection", lambda c: d.watch(c, lambda conn, cnt: calls.append(cnt)
                                                      or 1.0, 1, 60.0))
    packets = _session()
    # a later packet of another connection, 100 s after the close: the first connection is
    # removed (close delay 5 s) before its poll is due at 60 s.
    late = TcpScript(c=("10.0.0.3", 40001))
    late.send("C", "S", at=100.0).send("S", "SA", at=100.1).send("C", "A", at=100.2)
    rows = run_packets(packets + late.packets, hooks=d)
    assert len(rows) == 2
    assert calls == [1]          # only the second (still open) connection's poll, run at
    #                              termination; the first was gone when its poll came due


def test_raising_poll_stops_quietly(caplog) -> None:
    d = EventDispatcher()
    calls: list[int] = []

    def poll(conn, cnt):
        calls.append(cnt)
        raise ValueError("poll bug")

    d.add_handler("new_connection", lambda c: d.watch(c, poll, 1, 0.1))
    with caplog.at_level(logging.ERROR):
        rows = run_packets(_session(), hooks=d)
    assert calls == [1] and len(rows) == 1
    assert any("poll bug" in (r.exc_text or "") for r in caplog.records)
