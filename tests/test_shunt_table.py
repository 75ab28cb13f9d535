"""ShuntTable, RingPoller and stats against the real program, driven by BPF_PROG_TEST_RUN.

Expected counters come from the frames sent: IPv4 total length = 20 (IP) + 20 (TCP) or
8 (UDP) + payload; IPv6 = 40 + payload length.
"""

from __future__ import annotations

import time

import pytest
from lab import is_root

pytestmark = pytest.mark.skipif(not is_root(), reason="needs root (BPF)")

A, B = "10.0.0.1", "10.0.0.2"  # A < B: A is side 1
XDP_DROP, XDP_PASS = 1, 2


@pytest.fixture(scope="module")
def prog():
    from shuntd.datapath.program import XdpProgram

    p = XdpProgram.compile(flows_max=64, pairs_max=8)
    yield p
    p.close()


@pytest.fixture
def table(prog):
    from shuntd.datapath.table import ShuntTable

    t = ShuntTable(prog, lease_seconds=30)
    yield t
    for key, _ in list(t.entries()):
        t.unshunt_key(key)
    for key, _ in list(t.pair_entries()):
        prog.ip_pairs.__delitem__(key)
    t.recount()
    t.close()


@pytest.fixture(scope="module")
def module_ring(prog):
    from shuntd.datapath.ring import RingPoller

    return RingPoller(prog)  # one poller per program (bcc opens the ring once)


@pytest.fixture
def ring(module_ring):
    module_ring.poll(0)  # drop leftovers of earlier tests
    return module_ring


def tcp(src, sport, dst, dport, payload=b"", flags="A", seq=1000, ack=2000) -> bytes:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    return bytes(Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02")
                 / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq,
                                              ack=ack) / payload)


def udp(src, sport, dst, dport, payload=b"") -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    return bytes(Ether() / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload)


def test_shunt_counts_each_side_in_ip_bytes(prog, table):
    from shuntd.datapath.table import ShuntResult

    assert table.shunt_flow(B, 80, A, 40000, 6) is ShuntResult.OK  # endpoint order irrelevant
    assert table.shunt_flow(A, 40000, B, 80, 6) is ShuntResult.EXISTS
    _, side_a = table.flow_key(A, 40000, B, 80, 6)
    assert side_a == 1
    for _ in range(3):
        assert prog.test_run(tcp(A, 40000, B, 80, b"x" * 10)).retval == XDP_DROP  # 50 B
    assert prog.test_run(tcp(B, 80, A, 40000, b"y" * 100)).retval == XDP_DROP  # 140 B
    assert prog.test_run(tcp(A, 40001, B, 80)).retval == XDP_PASS  # another flow
    c = table.lookup_flow(A, 40000, B, 80, 6)
    assert (c.pkts1, c.bytes1, c.pkts2, c.bytes2) == (3, 150, 1, 140)
    assert c.side(1) == (3, 150) and c.side(2) == (1, 140)
    assert table.occupancy == 1 and table.capacity == 64
    assert table.results[ShuntResult.OK] == 1 and table.results[ShuntResult.EXISTS] == 1


def test_unshunt_returns_final_counters_and_reopens_the_flow(prog, table):
    before = time.time()
    table.shunt_flow(A, 5000, B, 53, 17)
    assert prog.test_run(udp(B, 53, A, 5000, b"z" * 30)).retval == XDP_DROP  # 58 B, side 2
    final = table.unshunt_flow(A, 5000, B, 53, 17)
    after = time.time()
    assert (final.pkts1, final.bytes1, final.pkts2, final.bytes2) == (0, 0, 1, 58)
    # coarse clock: a tick (<= 4 ms at HZ=250) of slack either side
    assert before - 0.01 <= final.last_seen <= after + 0.01
    assert table.unshunt_flow(A, 5000, B, 53, 17) is None
    assert table.lookup_flow(A, 5000, B, 53, 17) is None
    assert table.occupancy == 0
    assert prog.test_run(udp(B, 53, A, 5000)).retval == XDP_PASS


def test_full_map_is_a_reported_outcome_not_an_exception():
    from shuntd.datapath.program import XdpProgram
    from shuntd.datapath.table import ShuntResult, ShuntTable

    with XdpProgram.compile(flows_max=4, pairs_max=1) as small:
        t = ShuntTable(small)
        got = [t.shunt_flow(A, 1000 + i, B, 80, 6) for i in range(6)]
        assert got == [ShuntResult.OK] * 4 + [ShuntResult.FULL] * 2
        assert t.results[ShuntResult.FULL] == 2
        assert t.occupancy == t.capacity == 4
        # the flow that did not fit stays visible (fail open)
        assert small.test_run(tcp(A, 1004, B, 80)).retval == XDP_PASS
        assert t.shunt_pair(A, B) is ShuntResult.OK
        assert t.shunt_pair("10.9.9.9", B) is ShuntResult.FULL


