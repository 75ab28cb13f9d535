"""The live daemon's shunt lifecycle on a real veth (issue 4): VLAN and QinQ traffic, a shunted
connection busy past the TCP inactivity timeout, a full ring buffer, IP-pair shunts and lapsed
leases, and packets whose checksum the kernel left to the NIC.

Frames are injected from the peer namespace (AF_PACKET) as in test_live_daemon.py; expected
packet and byte counts come from the frames we built, expected histories from Zeek's rules
applied by hand to the conversation (test_live_daemon.rest: ACK, 3 x 100 bytes orig,
2 x 1000 bytes resp, FIN / FIN-ACK / ACK gives "ShADdFf" when every packet is analysed).
"""

from __future__ import annotations

import signal
import socket
import time
import urllib.request
from pathlib import Path

from lab import Lab, VethPair, inside_netns, lab_fixture  # noqa: F401
from test_live_daemon import (
    SHUNT_AT_ESTABLISHED,
    Daemon,
    frame,
    handshake,
    policy_file,
    rest,
    sent_totals,
)

LAB_PREFIX = "l1s"
A, B = "10.78.0.1", "10.78.0.2"


def _wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def _row(d: Daemon, sport: int, log: str = "conn") -> list[dict[str, str]]:
    return [r for r in d.log(log) if r.get("id.orig_p") == str(sport)]


def _totals(r: dict[str, str], direction: str) -> tuple[int, int]:
    return (int(r[f"{direction}_pkts"]) + int(r[f"{direction}_shunted_pkts"]),
            int(r[f"{direction}_ip_bytes"]) + int(r[f"{direction}_shunted_bytes"]))


def _tagged(frames: list[bytes], tags: list[tuple[int, int]]) -> list[bytes]:
    """Insert 802.1Q/802.1ad tags (tpid, vid), outermost first, after the MAC addresses."""
    hdr = b"".join(tpid.to_bytes(2, "big") + vid.to_bytes(2, "big") for tpid, vid in tags)
    return [f[:12] + hdr + f[12:] for f in frames]


def test_vlan_and_qinq_traffic_is_shunted_and_accounted(lab: Lab, tmp_path: Path):
    """Zeek's connection key has no VLAN, so neither do shuntd's: tagged connections are
    shunted like untagged ones, with every packet accounted and Zeek's history."""
    pair = lab.veth_to_netns()
    lab.pin_dir(pair.host)
    d = Daemon(lab, pair, tmp_path / "vlan", "--policy",
               str(policy_file(tmp_path, SHUNT_AT_ESTABLISHED)))
    sent = {}
    for sport, tags in ((44001, [(0x8100, 10)]), (44002, [(0x88A8, 20), (0x8100, 30)])):
        first = _tagged(handshake(pair, sport), tags)
        lab.send_frames(pair, first)
        time.sleep(0.7)
        second = _tagged(rest(pair, sport), tags)
        lab.send_frames(pair, second)
        time.sleep(0.3)
        untagged = handshake(pair, sport) + rest(pair, sport)
        sent[sport] = sent_totals(untagged)
    time.sleep(0.5)
    assert d.stop() == 0, d.stderr()
    for sport, totals in sent.items():
        (r,) = _row(d, sport)
        assert r["is_shunted"] == "T", (sport, r)
        # The VLAN header is not IP: IP bytes are the same as untagged.
        assert _totals(r, "orig") == totals[A] and _totals(r, "resp") == totals[B]
        assert int(r["orig_shunted_pkts"]) >= 5 and int(r["resp_shunted_pkts"]) >= 2
        assert (r["conn_state"], r["orig_bytes"], r["resp_bytes"]) == ("SF", "300", "2000")
        assert r["history"] == "ShADdFf" and r["missed_bytes"] == "0"


