"""EventDispatcher end to end: hand-built packets -> decoder -> real ConnTracker -> events.

Expected orders and outcomes come from spec zeek-conn.md §5.2, §6, §7 and §10.5.
"""

from __future__ import annotations

import logging
import types

import pytest
from conn_packets import S_ADDR, T0, TcpScript, run_packets, udp_packet
from e3_payloads import (
    CCS,
    HTTP_REPLY,
    HTTP_REQUEST,
    client_hello,
    dns_response,
    encrypted_handshake,
    handshake,
    server_hello,
    tls_record,
)
from shuntd import policy
from shuntd.events import EVENTS, EventDispatcher
from shuntd.policy import PolicyError
from shuntd.shunting import ShuntManager


def tls12_session(port: int = 443) -> TcpScript:
    s = TcpScript(s=(S_ADDR, port))
    s.steps("C S; S SA; C A")
    s.send("C", "A", data=tls_record(22, client_hello(), 0x0301))             # 3
    s.send("S", "A", data=tls_record(22, server_hello() + handshake(14, b"")))  # 4
    s.send("C", "A", data=tls_record(22, handshake(16, b"\x01" * 33)) + CCS
           + encrypted_handshake())                                           # 5
    s.send("S", "A", data=CCS + encrypted_handshake())                        # 6
    s.steps("C FA; S FA; C A")
    return s


class Recorder:
    """Handlers for every event, recording (event, packet time, detail)."""

    def __init__(self, dispatcher: EventDispatcher) -> None:
        self.seen: list[tuple[str, float, object]] = []
        for name in EVENTS:
            dispatcher.add_handler(name, self._make(name))

    def _make(self, name: str):
        def handler(conn, *args):
            self.seen.append((name, round(conn.last_time - T0, 3), args[0] if args else None))
        return handler

    def names(self) -> list[str]:
        return [n for n, _t, _a in self.seen]


def test_tls_session_event_order_and_ssl_established_time() -> None:
    d = EventDispatcher()
    rec = Recorder(d)
    rows = run_packets(tls12_session().packets, hooks=d)
    assert [r["service"] for r in rows] == ["ssl"]
    assert rec.names() == ["new_connection", "connection_established", "analyzer_confirmation",
                           "ssl_established", "connection_state_remove", "connection_logged"]
    times = {n: t for n, t, _a in rec.seen}
    assert times["analyzer_confirmation"] == 0.3      # the ClientHello packet
    assert times["ssl_established"] == 0.6            # the server's encrypted Finished


def test_http_request_reply_through_tracker() -> None:
    s = TcpScript(s=(S_ADDR, 8080))
    s.steps("C S; S SA; C A")
    s.send("C", "A", data=HTTP_REQUEST).send("S", "A", data=HTTP_REPLY)
    s.steps("C FA; S FA; C A")
    rows = run_packets(s.packets, hooks=EventDispatcher())
    assert rows[0]["service"] == "http"


def test_add_handlers_from_module_object_and_mapping() -> None:
    calls: list[str] = []
    module = types.ModuleType("policy_under_test")
    module.new_connection = lambda conn: calls.append("module")
    module.helper = lambda conn: calls.append("not an event")

    class Obj:
        def ssl_established(self, conn):
            calls.append("object")

    d = EventDispatcher()
    assert d.add_handlers(module) == ["new_connection"]
    assert d.add_handlers(Obj()) == ["ssl_established"]
    assert d.add_handlers({"connection_state_remove": lambda c: calls.append("map")}) == \
        ["connection_state_remove"]
    run_packets(tls12_session().packets, hooks=d)
    assert calls == ["module", "object", "map"]


def test_raising_handler_is_logged_once_and_disabled(caplog) -> None:
    d = EventDispatcher()
    later: list[str] = []

    def broken(conn):
        raise RuntimeError("policy bug")

    d.add_handler("new_connection", broken)
    d.add_handler("new_connection", lambda conn: later.append(conn.uid))
    packets = tls12_session().packets + TcpScript(c=("10.0.0.3", 40001)).steps(
        "C S; S SA; C A").packets
    with caplog.at_level(logging.ERROR, logger="shuntd.events"):
        rows = run_packets(packets, hooks=d)
    assert len(rows) == 2                               # the engine carried on
    assert len(later) == 2                              # the other handler still ran
    errors = [r for r in caplog.records if "policy bug" in (r.exc_text or "")]
    assert len(errors) == 1                             # logged once, then disabled


def test_policy_actions_reach_the_dispatchers_target_only_inside_handlers(caplog) -> None:
    # The live daemon's target (ShuntManager) for the thresholds the bulk policy sets: a
    # handler that sets 3 packets (both directions) and then raises is disabled, but its
    # thresholds stand. C S, S SA, C A, C D10, S D10, C FA, S FA, C A at 0.1 s steps: the
    # originator's 3rd packet is D10 @0.3, the responder's 3rd is FA @0.6.
    d = EventDispatcher()
    d.actions = ShuntManager(None, None, d, lambda row: None)
    conns: list = []
    seen: list[tuple] = []

    def broken(conn):
        conns.append(conn)
        assert policy.set_packets_threshold(conn, 3)
        raise RuntimeError("policy bug")

    d.add_handler("new_connection", broken)
    d.add_handler("packets_threshold_crossed", lambda conn, thr, is_orig: seen.append(
        (thr, is_orig, round(conn.last_time - T0, 3))))
    packets = TcpScript().steps("C S; S SA; C A; C D10; S D10; C FA; S FA; C A").packets
    with caplog.at_level(logging.ERROR, logger="shuntd.events"):
        run_packets(packets, hooks=d)
    assert seen == [(3, True, 0.3), (3, False, 0.6)]
    assert d.dispatch("new_connection", conns[0]) == []     # disabled
    with pytest.raises(PolicyError, match="only be called from an event handler"):
        policy.set_packets_threshold(conns[0], 3)
    with pytest.raises(PolicyError):
        policy.shunt(conns[0], "test")