def test_ip_pair_drops_any_protocol_and_unshunt_returns_counters(prog, table):
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether
    from shuntd.datapath.table import ShuntResult

    assert prog.test_run(udp(A, 1, B, 2)).retval == XDP_PASS
    assert table.shunt_pair(B, A) is ShuntResult.OK
    assert table.pair_occupancy == 1
    icmp = bytes(Ether() / IP(src=B, dst=A) / ICMP() / (b"p" * 12))  # 20 + 8 + 12 = 40
    assert prog.test_run(icmp).retval == XDP_DROP
    assert prog.test_run(udp(A, 1, B, 2, b"q")).retval == XDP_DROP  # 29
    final = table.unshunt_pair(A, B)
    assert (final.pkts1, final.bytes1, final.pkts2, final.bytes2) == (1, 29, 1, 40)
    assert prog.config[0].pairs_active == 0
    assert prog.test_run(udp(A, 1, B, 2)).retval == XDP_PASS


def test_fin_and_rst_events_carry_sequence_numbers(prog, table, ring):
    from shuntd.datapath.ring import TcpCloseEvent

    table.shunt_flow(A, 40000, B, 443, 6)
    key, side_a = table.flow_key(A, 40000, B, 443, 6)
    t0 = time.time()
    assert prog.test_run(tcp(A, 40000, B, 443, b"abc", "FA", seq=111, ack=222)).retval == XDP_DROP
    assert prog.test_run(tcp(B, 443, A, 40000, b"", "R", seq=333, ack=0)).retval == XDP_DROP
    events = ring.poll(100)
    assert [type(e) for e in events] == [TcpCloseEvent, TcpCloseEvent]
    fin, rst = events
    assert (fin.rst, fin.fin, fin.side, fin.seq, fin.ack) == (False, True, side_a, 111, 222)
    assert (fin.ip_len, fin.payload_len, fin.event_seq) == (43, 3, 1)
    assert fin.key_bytes == bytes(key)
    assert (rst.rst, rst.side, rst.seq, rst.tcp_flags, rst.event_seq) == (True, 2, 333, 0x04, 2)
    assert t0 - 0.01 <= fin.ts <= time.time() + 0.01
    c = table.lookup_flow(A, 40000, B, 443, 6)
    assert (c.pkts1, c.pkts2) == (1, 1)  # FIN/RST are still dropped and counted


def test_lapsed_lease_passes_reports_and_renew_restores(prog, table, ring):
    from shuntd.datapath.ring import LeaseExpiredEvent

    # Map time has tick (jiffies) resolution; a lease well above a few ticks is exact enough.
    table.shunt_flow(A, 7000, B, 7001, 17, lease_seconds=0.5)
    frame = udp(A, 7000, B, 7001, b"l")
    assert prog.test_run(frame).retval == XDP_DROP
    time.sleep(0.6)
    assert prog.test_run(frame).retval == XDP_PASS
    assert prog.test_run(frame).retval == XDP_PASS
    events = ring.poll(100)
    assert len(events) == 1 and isinstance(events[0], LeaseExpiredEvent)
    assert events[0].key_bytes == bytes(table.flow_key(A, 7000, B, 7001, 17)[0])
    assert table.renew_key(table.flow_key(A, 7000, B, 7001, 17)[0])
    assert prog.test_run(frame).retval == XDP_DROP
    c = table.lookup_flow(A, 7000, B, 7001, 17)
    assert c.pkts1 == 2 and c.flags == 0  # lease-event flag cleared by the renewal
    assert table.renew_key(table.flow_key(A, 1, B, 1, 17)[0]) is False


def test_entries_and_renew_all_cover_every_entry(prog, table):
    from shuntd.datapath import batch

    for i in range(20):
        table.shunt_flow(A, 2000 + i, B, 80, 6, lease_seconds=5)
    table.shunt_pair("10.1.1.1", "10.1.1.2", lease_seconds=5)
    keys = {bytes(k) for k, _ in table.entries()}
    assert keys == {bytes(table.flow_key(A, 2000 + i, B, 80, 6)[0]) for i in range(20)}
    slow = {bytes(k) for k, _ in batch._iter_keys(prog.flows.map_fd, prog.FlowKey,
                                                   prog.FlowValue)}
    assert slow == keys  # the fallback path agrees
    t0 = time.monotonic_ns()
    assert table.renew_all(lease_seconds=60) == 21
    assert all(c.lease_expiry_ns >= t0 + 59_000_000_000 for _, c in table.entries())
    assert all(c.lease_expiry_ns >= t0 + 59_000_000_000 for _, c in table.pair_entries())