def test_busy_shunted_connection_outlives_inactivity_timeout_and_is_logged_once(
        lab: Lab, tmp_path: Path):
    """The analyser sees nothing for 5 s (more than twice the 2 s TCP inactivity timeout);
    XDP does. The connection is kept, and logged once when its FINs come, with its whole
    duration."""
    pair = lab.veth_to_netns()
    lab.pin_dir(pair.host)
    d = Daemon(lab, pair, tmp_path / "busy", "--policy",
               str(policy_file(tmp_path, SHUNT_AT_ESTABLISHED)),
               "--tcp-inactivity-timeout", "2", "--shunted-inactivity-timeout", "1",
               "--tcp-close-delay", "0.5")
    sport = 45000
    frames = handshake(pair, sport) + [frame(pair, A, sport, B, 80, "A", 1001, 5001)]
    lab.send_frames(pair, frames[:2])
    time.sleep(0.7)
    lab.send_frames(pair, frames[2:])
    start = time.monotonic()
    seq = 1001
    while time.monotonic() - start < 5.0:
        f = frame(pair, A, sport, B, 80, "PA", seq, 5001, b"x" * 100)
        lab.send_frames(pair, [f])
        frames.append(f)
        seq += 100
        time.sleep(0.25)
    fins = [frame(pair, A, sport, B, 80, "FA", seq, 5001),
            frame(pair, B, 80, A, sport, "FA", 5001, seq + 1),
            frame(pair, A, sport, B, 80, "A", seq + 1, 5002)]
    lab.send_frames(pair, fins)
    frames += fins
    # Logged when it really ends (close delay 0.5 s), while the daemon still runs.
    assert _wait_for(lambda: _row(d, sport), 6.0), d.stderr()
    assert d.stop() == 0, d.stderr()
    rows = _row(d, sport)
    assert len(rows) == 1, rows
    r = rows[0]
    sent = sent_totals(frames)
    assert _totals(r, "orig") == sent[A] and _totals(r, "resp") == sent[B]
    assert float(r["duration"]) >= 5.0
    assert (r["conn_state"], r["orig_bytes"], r["resp_bytes"]) == ("SF", str(seq - 1001), "0")
    assert r["history"] == "ShADFf"
    (s,) = _row(d, sport, "shunt")
    assert s["end_reason"] == "fin"


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_ring_buffer_full_counts_lost_events_and_timers_still_end_shunts(
        lab: Lab, tmp_path: Path):
    """With the daemon stopped (SIGSTOP), 4000 FIN events of one flow overflow the 256 KiB
    ring; the FIN events of a second flow are then lost. Defined outcome: the loss is counted
    (ring_events_lost), the first flow ends by its FIN, the second by the inactivity timer
    (its map entry shows no traffic), each with all its packets accounted."""
    from prom import free_port

    pair = lab.veth_to_netns()
    lab.pin_dir(pair.host)
    port = free_port()
    d = Daemon(lab, pair, tmp_path / "ring", "--policy",
               str(policy_file(tmp_path, SHUNT_AT_ESTABLISHED)),
               "--tcp-inactivity-timeout", "2", "--shunted-inactivity-timeout", "1",
               "--tcp-close-delay", "0.5", "--metrics-addr", f"127.0.0.1:{port}")
    s1, s2 = 46001, 46002
    sent: dict[int, list[bytes]] = {s1: handshake(pair, s1), s2: handshake(pair, s2)}
    lab.send_frames(pair, sent[s1] + sent[s2])
    time.sleep(0.7)
    d.proc.send_signal(signal.SIGSTOP)
    try:
        fin = frame(pair, A, s1, B, 80, "FA", 1001, 5001)
        lab.send_frames(pair, [fin] * 4000)
        sent[s1] += [fin] * 4000
        tail = rest(pair, s2)
        lab.send_frames(pair, tail)
        sent[s2] += tail
    finally:
        d.proc.send_signal(signal.SIGCONT)
    assert _wait_for(lambda: _metric(port, "shuntd_ring_events_lost") > 0), d.stderr()
    assert _wait_for(lambda: _row(d, s2) and _row(d, s1), 10.0), d.stderr()
    assert d.stop() == 0, d.stderr()
    for sport in (s1, s2):
        (r,) = _row(d, sport)
        totals = sent_totals(sent[sport])
        assert r["is_shunted"] == "T"
        assert _totals(r, "orig") == totals[A], sport
        if B in totals:
            assert _totals(r, "resp") == totals[B], sport
    (r2,) = _row(d, s2)
    # Its FINs never reached the analyser: as for a sensor that missed them, the connection
    # stays "established" and the final ACKs' sequence numbers count each FIN's octet (Zeek
    # subtracts it only for a FIN it saw); letters and sizes come from the entry.
    assert (r2["conn_state"], r2["orig_bytes"], r2["resp_bytes"]) == ("S1", "301", "2001")
    assert r2["history"] == "ShADd"
    reasons = {r["id.orig_p"]: r["end_reason"] for r in d.log("shunt")}
    assert reasons == {str(s1): "fin", str(s2): "timeout"}


