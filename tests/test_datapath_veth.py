"""The live datapath on a real veth pair: what XDP drops never reaches an AF_PACKET tap.

Topology: a veth pair, host side in the root namespace with the program attached, peer side in
a namespace the test creates. Frames of *both* directions of a flow are injected from the peer
(AF_PACKET), so every packet crosses the one XDP hook; the tap on the host side sees what XDP
passed. Expected counters are the packets and IPv4 total lengths of the frames we built.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest
from lab import Lab, VethPair, lab_fixture, xdp_prog_id  # noqa: F401

LAB_PREFIX = "d2"
A, B, C = "10.77.0.1", "10.77.0.2", "10.77.0.3"  # A < B: A is side 1


def frame(pair: VethPair, src: str, sport: int, dst: str, dport: int, proto: str = "tcp",
          payload: bytes = b"", flags: str = "A", seq: int = 1, ack: int = 1) -> bytes:
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether

    l4 = (TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack) if proto == "tcp"
          else UDP(sport=sport, dport=dport))
    return bytes(Ether(dst=pair.host_mac, src=pair.peer_mac) / IP(src=src, dst=dst) / l4
                 / payload)


def flows_seen(frames: list[bytes]) -> dict[tuple[str, int, str, int], int]:
    """Count the IPv4 TCP/UDP frames the tap saw, by (src, sport, dst, dport)."""
    import ipaddress

    seen: dict[tuple[str, int, str, int], int] = {}
    for f in frames:
        if len(f) < 38 or f[12:14] != b"\x08\x00" or f[23] not in (6, 17):
            continue
        ihl = (f[14] & 0x0F) * 4
        sport, dport = struct.unpack_from("!HH", f, 14 + ihl)
        k = (str(ipaddress.IPv4Address(f[26:30])), sport,
             str(ipaddress.IPv4Address(f[30:34])), dport)
        seen[k] = seen.get(k, 0) + 1
    return seen


def open_dp(lab: Lab, pair: VethPair, **kwargs):
    from shuntd.datapath.loader import open_datapath

    lab.pin_dir(pair.host)  # removed at lab close whatever happens
    dp = open_datapath(pair.host, **kwargs)
    lab.on_close(dp.close)
    return dp


def test_shunted_flow_disappears_and_is_counted_per_side(lab: Lab):
    from shuntd.datapath.iface import XdpMode
    from shuntd.datapath.ring import TcpCloseEvent
    from shuntd.datapath.table import ShuntResult

    pair = lab.veth_to_netns()
    dp = open_dp(lab, pair)
    assert dp.mode is XdpMode.NATIVE and not dp.frags
    assert xdp_prog_id(pair.host) == dp.attachment.prog_id
    tap = lab.sniffer(pair.host)
    assert dp.table.shunt_flow(B, 80, A, 40000, 6) is ShuntResult.OK
    _, side_a = dp.table.flow_key(A, 40000, B, 80, 6)
    tap.drain()
    shunted = ([frame(pair, A, 40000, B, 80, payload=b"a" * 100)] * 5  # 140 B each
               + [frame(pair, B, 80, A, 40000, payload=b"b" * 1000)] * 3)  # 1040 B each
    other = [frame(pair, A, 40001, B, 80, payload=b"c")] * 4
    closing = [frame(pair, A, 40000, B, 80, flags="FA", seq=5001, ack=7001),  # 40 B
               frame(pair, B, 80, A, 40000, flags="R", seq=7001, ack=0)]  # 40 B
    lab.send_frames(pair, shunted + other + closing)
    seen = flows_seen(tap.collect(0.3))
    assert seen.get((A, 40000, B, 80), 0) == 0 and seen.get((B, 80, A, 40000), 0) == 0
    assert seen[(A, 40001, B, 80)] == 4

    events = dp.ring.poll(200)
    closes = [e for e in events if isinstance(e, TcpCloseEvent)]
    assert [(e.fin, e.rst, e.side, e.seq, e.ack) for e in closes] == [
        (True, False, side_a, 5001, 7001), (False, True, 3 - side_a, 7001, 0)]

    final = dp.table.unshunt_flow(A, 40000, B, 80, 6)
    assert final.side(side_a) == (5 + 1, 5 * 140 + 40)
    assert final.side(3 - side_a) == (3 + 1, 3 * 1040 + 40)
    stats = dp.stats()
    assert stats["dropped_flow"] == 10 and stats["bytes_dropped_flow"] == 700 + 3120 + 80

    tap.drain()
    lab.send_frames(pair, shunted[:1])
    assert flows_seen(tap.collect(0.2)).get((A, 40000, B, 80)) == 1  # visible again


def test_expired_lease_makes_the_flow_visible_again(lab: Lab):
    from shuntd.datapath.ring import LeaseExpiredEvent

    pair = lab.veth_to_netns()
    dp = open_dp(lab, pair, lease_seconds=0.3)
    tap = lab.sniffer(pair.host)
    dp.table.shunt_flow(A, 5353, B, 53, 17)
    f = frame(pair, A, 5353, B, 53, proto="udp", payload=b"q")
    tap.drain()
    lab.send_frames(pair, [f])
    assert flows_seen(tap.collect(0.1)) == {}
    time.sleep(0.4)
    lab.send_frames(pair, [f, f])
    assert flows_seen(tap.collect(0.2)) == {(A, 5353, B, 53): 2}
    events = dp.ring.poll(100)
    assert [type(e) for e in events] == [LeaseExpiredEvent]
    assert events[0].key_bytes == bytes(dp.table.flow_key(A, 5353, B, 53, 17)[0])
    assert dp.table.lookup_flow(A, 5353, B, 53, 17).pkts1 == 1


def test_generic_mode_is_reported_and_drops(lab: Lab):
    from shuntd.datapath.iface import XdpMode

    pair = lab.veth_to_netns()
    dp = open_dp(lab, pair, mode="generic", pin=False)
    assert dp.mode is XdpMode.GENERIC
    tap = lab.sniffer(pair.host)
    dp.table.shunt_pair(A, B)
    tap.drain()
    lab.send_frames(pair, [frame(pair, A, 1, B, 2, proto="udp"), frame(pair, A, 1, C, 2)])
    assert flows_seen(tap.collect(0.2)) == {(A, 1, C, 2): 1}
    assert dp.table.unshunt_pair(A, B).side(1) == (1, 28)


def test_jumbo_mtu_loads_the_frags_aware_program(lab: Lab):
    from shuntd.datapath.iface import XdpMode

    pair = lab.veth_to_netns(mtu=9000)
    dp = open_dp(lab, pair, pin=False)
    assert dp.mode is XdpMode.NATIVE and dp.frags
    tap = lab.sniffer(pair.host)
    dp.table.shunt_flow(A, 9, B, 9, 17)
    tap.drain()
    lab.send_frames(pair, [frame(pair, A, 9, B, 9, proto="udp", payload=b"j" * 8000),
                           frame(pair, A, 10, B, 9, proto="udp", payload=b"k" * 8000)])
    assert flows_seen(tap.collect(0.2)) == {(A, 10, B, 9): 1}
    assert dp.table.lookup_flow(A, 9, B, 9, 17).side(1) == (1, 8028)


def test_full_map_leaves_the_extra_flow_visible(lab: Lab):
    from shuntd.datapath.table import ShuntResult

    pair = lab.veth_to_netns()
    dp = open_dp(lab, pair, pin=False, flows_max=2)
    got = [dp.table.shunt_flow(A, 100 + i, B, 80, 6) for i in range(3)]
    assert got == [ShuntResult.OK, ShuntResult.OK, ShuntResult.FULL]
    assert (dp.table.occupancy, dp.table.capacity) == (2, 2)
    tap = lab.sniffer(pair.host)
    tap.drain()
    lab.send_frames(pair, [frame(pair, A, 100 + i, B, 80) for i in range(3)])
    assert flows_seen(tap.collect(0.2)) == {(A, 102, B, 80): 1}


def test_missing_and_down_interfaces_are_clear_errors(lab: Lab):
    from shuntd.datapath.errors import InterfaceDownError, InterfaceMissingError
    from shuntd.datapath.loader import open_datapath

    with pytest.raises(InterfaceMissingError, match="does not exist"):
        open_datapath(lab.name("z"))
    pair = lab.veth_to_netns(up=False)
    lab.pin_dir(pair.host)
    with pytest.raises(InterfaceDownError, match="is down"):
        open_datapath(pair.host)


LOADER = textwrap.dedent(
    """
    import sys, time
    from shuntd.datapath.loader import open_datapath
    dp = open_datapath(sys.argv[1], lease_seconds=600)
    dp.table.shunt_flow(sys.argv[2], 1234, sys.argv[3], 80, 6)
    print("ready", dp.attachment.prog_id, flush=True)
    time.sleep(120)
    """
)


def test_sigkill_detaches_program_and_pinned_counters_survive(lab: Lab):
    from shuntd.datapath.loader import open_datapath

    pair = lab.veth_to_netns()
    lab.pin_dir(pair.host)
    child = subprocess.Popen([sys.executable, "-c", LOADER, pair.host, A, B],
                             stdout=subprocess.PIPE, text=True)
    lab.on_close(lambda: child.poll() is None and child.kill())
    line = child.stdout.readline()
    assert line.startswith("ready"), f"loader failed: {line!r}"
    assert xdp_prog_id(pair.host) == int(line.split()[1])
    tap = lab.sniffer(pair.host)
    f = frame(pair, A, 1234, B, 80, payload=b"x" * 10)  # 50 B
    tap.drain()
    lab.send_frames(pair, [f] * 3)
    assert flows_seen(tap.collect(0.2)) == {}

    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    deadline = time.monotonic() + 5
    while xdp_prog_id(pair.host) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert xdp_prog_id(pair.host) == 0, "XDP program outlived the killed loader"
    tap.drain()
    lab.send_frames(pair, [f])
    assert flows_seen(tap.collect(0.2)) == {(A, 1234, B, 80): 1}  # fail open

    # the next start adopts the pinned maps: the entry and its counters are still there
    dp = open_datapath(pair.host)
    lab.on_close(dp.close)
    assert dp.adopted
    c = dp.table.lookup_flow(A, 1234, B, 80, 6)
    assert c is not None and c.side(1) == (3, 150)
    assert dp.table.occupancy == 1
    dp.close(unpin=True)
    assert not (dp.pin_dir / "flows").exists()


def test_pins_of_another_map_size_are_refused_not_silently_adopted(lab: Lab):
    from shuntd.datapath.errors import PinError
    from shuntd.datapath.loader import open_datapath

    pair = lab.veth_to_netns()
    dp = open_dp(lab, pair, flows_max=64)
    dp.table.shunt_flow(A, 1, B, 2, 17)
    dp.close()  # keeps the pins
    assert (dp.pin_dir / "flows").exists() and xdp_prog_id(pair.host) == 0
    with pytest.raises(PinError, match=r"remove .*counters are lost"):
        open_datapath(pair.host, flows_max=128)
    assert xdp_prog_id(pair.host) == 0
    again = open_datapath(pair.host, flows_max=64)
    lab.on_close(again.close)
    assert again.adopted and again.table.occupancy == 1


def test_pair_lease_expiry_and_fin_through_a_pair_are_reported(lab: Lab):
    from shuntd.datapath.ring import LeaseExpiredEvent, TcpCloseEvent

    pair = lab.veth_to_netns()
    dp = open_dp(lab, pair, pin=False)
    dp.table.shunt_pair(A, B, lease_seconds=0.3)
    lab.send_frames(pair, [frame(pair, B, 443, A, 5000, flags="FA", seq=42, ack=43)])
    time.sleep(0.4)
    lab.send_frames(pair, [frame(pair, A, 5000, B, 443)])
    events = dp.ring.poll(200)
    assert [type(e) for e in events] == [TcpCloseEvent, LeaseExpiredEvent], (
        [(type(e).__name__, e.side, e.event_seq) for e in events], str(dp.stats()))
    fin, lease = events
    assert fin.via_pair and fin.side == 2 and (fin.seq, fin.ack) == (42, 43)
    assert fin.key_bytes == bytes(dp.table.flow_key(A, 5000, B, 443, 6)[0])
    assert lease.is_pair and lease.side == 1
    assert dp.ring.endpoints(lease)[0::2] == (ipaddress.IPv4Address(A),
                                               ipaddress.IPv4Address(B))


def test_real_udp_between_namespaces_with_xdp_inside_a_namespace(lab: Lab):
    """Real sockets, program attached inside the receiving namespace (the daemon may run
    in one): a shunted 5-tuple stops reaching the server socket, others still do."""
    import socket

    from lab import inside_netns
    from shuntd.datapath.loader import open_datapath

    ns_a, ns_b = lab.netns(), lab.netns()
    _, if_b = lab.veth_between(ns_a, ns_b, "10.78.0.1", "10.78.0.2")
    with inside_netns(ns_b):
        dp = open_datapath(if_b, pin=False)
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    lab.on_close(dp.close)
    lab.on_close(server.close)
    server.bind(("10.78.0.2", 9999))
    server.settimeout(0.3)
    with inside_netns(ns_a):
        shunted = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with shunted, other:
        shunted.bind(("10.78.0.1", 7777))
        other.bind(("10.78.0.1", 7778))
        shunted.sendto(b"warm-up", ("10.78.0.2", 9999))  # resolves ARP before the shunt
        assert server.recvfrom(100)[0] == b"warm-up"
        dp.table.shunt_flow("10.78.0.1", 7777, "10.78.0.2", 9999, 17)
        for _ in range(4):
            shunted.sendto(b"s" * 20, ("10.78.0.2", 9999))  # 48 IP bytes each
        other.sendto(b"visible", ("10.78.0.2", 9999))
        assert server.recvfrom(100) == (b"visible", ("10.78.0.1", 7778))
        with pytest.raises(TimeoutError):
            server.recvfrom(100)
        final = dp.table.unshunt_flow("10.78.0.1", 7777, "10.78.0.2", 9999, 17)
        assert final.side(1) == (4, 4 * 48)