def test_stats_by_name(prog, table):
    from shuntd.datapath.stats import read_stats

    before = read_stats(prog)
    table.shunt_flow(A, 9000, B, 9001, 17)
    prog.test_run(udp(A, 9000, B, 9001, b"s" * 2))  # 30 B dropped
    prog.test_run(udp(A, 9002, B, 9001))  # 28 B passed
    prog.test_run(bytes(12) + b"\x08\x06" + bytes(28))  # ARP: not IP
    after = read_stats(prog)
    diff = {k: after[k] - before[k] for k in after}
    assert diff["seen"] == 3 and diff["passed"] == 2 and diff["dropped_flow"] == 1
    assert diff["bytes_dropped_flow"] == 30 and diff["bytes_passed"] == 28
    assert diff["not_ip"] == 1


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "rewrite-fallback"])
def test_renewal_keeps_the_counters(prog, table, in_place):
    table.shunt_flow(A, 6000, B, 6001, 17, lease_seconds=1)
    m = table._flows
    saved = m.lease
    assert saved is not None, "the in-place renew program did not load"
    if not in_place:
        m.lease = None
    try:
        for _ in range(3):
            assert prog.test_run(udp(B, 6001, A, 6000, b"r" * 4)).retval == XDP_DROP  # 32 B
        key = table.flow_key(A, 6000, B, 6001, 17)[0]
        t0 = time.monotonic_ns()
        assert table.renew_key(key, lease_seconds=100)
        c = table.lookup_key(key)
        assert c.side(2) == (3, 96) and c.lease_expiry_ns >= t0 + 99_000_000_000
    finally:
        m.lease = saved


def test_renewing_while_xdp_counts_loses_no_packet(prog, table):
    """Renew in a loop while the kernel runs the program 300k times on one shunted flow."""
    import threading

    table.shunt_flow(A, 6100, B, 6101, 17)
    key = table.flow_key(A, 6100, B, 6101, 17)[0]
    runs = 300_000
    worker = threading.Thread(target=prog.test_run,
                              args=(udp(A, 6100, B, 6101, b"w"),), kwargs={"repeat": runs})
    worker.start()
    renewals = 0
    while worker.is_alive():
        renewals += table.renew_key(key)
    worker.join()
    assert renewals > 10
    assert table.lookup_key(key).side(1) == (runs, runs * 29)


def test_ipv6_flow_counts_payload_length_plus_40(prog, table):
    from scapy.layers.inet import TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    a6, b6 = "2001:db8::1", "2001:db8::2"
    table.shunt_flow(b6, 443, a6, 50000, 6)
    f = bytes(Ether() / IPv6(src=a6, dst=b6) / TCP(sport=50000, dport=443, flags="A") / (b"6" * 7))
    assert prog.test_run(f).retval == XDP_DROP
    assert table.lookup_flow(a6, 50000, b6, 443, 6).side(1) == (1, 40 + 20 + 7)


def test_pass_all_switch_opens_everything_and_back(prog, table):
    table.shunt_flow(A, 8000, B, 8001, 17)
    frame = udp(A, 8000, B, 8001)
    table.set_pass_all(True)
    try:
        assert prog.test_run(frame).retval == XDP_PASS
    finally:
        table.set_pass_all(False)
    assert prog.test_run(frame).retval == XDP_DROP
    assert table.lookup_flow(A, 8000, B, 8001, 17).pkts1 == 1  # untouched while open


def test_poll_without_wait_reads_the_ring_positions_first(prog, table, ring):
    """poll(0) (every capture batch) looks at the ring's positions before any syscall: an
    empty ring says so, a record makes it ready and is read without waiting."""
    from shuntd.datapath.ring import TcpCloseEvent

    assert ring.ready() is False and ring.poll(0) == []
    table.shunt_flow(A, 41000, B, 443, 6)
    assert prog.test_run(tcp(A, 41000, B, 443, b"", "FA", seq=7, ack=8)).retval == XDP_DROP
    assert ring.ready() is True
    (fin,) = ring.poll(0)
    assert isinstance(fin, TcpCloseEvent) and (fin.seq, fin.ack) == (7, 8)
    assert ring.ready() is False and ring.poll(0) == []


@pytest.mark.parametrize("src,sport,dst,dport,proto", [
    (B, 443, A, 40000, 6),                          # side 2 first
    ("fe80::2", 53, "fe80::1", 5353, 17),
    (A, 3, B, 1, 1),                                # ICMP unreachable: one-way, source first
    (B, 8, A, 0, 1),                                # ICMP echo: ordered like ports
    (A, 7, A, 7, 132),
])
def test_key_bytes_equal_the_ctypes_keys(table, src, sport, dst, dport, proto):
    """The shunt path's keys (bytes from a struct) are the bcc-typed keys' bytes."""
    import ipaddress

    key, side = table.flow_key(src, sport, dst, dport, proto)
    packed_src = ipaddress.ip_address(src).packed
    packed_dst = ipaddress.ip_address(dst).packed
    assert table.flow_key_bytes(packed_src, sport, packed_dst, dport, proto) == (bytes(key),
                                                                                 side)
    fields = table.flow_key_fields(bytes(key))
    assert fields == ((packed_src, sport, packed_dst, dport) if side == 1
                      else (packed_dst, dport, packed_src, sport))