IP_PAIR_POLICY = """\
from shuntd.policy import shunt_ip_pair


def connection_established(conn):
    shunt_ip_pair(conn.orig_h, conn.resp_h, "ip_pair", duration=1.5)
"""


def test_ip_pair_shunt_ends_after_its_duration_and_reports_counters(lab: Lab,
                                                                    tmp_path: Path):
    pair = lab.veth_to_netns()
    lab.pin_dir(pair.host)
    d = Daemon(lab, pair, tmp_path / "pair", "--policy",
               str(policy_file(tmp_path, IP_PAIR_POLICY)), "--lease", "1.5")
    sport = 47000
    lab.send_frames(pair, handshake(pair, sport))
    time.sleep(0.7)
    during = rest(pair, sport)[:6]  # ACK, 3 x orig data, 2 x resp data: dropped by the pair
    lab.send_frames(pair, during)
    assert _wait_for(lambda: d.log("shunt") != [], 6.0), d.stderr()
    after = rest(pair, sport)[6:]  # FIN, FIN-ACK, ACK: the pair shunt is over, analysed
    lab.send_frames(pair, after)
    time.sleep(0.5)
    assert d.stop() == 0, d.stderr()
    (s,) = [x for x in d.log("shunt") if x["kind"] == "ip_pair"]
    dropped = sent_totals(during)
    assert (s["end_reason"], s["trigger"], s["uid"]) == ("timeout", "ip_pair", "-")
    assert {s["id.orig_h"], s["id.resp_h"]} == {A, B}
    by_side = {s["id.orig_h"]: (int(s["orig_shunted_pkts"]), int(s["orig_shunted_bytes"])),
               s["id.resp_h"]: (int(s["resp_shunted_pkts"]), int(s["resp_shunted_bytes"]))}
    assert by_side == dropped
    assert float(s["end"]) - float(s["start"]) < 1.5 + 1.0
    # The connection itself was analysed outside the pair shunt: its FINs close it.
    (r,) = _row(d, sport)
    assert r["conn_state"] == "SF"


def test_lapsed_lease_ends_the_shunt_and_the_flow_is_analysed_again(lab: Lab,
                                                                     tmp_path: Path):
    """The daemon hangs (SIGSTOP) longer than the lease: XDP passes the flow again (fail
    open) and reports it; the daemon, back, logs the shunt with reason lease and its
    counters; the connection's totals still equal what was sent."""
    pair = lab.veth_to_netns()
    lab.pin_dir(pair.host)
    d = Daemon(lab, pair, tmp_path / "lease", "--policy",
               str(policy_file(tmp_path, SHUNT_AT_ESTABLISHED)), "--lease", "1")
    sport = 48000
    first = handshake(pair, sport)
    lab.send_frames(pair, first)
    time.sleep(0.7)
    conv = rest(pair, sport)
    lab.send_frames(pair, conv[:4])  # ACK + 3 x orig data: shunted
    d.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(1.5)
        lab.send_frames(pair, conv[4:])  # lease lapsed: passed to the capture ring
    finally:
        d.proc.send_signal(signal.SIGCONT)
    time.sleep(1.0)
    assert d.stop() == 0, d.stderr()
    (s,) = _row(d, sport, "shunt")
    assert s["end_reason"] == "lease"
    shunted = sent_totals(conv[:4])
    assert (int(s["orig_shunted_pkts"]), int(s["orig_shunted_bytes"])) == shunted[A]
    assert s["resp_shunted_pkts"] == "0"
    (r,) = _row(d, sport)
    totals = sent_totals(first + conv)
    assert _totals(r, "orig") == totals[A] and _totals(r, "resp") == totals[B]
    assert (r["conn_state"], r["orig_bytes"], r["resp_bytes"]) == ("SF", "300", "2000")
    assert r["history"] == "ShADdFf" and r["missed_bytes"] == "0"


