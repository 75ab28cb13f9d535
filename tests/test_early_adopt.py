"""Early shunts, the daemon's side, on the real XDP program and maps (BPF_PROG_TEST_RUN, ring
buffer, no interface): an entry with SHUNT_F_EARLY and the `ssl` trigger code is put in the
`flows` map from user space as XDP makes it (counters 0, tcp[] = each side's next seq and
highest ack at the handshake's last packet), then the engine with the shipped `tls` policy
analyses the session up to that packet: the policy's shunt adopts the entry (no second entry),
XDP drops the rest, and the counters reach conn.log and one shunt.log row. Also: an entry of
another trigger is left alone; an EARLY ring event not adopted within its margin is adopted
anyway (TLS) or ended (not TLS); an early entry nobody adopted is logged as orphaned when its
lease runs out (the LEASE_EXPIRED event XDP writes) or at shutdown; the config switch (the
dead-man switch) follows the policies' EARLY_SHUNT declaration."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from e3_payloads import (
    CCS,
    appdata,
    client_hello,
    encrypted_handshake,
    handshake,
    server_hello,
    tls_record,
)
from lab import is_root

pytestmark = pytest.mark.skipif(not is_root(), reason="needs root (BPF)")

A, B = "10.0.0.1", "10.0.0.2"   # A < B: the client is side 1 of the flow key
CLIENT, SERVER = 40000, 443
C0, S0 = 1000, 5000

# A TLS 1.2 session: the analyser raises ssl_established on the server's Finished (P6).
P3 = tls_record(22, client_hello(), 0x0301)
P4 = tls_record(22, server_hello() + handshake(14, b""))
P5 = tls_record(22, handshake(16, b"\x01" * 33)) + CCS + encrypted_handshake()
P6 = CCS + encrypted_handshake()
UP_DATA, DOWN_DATA = 100, 200


def seg(up: bool, flags: str, seq: int, ack: int, data: bytes = b"") -> bytes:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    src, sport, dst, dport = (A, CLIENT, B, SERVER) if up else (B, SERVER, A, CLIENT)
    return bytes(Ether() / IP(src=src, dst=dst)
                 / TCP(sport=sport, dport=dport, flags=flags, seq=seq & 0xFFFFFFFF,
                       ack=ack & 0xFFFFFFFF) / data)


def session(first: bytes = P3, c0: int = C0
            ) -> tuple[list[bytes], list[bytes], tuple[int, int, int, int]]:
    """(frames up to and including the handshake's last packet, the frames after it, XDP's
    tcp[] at that packet: client next, client ack, server next, server ack). Sequence numbers
    are 64-bit here; the frames carry them mod 2^32 (seg)."""
    c, s = c0 + 1, S0 + 1
    head = [seg(True, "S", c0, 0), seg(False, "SA", S0, c), seg(True, "A", c, s)]
    head.append(seg(True, "PA", c, s, first))
    c += len(first)
    head.append(seg(False, "PA", s, c, P4))
    s += len(P4)
    head.append(seg(True, "PA", c, s, P5))
    c += len(P5)
    client_ack = s
    head.append(seg(False, "PA", s, c, P6))
    s += len(P6)
    start = (c, client_ack, s, c)
    tail = [seg(True, "PA", c, s, appdata(UP_DATA - 5)),
            seg(False, "PA", s, c + UP_DATA, appdata(DOWN_DATA - 5))]
    c += UP_DATA
    s += DOWN_DATA
    tail += [seg(True, "FA", c, s), seg(False, "FA", s, c + 1), seg(True, "A", c + 1, s + 1)]
    return head, tail, start


class Rig:
    """A tracker with the dispatcher, a ShuntManager on a real table, and what they logged."""

    def __init__(self, prog: Any, ring: Any, policies: list[str]) -> None:
        from shuntd.conn.record import CONN_FIELDS, SHUNT_CONN_FIELDS
        from shuntd.conn.tracker import ConnTracker
        from shuntd.datapath.table import ShuntTable
        from shuntd.events import EVENTS, HOOKS, EventDispatcher
        from shuntd.policyfile import early_trigger, load_all
        from shuntd.shunting import ShuntManager, shunt_conn_values

        names = [n for n, _ in CONN_FIELDS + SHUNT_CONN_FIELDS]
        self.prog = prog
        self.rows: list[dict[str, Any]] = []
        self.shunt_rows: list[tuple] = []
        self.inserts: list[tuple[str, str]] = []
        self.table = ShuntTable(prog, lease_seconds=30)
        self.ring = ring
        d = EventDispatcher()
        loaded = load_all(policies, EVENTS + HOOKS) if policies else []
        for p in loaded:
            for ev, fn in p.handlers.items():
                d.add_handler(ev, fn)
        self.tracker = ConnTracker(None, hooks=d, sink=lambda c, r: self.rows.append(
            dict(zip(names, r + shunt_conn_values(c), strict=True))))
        self.manager = ShuntManager(self.table, self.tracker, d, self.shunt_rows.append)
        self.manager.on_insert = lambda t, r: self.inserts.append((t, r))
        self.manager.early_trigger = early_trigger(loaded)
        d.actions = self.manager
        self.ts = time.time() - 10.0

    def analyse(self, frames: list[bytes]) -> Any:
        from shuntd.packet import decode

        conn = None
        for f in frames:
            self.ts += 0.001
            conn = self.tracker.process(decode(memoryview(f), 1, self.ts, len(f)))
        return conn

    def drop(self, frames: list[bytes]) -> None:
        """XDP drops the frames; its ring events are applied at their time."""
        for f in frames:
            assert self.prog.test_run(f).retval == 1  # XDP_DROP
        self.apply_events()

    def apply_events(self) -> list[Any]:
        events = self.ring.poll(0)
        for ev in events:
            self.manager.apply(ev)
        if events:
            self.fire(max(e.ts for e in events) + 1e-6)
        return events

    def fire(self, ts: float) -> None:
        self.tracker.advance(ts)
        while self.tracker.timers.advance(ts):
            pass

    def close(self) -> None:
        self.ring.poll(0)  # nothing of one test left for the next
        self.table.close()


@pytest.fixture(scope="module")
def dp() -> Iterator[tuple[Any, Any]]:
    """One program and its ring poller (bcc opens a program's ring buffer once)."""
    from shuntd.datapath.program import XdpProgram
    from shuntd.datapath.ring import RingPoller

    p = XdpProgram.compile(flows_max=16, pairs_max=4)
    ring = RingPoller(p)
    try:
        yield p, ring
    finally:
        ring.close()
        p.close()


@pytest.fixture
def prog(dp: tuple[Any, Any]) -> Any:
    return dp[0]


@pytest.fixture
def rig_factory(dp: tuple[Any, Any]) -> Iterator[Any]:
    prog, ring = dp
    rigs: list[Rig] = []

    def make(policies: list[str]) -> Rig:
        rig = Rig(prog, ring, policies)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()
    for k in list(prog.flows.keys()):  # nothing of one test left for the next
        del prog.flows[k]
    prog.bpf[b"tls_watch"].clear()


def early_entry(rig: Rig, trigger: str, start: tuple[int, int, int, int],
                lease_s: float = 30.0) -> bytes:
    """The `flows` entry XDP makes when it shunts early: counters 0, SHUNT_F_EARLY, the
    configured trigger, lease now + early lease, tcp[] each side's next seq and highest ack."""
    from shuntd.datapath.program import F_EARLY, lease_deadline_ns
    from shuntd.shunting import trigger_code

    key, side = rig.table.flow_key(A, CLIENT, B, SERVER, 6)
    assert side == 1
    value = rig.prog.new_value(lease_deadline_ns(lease_s), trigger_code(trigger))
    value.flags = F_EARLY
    value.tcp[0].next, value.tcp[0].ack, value.tcp[1].next, value.tcp[1].ack = (
        x & 0xFFFFFFFF for x in start)
    rig.prog.flows[key] = value
    return bytes(key)


def early_event(rig: Rig, key: bytes, ts: float) -> Any:
    """The EARLY ring record XDP writes with the entry, decoded as the poller does."""
    import ctypes

    from shuntd.datapath.program import LAYOUT_VERSION, EventType, monotonic_ns

    ev = rig.prog.ShuntEvent()
    ev.version, ev.type, ev.side, ev.entry, ev.event_seq = LAYOUT_VERSION, EventType.EARLY, 2, 1, 1
    ev.ts_ns = monotonic_ns() - int((time.time() - ts) * 1e9)
    ctypes.memmove(ctypes.addressof(ev.key), key, len(key))
    out = rig.ring.decode(bytes(ev))
    assert type(out).__name__ == "EarlyEvent" and out.key_bytes == key
    return out


def check_session_logged(rig: Rig) -> None:
    """session()'s connection, its handshake analysed and the rest shunted by the tls
    policy's `ssl` shunt, ended by its FINs: one conn.log row and one shunt.log row."""
    rig.tracker.finish()
    (row,) = rig.rows
    assert row["conn_state"] == "SF" and row["service"] == "ssl"
    assert (row["orig_pkts"], row["resp_pkts"]) == (4, 3)
    assert (row["orig_shunted_pkts"], row["resp_shunted_pkts"]) == (3, 2)
    assert row["orig_bytes"] == len(P3) + len(P5) + UP_DATA
    assert row["resp_bytes"] == len(P4) + len(P6) + DOWN_DATA
    (srow,) = rig.shunt_rows
    assert srow[1] == row["uid"] and srow[8] == "ssl" and srow[11] == "fin"
    assert (srow[12], srow[14]) == (3, 2)


def test_tls_policy_adopts_the_early_entry_and_merges_its_counters(rig_factory):
    rig = rig_factory(["tls"])
    head, tail, start = session()
    key = early_entry(rig, "ssl", start)
    conn = rig.analyse(head)                       # ssl_established on the last one
    assert rig.inserts == [("ssl", "adopted")]
    assert rig.manager.flows == {key: conn}
    assert conn.ext["shunt"].anchor == start       # the daemon's TCP state = XDP's start
    from shuntd.datapath.table import ShuntResult
    assert rig.table.results[ShuntResult.OK] == 0  # no second entry: XDP's was taken over
    assert rig.table.results[ShuntResult.EXISTS] == 1
    assert rig.table.renew_keys([key]) == 1        # renewals cover it (ShuntManager.renew)
    rig.drop(tail)                                 # XDP drops the rest; FIN events applied
    check_session_logged(rig)
    assert rig.table.lookup_key(key) is None


def test_adopted_entry_counts_wraps_from_xdps_own_start(rig_factory):
    """XDP takes acks from payload packets only: its starting ack may be behind the daemon's,
    here on the other side of 2^32 (the client's handshake bytes cross it). The server's ack
    moves past 2^32 again while shunted (the entry counts a wrap from XDP's start), and the
    client's size still comes out as the bytes it sent, not 4 GiB more."""
    c0 = 2**32 - 100                               # the client's data crosses 2^32 in P5
    rig = rig_factory(["tls"])
    head, tail, start = session(c0=c0)
    assert start[3] > 2**32 > c0 + 1 + len(P3)
    xdp_start = (start[0], start[1], start[2], c0 + 1 + len(P3))  # server ack: only P4's seen
    key = early_entry(rig, "ssl", xdp_start)
    rig.analyse(head)
    assert rig.inserts == [("ssl", "adopted")]
    rig.drop(tail)
    assert rig.table.lookup_key(key).tcp_wraps == (0, 0, 0, 1)
    rig.tracker.finish()
    (row,) = rig.rows
    assert row["conn_state"] == "SF"
    assert row["orig_bytes"] == len(P3) + len(P5) + UP_DATA
    assert row["resp_bytes"] == len(P4) + len(P6) + DOWN_DATA


def test_early_entry_of_another_trigger_is_not_adopted(rig_factory):
    rig = rig_factory(["tls"])
    head, _tail, start = session()
    key = early_entry(rig, "bulk", start)
    conn = rig.analyse(head)
    assert rig.inserts == [("ssl", "exists")]
    assert rig.manager.flows == {} and "shunt" not in (conn.ext or {})
    c = rig.table.lookup_key(key)
    assert c is not None and c.trigger == 2       # untouched ("bulk")


def test_early_event_without_adoption_is_adopted_at_its_margin(rig_factory):
    """No policy shunts (as if the handshake's last packet had been lost to a capture drop):
    2 s of network time after the EARLY event the connection, TLS to the analyser, adopts it."""
    from shuntd.shunting import EARLY_ADOPT_MARGIN

    rig = rig_factory([])
    head, tail, start = session()
    key = early_entry(rig, "ssl", start)
    conn = rig.analyse(head)
    rig.manager.early_trigger = "ssl"
    rig.manager.apply(early_event(rig, key, rig.ts))
    rig.fire(rig.ts + EARLY_ADOPT_MARGIN / 2)
    assert rig.manager.flows == {}
    rig.fire(rig.ts + EARLY_ADOPT_MARGIN + 0.01)
    assert rig.manager.flows == {key: conn}
    assert rig.inserts == [("ssl", "adopted_late")]
    rig.drop(tail)
    rig.tracker.finish()
    (row,) = rig.rows
    assert (row["orig_shunted_pkts"], row["resp_shunted_pkts"]) == (3, 2)
    assert rig.shunt_rows[0][8] == "ssl"


def test_early_entry_of_a_connection_that_is_not_tls_is_ended(rig_factory):
    """XDP's handshake follower alone never keeps a connection hidden: an EARLY entry for a
    connection the analyser does not see as TLS (here its first payload is no ClientHello) is
    ended at the margin; what XDP counted stays in conn.log."""
    from shuntd.shunting import EARLY_ADOPT_MARGIN

    rig = rig_factory([])
    head, tail, start = session(first=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 400)
    key = early_entry(rig, "ssl", start)
    rig.analyse(head)
    rig.drop(tail[:1])                              # one packet dropped before the margin
    rig.manager.apply(early_event(rig, key, rig.ts))
    rig.fire(rig.ts + EARLY_ADOPT_MARGIN + 0.01)
    assert rig.table.lookup_key(key) is None and rig.manager.flows == {}
    (srow,) = rig.shunt_rows
    assert srow[11] == "unconfirmed" and srow[12] == 1
    rig.tracker.finish()
    (row,) = rig.rows
    assert "ssl" not in (row["service"] or "")
    assert row["orig_shunted_pkts"] == 1


def test_lease_expired_early_entry_nobody_adopted_is_logged_and_deleted(rig_factory):
    """No connection adopted it (another worker's, or unseen): the first packet after its lease
    makes XDP pass it and write LEASE_EXPIRED; a margin later the entry is taken as orphaned."""
    from shuntd.shunting import EARLY_REAP_MARGIN

    rig = rig_factory([])
    _head, tail, start = session()
    key = early_entry(rig, "ssl", start)
    assert rig.prog.test_run(tail[0]).retval == 1            # dropped, counted
    assert rig.manager.reap_early(key) is False              # its lease still runs
    # The lease runs out (as when nobody renews it): XDP passes the next packet and reports it.
    early_entry_lapsed = rig.prog.flows[rig.prog.FlowKey.from_buffer_copy(key)]
    early_entry_lapsed.lease_expiry_ns = 1
    rig.prog.flows[rig.prog.FlowKey.from_buffer_copy(key)] = early_entry_lapsed
    assert rig.prog.test_run(tail[1]).retval == 2            # XDP_PASS
    events = rig.ring.poll(0)
    assert [type(e).__name__ for e in events] == ["LeaseExpiredEvent"]
    rig.manager.apply(events[0])
    rig.fire(events[0].ts + 0.01)
    assert rig.table.lookup_key(key) is not None             # the margin first
    rig.fire(events[0].ts + EARLY_REAP_MARGIN + 0.01)
    assert rig.table.lookup_key(key) is None
    (srow,) = rig.shunt_rows
    assert srow[1] is None and srow[8] == "ssl" and srow[11] == "orphaned"
    assert (srow[2], srow[3], srow[4], srow[5]) == (A, CLIENT, B, SERVER)
    assert (srow[12], srow[14]) == (1, 0)


def test_shutdown_logs_unadopted_early_entries_only(rig_factory):
    from shuntd.datapath.program import lease_deadline_ns

    rig = rig_factory([])
    _head, tail, start = session()
    key = early_entry(rig, "ssl", start)
    assert rig.prog.test_run(tail[0]).retval == 1
    other, _ = rig.table.flow_key("10.0.0.7", 1, "10.0.0.8", 2, 6)
    rig.prog.flows[other] = rig.prog.new_value(lease_deadline_ns(30), 3)  # not XDP's
    assert rig.manager.reap_all_early() == 1
    (srow,) = rig.shunt_rows
    assert srow[11] == "orphaned" and srow[12] == 1
    assert rig.table.lookup_key(key) is None
    assert rig.table.lookup_key(other) is not None


def test_switch_follows_the_declaration_and_pushes_its_deadline(prog):
    """The config's early fields: on with the tls policy's trigger code and a deadline one lease
    ahead of map time, pushed forward by tick(), 0 when no policy declares it and after off()."""
    from shuntd.early import EarlySwitch
    from shuntd.events import EVENTS, HOOKS
    from shuntd.policyfile import early_trigger, load_all

    assert early_trigger(load_all(["tls", "bulk"], EVENTS + HOOKS)) == "ssl"
    assert early_trigger(load_all(["bulk"], EVENTS + HOOKS)) is None
    sw = EarlySwitch(prog, 443, 30.0)
    try:
        sw.declare("ssl")
        cfg = prog.read_config()
        now = prog.map_now_ns()
        assert (cfg.early_port, cfg.early_trigger) == (443, 1)
        assert cfg.early_lease_ns == 30 * 10**9
        assert now < cfg.early_until_ns <= now + 30 * 10**9
        first = int(cfg.early_until_ns)
        time.sleep(0.05)
        sw.tick()                                   # not due yet: unchanged
        assert prog.read_config().early_until_ns == first
        sw.next_renew = 0.0                         # lease/3 passed
        sw.tick()
        assert prog.read_config().early_until_ns > first
        sw.declare(None)                            # a reload without the declaration
        cfg = prog.read_config()
        assert (cfg.early_port, cfg.early_trigger, cfg.early_until_ns) == (0, 0, 0)
        sw.declare("ssl")
        assert prog.read_config().early_port == 443
        sw.off()                                    # shutdown
        assert prog.read_config().early_port == 0
        off = EarlySwitch(prog, 0, 30.0)            # --early-port 0
        off.declare("ssl")
        assert prog.read_config().early_port == 0 and not off.on
    finally:
        prog.set_early(0)


def test_sweep_takes_a_silent_unadopted_early_entry_once_its_lease_ran_out(rig_factory):
    """No packet after its lease, so no LEASE_EXPIRED event: the process that reads the ring
    looks at each early shunt again a lease (and a margin) after its EARLY event, and takes it
    only if nobody renewed it."""
    from shuntd.early import EarlySwitch

    rig = rig_factory([])
    _head, tail, start = session()
    key = early_entry(rig, "ssl", start, lease_s=30)
    assert rig.prog.test_run(tail[0]).retval == 1
    sw = EarlySwitch(rig.prog, 443, 30.0)
    sw.note([early_event(rig, key, rig.ts)])
    assert sw.sweep(rig.manager.reap_early) == 0               # not due yet
    sw.made[0] = (0.0, key)                                    # due; its lease still runs
    assert sw.sweep(rig.manager.reap_early) == 0 and not sw.made
    assert rig.table.lookup_key(key) is not None               # (as if a worker renewed it)
    fkey = rig.prog.FlowKey.from_buffer_copy(key)
    value = rig.prog.flows[fkey]
    value.lease_expiry_ns = 1                                  # nobody renewed it
    rig.prog.flows[fkey] = value
    sw.note([early_event(rig, key, rig.ts)])
    sw.made[0] = (0.0, key)
    assert sw.sweep(rig.manager.reap_early) == 1
    assert rig.table.lookup_key(key) is None
    (srow,) = rig.shunt_rows
    assert srow[11] == "orphaned" and srow[12] == 1


# Until the XDP side of early shunts is in bpf/shuntd.bpf.c (it uses the tls_watch map).
def test_xdp_fires_and_the_daemon_adopts_end_to_end(rig_factory):
    """The whole path on the real program: early shunts on (as the daemon sets them), every
    frame of the session goes through XDP first and only what it passes reaches the engine.
    XDP follows the handshake, passes the server's Finished and makes the entry (EARLY event);
    the tls policy adopts it there; XDP drops the rest; conn.log and shunt.log as with a shunt
    the daemon made itself, and no late packet."""
    from shuntd.datapath.program import StatIndex

    rig = rig_factory(["tls"])
    prog = rig.prog
    head, tail, start = session()
    before = prog.stats()
    prog.set_early(SERVER, 1, 30 * 10**9, prog.map_now_ns() + 30 * 10**9)
    try:
        verdicts = []
        for f in head + tail:
            verdicts.append(prog.test_run(f).retval)
            if verdicts[-1] == 2:                   # XDP_PASS: the capture gets it
                rig.analyse([f])
            rig.apply_events()
        stats = {k: v - before[k] for k, v in prog.stats().items()}
    finally:
        prog.set_early(0)
    assert stats[StatIndex.EARLY_ARMED] == 1
    assert stats[StatIndex.EARLY_FIRED] == 1
    assert verdicts == [2] * len(head) + [1] * len(tail)
    assert rig.inserts == [("ssl", "adopted")]
    (conn,) = rig.manager.flows.values()
    assert conn.ext["shunt"].anchor == start
    check_session_logged(rig)


def test_fin_of_an_unadopted_early_shunt_brings_its_counters_to_the_connection(rig_factory):
    """The analyser never raised ssl_established (here it came in after the TCP handshake, as a
    restarted daemon does: no stream start, no `ssl`), XDP did: the session's FINs, dropped by
    XDP, reach the connection before the margin. The entry is settled first (`unconfirmed`),
    so the connection's record holds what XDP dropped, not a separate orphan row later."""
    rig = rig_factory(["tls"])
    head, tail, start = session()
    key = early_entry(rig, "ssl", start)
    conn = rig.analyse(head[3:])                   # from the ClientHello on
    assert rig.inserts == [] and "ssl" not in (conn.service or [])
    rig.drop(tail)                                 # FINs within the margin
    assert rig.table.lookup_key(key) is None
    (srow,) = rig.shunt_rows
    assert srow[11] == "unconfirmed" and (srow[12], srow[14]) == (3, 2)
    rig.tracker.finish()
    (row,) = rig.rows
    assert (row["orig_shunted_pkts"], row["resp_shunted_pkts"]) == (3, 2)
    assert (row["orig_pkts"], row["resp_pkts"]) == (2, 2)


def test_a_second_early_shunt_of_a_connection_not_tls_is_ended_too(rig_factory):
    """A connection whose first early entry was ended (`unconfirmed`) gets another one (a
    ClientHello-shaped payload later in the stream and a colluding peer): it is ended at its
    margin as well, not left to drop the connection's packets for a whole lease and end up in
    an orphan row instead of the connection's record."""
    from shuntd.shunting import EARLY_ADOPT_MARGIN

    rig = rig_factory([])
    head, tail, start = session(first=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 400)
    key = early_entry(rig, "ssl", start)
    rig.analyse(head)
    rig.drop(tail[:1])
    rig.manager.apply(early_event(rig, key, rig.ts))
    rig.fire(rig.ts + EARLY_ADOPT_MARGIN + 0.01)
    assert rig.table.lookup_key(key) is None
    # XDP makes a second one later on
    c, s = start[0] + UP_DATA, start[2]
    assert early_entry(rig, "ssl", (c, s, s, c)) == key
    ts2 = rig.ts + EARLY_ADOPT_MARGIN + 0.02
    rig.drop(tail[1:2])
    rig.manager.apply(early_event(rig, key, ts2))
    rig.fire(ts2 + EARLY_ADOPT_MARGIN + 0.01)
    assert rig.table.lookup_key(key) is None and rig.manager.flows == {}
    assert [(r[11], r[12], r[14]) for r in rig.shunt_rows] == [("unconfirmed", 1, 0),
                                                               ("unconfirmed", 0, 1)]
    rig.tracker.finish()
    (row,) = rig.rows
    assert (row["orig_shunted_pkts"], row["resp_shunted_pkts"]) == (1, 1)


def test_adoption_after_more_than_2gib_dropped_keeps_the_sizes(rig_factory):
    """The daemon runs behind: by the time its analyser reaches the handshake's last packet,
    XDP has already dropped 3 GiB of the client's data under its early entry (more than half
    of 2^32 ahead of the connection's values, across 2^32 once). The sizes must still count
    those 3 GiB, not 1 GiB less than nothing."""
    g = 3 << 30
    c0 = 1 << 31
    rig = rig_factory(["tls"])
    head, _tail, start = session(c0=c0)
    key = early_entry(rig, "ssl", start)
    fkey = rig.prog.FlowKey.from_buffer_copy(key)
    v = rig.prog.flows[fkey]                    # what XDP's counting left in it
    n = g // 1448
    v.pkts1, v.bytes1, v.pkts2, v.bytes2 = n, g + 52 * n, n // 2, 52 * (n // 2)
    c = start[0] + g
    assert c >> 32 == 1 and start[0] >> 32 == 0
    v.tcp[0].next = v.tcp[1].ack = c & 0xFFFFFFFF
    v.tcp[0].next_wraps = v.tcp[1].ack_wraps = 1
    rig.prog.flows[fkey] = v
    rig.analyse(head)
    assert rig.inserts == [("ssl", "adopted")]
    s = start[2]
    rig.drop([seg(True, "PA", c, s, appdata(UP_DATA - 5)),
              seg(False, "PA", s, c + UP_DATA, appdata(DOWN_DATA - 5)),
              seg(True, "FA", c + UP_DATA, s + DOWN_DATA),
              seg(False, "FA", s + DOWN_DATA, c + UP_DATA + 1),
              seg(True, "A", c + UP_DATA + 1, s + DOWN_DATA + 1)])
    rig.tracker.finish()
    (row,) = rig.rows
    assert row["conn_state"] == "SF"
    assert row["orig_bytes"] == len(P3) + len(P5) + g + UP_DATA
    assert row["resp_bytes"] == len(P4) + len(P6) + DOWN_DATA
    assert row["orig_shunted_pkts"] == n + 3


def test_another_worker_never_reaps_an_early_entry_adopted_and_renewed(rig_factory):
    """--workers: worker A adopts XDP's entry and renews it; then A falls a lease behind (its
    loop held up) and the lease lapses, so XDP reports LEASE_EXPIRED to every worker. Worker B
    (no such connection) must not take the entry as an unadopted early shunt: A ends it and
    the counters go to A's connection, not to an orphan row."""
    from shuntd.datapath.program import F_EARLY
    from shuntd.shunting import EARLY_REAP_MARGIN

    a = rig_factory(["tls"])
    b = rig_factory(["tls"])
    head, tail, start = session()
    key = early_entry(a, "ssl", start)
    a.analyse(head)
    assert a.inserts == [("ssl", "adopted")]
    a.manager.renew()
    assert a.prog.test_run(tail[0]).retval == 1               # dropped, counted
    fkey = a.prog.FlowKey.from_buffer_copy(key)
    v = a.prog.flows[fkey]
    assert not v.flags & F_EARLY                               # renewed: somebody's own
    v.lease_expiry_ns = 1                                      # A missed its renewals
    a.prog.flows[fkey] = v
    assert a.prog.test_run(tail[1]).retval == 2                # lapsed: passed, reported
    (ev,) = a.ring.poll(0)
    b.manager.apply(ev)
    b.fire(ev.ts + EARLY_REAP_MARGIN + 0.01)
    assert b.shunt_rows == [] and a.table.lookup_key(key) is not None
    a.manager.apply(ev)
    a.fire(ev.ts + 0.01)
    (srow,) = a.shunt_rows
    assert srow[11] == "lease" and (srow[12], srow[14]) == (1, 0)


def test_xdp_follows_no_handshake_again_on_a_connection_ended_as_not_tls(rig_factory):
    """A ClientHello-shaped exchange in the middle of another protocol on the port (both peers
    colluding, or packets only the sensor sees): XDP fires, the daemon ends the entry at its
    margin (`unconfirmed`). The same connection must not get another early shunt by repeating
    the exchange every couple of seconds: XDP follows no handshake on it again."""
    from shuntd.datapath.program import StatIndex
    from shuntd.shunting import EARLY_ADOPT_MARGIN

    rig = rig_factory([])
    rig.manager.early_trigger = "ssl"
    rig.ts = time.time()                    # the frames' time = XDP's (its events' ts)
    prog = rig.prog
    req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    nxt = [C0 + 1, S0 + 1]
    frames = [seg(True, "S", C0, 0), seg(False, "SA", S0, nxt[0]),
              seg(True, "A", nxt[0], nxt[1])]

    def send(up: bool, data: bytes) -> bytes:
        i = 0 if up else 1
        f = seg(up, "PA", nxt[i], nxt[1 - i], data)
        nxt[i] += len(data)
        return f

    def run(fs: list[bytes]) -> tuple[list[int], list[Any]]:
        verdicts, events = [], []
        for f in fs:
            verdicts.append(prog.test_run(f).retval)
            if verdicts[-1] == 2:                   # XDP_PASS: the capture gets it
                rig.analyse([f])
            events += rig.apply_events()
        return verdicts, events

    def fake_handshake() -> list[bytes]:
        return [send(True, P3), send(False, P4), send(True, P5), send(False, P6)]

    frames += [send(True, req), send(False, resp)]
    prog.set_early(SERVER, 1, 30 * 10**9, prog.map_now_ns() + 30 * 10**9)
    try:
        before = prog.stats()
        verdicts, events = run(frames + fake_handshake())
        assert verdicts == [2] * 9                  # the last one completed it: passed
        assert [type(e).__name__ for e in events] == ["EarlyEvent"]
        assert prog.stats()[StatIndex.EARLY_FIRED] - before[StatIndex.EARLY_FIRED] == 1
        rig.fire(events[0].ts + EARLY_ADOPT_MARGIN + 0.01)
        assert [r[11] for r in rig.shunt_rows] == ["unconfirmed"]
        rig.ts = max(rig.ts, events[0].ts + EARLY_ADOPT_MARGIN + 0.02)
        before = prog.stats()
        verdicts, events = run(fake_handshake())
        after = prog.stats()
    finally:
        prog.set_early(0)
    assert verdicts == [2] * 4 and events == []
    assert after[StatIndex.EARLY_ARMED] == before[StatIndex.EARLY_ARMED]
    assert after[StatIndex.EARLY_FIRED] == before[StatIndex.EARLY_FIRED]
    assert rig.manager.flows == {} and len(rig.shunt_rows) == 1