def test_acting_block_and_dispatch_inside_it_restore_the_target() -> None:
    # `with acting(x)` makes x the target; a dispatch inside it swaps in the dispatcher's own
    # target for its handlers and puts x back; after the block nothing is listening. Which
    # target acted shows in whose handler fires for a bytes threshold already crossed (the
    # SYN and the SYN-ACK are 40 IP bytes each).
    seen: list[tuple] = []
    d, outer = EventDispatcher(), EventDispatcher()
    for name, disp in (("d", d), ("outer", outer)):
        disp.actions = ShuntManager(None, None, disp, lambda row: None)
        disp.add_handler("bytes_threshold_crossed", lambda c, thr, is_orig, name=name:
                         seen.append((name, thr, is_orig)))
    conns: list = []
    d.add_handler("new_connection", conns.append)
    run_packets(TcpScript().steps("C S; S SA").packets, hooks=d)
    conn = conns[0]
    d.add_handler("connection_flipped", lambda c: policy.set_bytes_threshold(c, 40, False))
    with policy.acting(outer.actions):
        policy.set_bytes_threshold(conn, 40, True)
        d.dispatch("connection_flipped", conn)
        policy.set_bytes_threshold(conn, 30, True)
    with pytest.raises(PolicyError):
        policy.set_bytes_threshold(conn, 20, True)
    assert seen == [("outer", 40, True), ("d", 40, False), ("outer", 30, True)]


def _timeout_case() -> list:
    # spec §10.5 #61/#63: C S; S SA; C A @t; C D100 @t+300.5 (port 80)
    s = TcpScript()
    s.steps("C S; S SA")
    s.send("C", "A", at=1.0)
    s.send("C", "D100", at=301.5)
    return s.packets


def test_connection_timing_out_without_veto_splits() -> None:
    rows = run_packets(_timeout_case(), hooks=EventDispatcher())
    assert len(rows) == 2


def test_connection_timing_out_veto_keeps_one_connection() -> None:
    d = EventDispatcher()
    vetoes: list[float] = []

    def connection_timing_out(conn):
        vetoes.append(conn.last_time - T0)
        return True

    d.add_handler("connection_timing_out", connection_timing_out)
    rows = run_packets(_timeout_case(), hooks=d)
    assert len(rows) == 1
    assert rows[0]["history"] == "ShAD"
    assert vetoes == [1.0]                  # asked once, when the 5-min timer fired


def test_timing_out_hook_vetoes_for_its_connection_before_the_handlers() -> None:
    """A timing-out hook (the shunt manager's, on the connections it shunts) is asked before
    the event's handlers, which are asked too; its veto keeps the connection."""
    d = EventDispatcher()
    order: list[str] = []

    def hook(conn):
        order.append("hook")
        return True

    d.add_handler("new_connection", lambda c: order.append(
        f"registered={d.register_timing_out_hook(c, hook)},"
        f"again={d.register_timing_out_hook(c, hook)}"))
    d.add_handler("connection_timing_out", lambda c: order.append("handler") or False)
    rows = run_packets(_timeout_case(), hooks=d)
    assert len(rows) == 1                   # kept, as with a handler's veto
    assert order == ["registered=True,again=False", "hook", "handler"]


def test_removal_hook_runs_after_state_remove_and_before_logging() -> None:
    d = EventDispatcher()
    order: list[str] = []

    def hook(conn):
        order.append("removal_hook")
        conn.service.append("hooked")       # a removal hook may still change the record

    d.add_handler("new_connection", lambda c: order.append(
        f"registered={d.register_removal_hook(c, hook)},again={d.register_removal_hook(c, hook)}"))
    d.add_handler("connection_state_remove", lambda c: order.append("state_remove"))
    d.add_handler("connection_logged", lambda c, row: order.append(f"logged:{row[7]}"))
    run_packets(tls12_session().packets, hooks=d)
    assert order == ["registered=True,again=False", "state_remove", "removal_hook",
                     "logged:ssl,hooked"]


def test_dns_response_from_originator_flips_roles() -> None:
    # Both ports 53 (likely): no first-packet flip; a response (QR=1) from the orig flips.
    pkt = udp_packet("10.0.0.1", 53, "10.0.0.2", 53, dns_response(), T0)
    rows = run_packets([pkt], hooks=EventDispatcher())
    assert len(rows) == 1
    assert rows[0]["id.orig_h"] == "10.0.0.2"
    assert "^" in rows[0]["history"]
    assert rows[0]["service"] == "dns"


def test_dns_response_to_multicast_does_not_flip() -> None:
    pkt = udp_packet("10.0.0.1", 5353, "224.0.0.251", 5353, dns_response(), T0)
    rows = run_packets([pkt], hooks=EventDispatcher())
    assert rows[0]["id.orig_h"] == "10.0.0.1"
    assert rows[0]["service"] == "dns"