def test_checksum_left_to_the_nic_is_not_a_bad_checksum(lab: Lab, tmp_path: Path):
    """A real TCP connection from the peer namespace with tx checksum offload on: the kernel
    hands the capture its packets with the checksum not filled in (TP_STATUS_CSUM_NOTREADY).
    Without -C the daemon must not count them as bad checksums (no C in the history)."""
    import subprocess
    import threading

    pair = lab.veth_to_netns(host_addr="10.79.0.1", peer_addr="10.79.0.2")
    assert pair.netns is not None
    subprocess.run(["ip", "netns", "exec", pair.netns, "ethtool", "-K", pair.peer, "tx", "on"],
                   check=True, capture_output=True)
    d = Daemon(lab, pair, tmp_path / "csum", "--policy", str(policy_file(tmp_path, "", "n.py")))
    srv = socket.socket()
    srv.bind(("10.79.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    got = []

    def serve() -> None:
        c, _ = srv.accept()
        with c:
            while chunk := c.recv(65536):
                got.append(len(chunk))
            c.sendall(b"bye")

    t = threading.Thread(target=serve)
    t.start()
    with inside_netns(pair.netns):
        cli = socket.create_connection(("10.79.0.1", port), timeout=5)
    with cli:
        cli.sendall(b"y" * 5000)
        cli.shutdown(socket.SHUT_WR)
        assert cli.recv(10) == b"bye"
    t.join(5)
    srv.close()
    time.sleep(0.5)
    assert d.stop() == 0, d.stderr()
    (r,) = [x for x in d.log("conn") if x["id.resp_p"] == str(port)]
    assert sum(got) == 5000
    # The responder (this host) sends through the host side: outgoing, not captured. The
    # originator's packets all count, none as a bad checksum.
    assert r["orig_bytes"] == "5000" and "C" not in r["history"].upper(), r
    assert r["history"].startswith("SAD") and int(r["orig_pkts"]) >= 4, r


def test_xdp_records_zeek_letters_in_order_and_sequence_wraps():
    """BPF_PROG_TEST_RUN on the real program: the letters dropped packets would have given
    (Zeek: D = no SYN/FIN/RST with payload, A = without payload with ACK; FIN/RST give none)
    with their order, the highest next seq/ack per side with wraps past 2^32, and SYN passed
    uncounted (a new connection on the same ports)."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from shuntd.datapath.program import HEADER, XdpProgram
    from shuntd.datapath.table import ShuntTable

    a, b = "10.0.0.1", "10.0.0.2"  # a < b: a is side 1

    def tcp(src, sport, dst, dport, flags, seq, ack, payload=b""):
        return bytes(Ether() / IP(src=src, dst=dst)
                     / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack) / payload)

    prog = XdpProgram.compile(flows_max=16, pairs_max=4)
    table = ShuntTable(prog, lease_seconds=30)
    try:
        key, side = table.flow_key(a, 1000, b, 80, 6)
        assert side == 1
        start_a, start_b = 0xFFFFFF00, 5000
        table.shunt_key(key, tcp_start=(start_a, start_b, start_b, start_a))
        frames = [
            tcp(b, 80, a, 1000, "A", start_b, start_a),                 # a (side 2 ack)
            tcp(a, 1000, b, 80, "PA", start_a, start_b, b"x" * 0x200),  # D, wraps 2^32
            tcp(b, 80, a, 1000, "A", start_b, 0x100),                   # ack wraps too
            tcp(a, 1000, b, 80, "FA", 0x100, start_b),                  # FIN: no letter
            tcp(b, 80, a, 1000, "PA", start_b, 0x101, b"y" * 10),       # d
            tcp(a, 1000, b, 80, "A", 0x101, start_b + 10),              # A
            tcp(a, 1000, b, 80, "PA", 0x50, start_b, b"z" * 5),         # old data: no step
        ]
        for f in frames:
            assert prog.test_run(f).retval == 1  # XDP_DROP
        syn = tcp(a, 1000, b, 80, "S", 77, 0)
        assert prog.test_run(syn).retval == 2  # XDP_PASS
        c = table.lookup_key(key)
        assert (c.pkts1, c.pkts2) == (4, 3)
        letters = (c.flags >> HEADER["SHUNT_F_TCP_LETTERS_SHIFT"]) & 0xF
        ranks = [(c.flags >> (HEADER["SHUNT_F_TCP_RANK_SHIFT"] + 2 * i)) & 3 for i in range(4)]
        # letter i: 0 D side 1, 1 A side 1, 2 D side 2, 3 A side 2; order a, D, d, A
        assert letters == 0xF and ranks == [1, 3, 2, 0]
        assert (c.tcp_next1, c.tcp_ack1, c.tcp_next2, c.tcp_ack2) == (
            0x100 + 1, start_b + 10, start_b + 10, 0x101)
        assert c.tcp_wraps == (1, 0, 0, 1)
    finally:
        table.unshunt_key(key)
        table.close()
        prog.close()


SHUNT_EVERYTHING = """\
from shuntd.policy import shunt


def new_connection(conn):
    shunt(conn, "test")


def connection_established(conn):
    shunt(conn, "test")
"""


def test_tunnels_are_never_shunted_by_flow(lab: Lab, tmp_path: Path):
    """XDP sees only outer headers: shunting a VXLAN connection would drop everything inside
    it, and an inner connection's key never matches in the kernel. Both are refused (counted as
    result=error, logged once) and every packet reaches the analyser."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN

    pair = lab.veth_to_netns()
    lab.pin_dir(pair.host)
    d = Daemon(lab, pair, tmp_path / "vxlan", "--policy",
               str(policy_file(tmp_path, SHUNT_EVERYTHING)))

    def vx(src: str, dst: str, inner: bytes) -> bytes:
        return bytes(Ether(dst=pair.host_mac, src=pair.peer_mac) / IP(src=src, dst=dst)
                     / UDP(sport=40000, dport=4789) / VXLAN(vni=7) / Ether(inner))

    inner = handshake(pair, 46000) + rest(pair, 46000)
    frames = [vx(A, B, f) for f in inner]
    lab.send_frames(pair, frames[:2])
    time.sleep(0.7)
    lab.send_frames(pair, frames[2:])
    time.sleep(0.7)
    assert d.stop() == 0, d.stderr()
    rows = d.log("conn")
    (outer,) = [r for r in rows if r["id.resp_p"] == "4789"]
    (tcp,) = [r for r in rows if r["id.orig_p"] == "46000"]
    assert outer["is_shunted"] == "F" and tcp["is_shunted"] == "F", (outer, tcp)
    assert outer["service"] == "vxlan" and tcp["tunnel_parents"] == outer["uid"]
    assert int(outer["orig_pkts"]) == len(frames)        # the analyser saw every packet
    assert tcp["history"] == "ShADdFf" and tcp["conn_state"] == "SF"
    assert "not shunting" in d.stderr()
    tunnels = d.log("tunnel")  # Zeek's tunnel.log, live as offline
    assert [(t["tunnel_type"], t["action"]) for t in tunnels][:1] == [("Tunnel::VXLAN",
                                                                      "Tunnel::DISCOVER")]


def test_a_restart_keeps_the_previous_runs_logs(lab: Lab, tmp_path: Path):
    """A restart (after a crash too) must not overwrite conn.log: the earlier file is set aside
    under Zeek's rotated name, conn.<last write>.log, and the new run starts a fresh one."""
    from test_live_daemon import conversation

    pair = lab.veth_to_netns()
    lab.pin_dir(pair.host)
    logs = tmp_path / "restart"
    first = Daemon(lab, pair, logs)
    conversation(lab, pair, 47001)
    assert first.stop() == 0, first.stderr()
    assert [r["id.orig_p"] for r in first.log("conn") if r["proto"] == "tcp"] == ["47001"]
    second = Daemon(lab, pair, logs)
    conversation(lab, pair, 47002)
    assert second.stop() == 0, second.stderr()
    assert [r["id.orig_p"] for r in second.log("conn") if r["proto"] == "tcp"] == ["47002"]
    kept = sorted(logs.glob("conn.*.log"))
    assert len(kept) == 1, kept
    assert "47001" in kept[0].read_text() and "kept the previous run's log" in second.stderr()


def test_sighup_reopens_the_logs_for_logrotate(lab: Lab, tmp_path: Path):
    """logrotate moves conn.log away and sends SIGHUP (`systemctl reload`): the moved file is
    closed whole (`#close`), the next record starts a new conn.log with its header."""
    from test_live_daemon import conversation

    pair = lab.veth_to_netns()
    lab.pin_dir(pair.host)
    logs = tmp_path / "rotate"
    d = Daemon(lab, pair, logs, "--tcp-close-delay", "0.2")
    conversation(lab, pair, 48001)
    assert _wait_for(lambda: _row(d, 48001)), d.stderr()
    (logs / "conn.log").rename(logs / "conn.1.log")
    d.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    conversation(lab, pair, 48002)
    assert d.stop() == 0, d.stderr()
    old = (logs / "conn.1.log").read_text().splitlines()
    assert old[-1].startswith("#close") and any("\t48001\t" in x for x in old)
    new = (logs / "conn.log").read_text().splitlines()
    assert new[0].startswith("#separator") and any("\t48002\t" in x for x in new)
    assert not any("\t48001\t" in x for x in new)
