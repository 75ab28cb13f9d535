"""`shuntd --iface --workers 2` on a real veth pair: two worker processes behind PACKET_FANOUT.

Traffic: many TCP conversations, half opened from each side, both directions injected from the
peer namespace. Expectations come from the frames we built. Which worker handled a connection is
told by the policy itself: it appends "pid sport" to a file at connection_established.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

from lab import Lab, VethPair, lab_fixture, xdp_prog_id  # noqa: F401
from test_live_daemon import Daemon, early_config, policy_file

LAB_PREFIX = "wk"
A, B = "10.79.0.1", "10.79.0.2"
PIN_ROOT = Path("/sys/fs/bpf/shuntd")
ROOT = Path(__file__).resolve().parents[1]
N_CONNS = 24

POLICY = """\
import os

from shuntd.policy import shunt


def connection_established(conn):
    with open({seen!r}, "a") as f:
        f.write(f"{{os.getpid()}} {{conn.orig_p}}\\n")
    if conn.orig_p % 2 == 0:
        shunt(conn, "test")
"""


def _frame(pair: VethPair, src: str, sport: int, dst: str, dport: int, flags: str, seq: int,
           ack: int, payload: bytes = b"") -> bytes:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    return bytes(Ether(dst=pair.host_mac, src=pair.peer_mac) / IP(src=src, dst=dst)
                 / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack) / payload)


def _client_server(sport: int) -> tuple[str, str]:
    """Every other pair of client ports is opened from B: shunted and analysed connections
    in both directions."""
    return (A, B) if sport // 2 % 2 == 0 else (B, A)


def handshake(pair: VethPair, sport: int) -> list[bytes]:
    c, s = _client_server(sport)
    return [_frame(pair, c, sport, s, 80, "S", 1000, 0),
            _frame(pair, s, 80, c, sport, "SA", 5000, 1001)]


def rest(pair: VethPair, sport: int) -> list[bytes]:
    """ACK, 2 x 100 bytes from the client, 3 x 500 from the server, FIN / FIN-ACK / ACK."""
    c, s = _client_server(sport)
    out = [_frame(pair, c, sport, s, 80, "A", 1001, 5001)]
    out += [_frame(pair, c, sport, s, 80, "PA", 1001 + 100 * i, 5001, b"q" * 100)
           for i in range(2)]
    out += [_frame(pair, s, 80, c, sport, "PA", 5001 + 500 * i, 1201, b"r" * 500)
            for i in range(3)]
    out += [_frame(pair, c, sport, s, 80, "FA", 1201, 6501),
            _frame(pair, s, 80, c, sport, "FA", 6501, 1202),
            _frame(pair, c, sport, s, 80, "A", 1202, 6502)]
    return out


def per_conn_totals(frames: list[bytes]) -> dict[tuple[int, str], tuple[int, int]]:
    """(packets, IP bytes) per (client port, sender address), from the frames themselves."""
    out: dict[tuple[int, str], tuple[int, int]] = {}
    for f in frames:
        src = str(ipaddress.IPv4Address(f[26:30]))
        sport, dport = int.from_bytes(f[34:36], "big"), int.from_bytes(f[36:38], "big")
        key = (sport if dport == 80 else dport, src)
        p, b = out.get(key, (0, 0))
        out[key] = (p + 1, b + int.from_bytes(f[16:18], "big"))
    return out


def quiet_veth(lab: Lab, mtu: int | None = None) -> VethPair:
    """A veth pair without IPv6 on either side: the only frames on it are ours."""
    import subprocess

    pair = lab.veth_to_netns(mtu=mtu)
    Path(f"/proc/sys/net/ipv6/conf/{pair.host}/disable_ipv6").write_text("1")
    subprocess.run(["ip", "netns", "exec", str(pair.netns), "sysctl", "-qw",
                    f"net.ipv6.conf.{pair.peer}.disable_ipv6=1"], check=True)
    lab.pin_dir(pair.host)
    time.sleep(0.2)
    return pair


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(x) for x in text.split()]


def scrape(port: int) -> dict[str, float]:
    from docs_check import undocumented

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert undocumented(text) == []  # every family a live parent exposes is in docs/metrics.md
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def wait_for(fn, timeout: float = 10.0):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def owners(seen: Path) -> dict[int, int]:
    """client port -> pid of the worker that saw it established."""
    out: dict[int, int] = {}
    for line in seen.read_text().splitlines():
        pid, port = map(int, line.split())
        assert port not in out, f"connection {port} established in two workers"
        out[port] = pid
    return out


def test_two_workers_log_every_connection_once_with_shunted_counters(lab: Lab, tmp_path: Path):
    from prom import free_port

    pair = quiet_veth(lab)
    seen = tmp_path / "seen.txt"
    pol = policy_file(tmp_path, POLICY.format(seen=str(seen)))
    port = free_port()
    d = Daemon(lab, pair, tmp_path / "logs", "--policy", str(pol), "--workers", "2",
               "--metrics-addr", f"127.0.0.1:{port}",
               "--long-durations", "0.3", "--long-repeat-last")
    pids = children(d.proc.pid)
    assert len(pids) == 2, d.stderr()

    ports = [40000 + i for i in range(N_CONNS)]
    first = [f for p in ports for f in handshake(pair, p)]
    lab.send_frames(pair, first)
    # Every handshake analysed by one worker; the metrics sum the workers' connections.
    m = wait_for(lambda: (s := scrape(port)).get("shuntd_connections_active") == N_CONNS and s)
    assert m, scrape(port)
    per_worker = [m.get(f'shuntd_capture_packets_total{{worker="{w}"}}', -1) for w in "01"]
    assert min(per_worker) > 0 and sum(per_worker) == len(first), per_worker
    assert m['shuntd_capture_kernel_drops_total{worker="0"}'] == 0
    assert m['shuntd_capture_kernel_drops_total{worker="1"}'] == 0
    assert m['shuntd_shunt_table_entries{table="flows"}'] == N_CONNS // 2
    per_worker_conns = [m[f'shuntd_worker_connections_active{{worker="{w}"}}'] for w in "01"]
    assert min(per_worker_conns) > 0 and sum(per_worker_conns) == N_CONNS, per_worker_conns
    assert m['shuntd_worker_messages_dropped_total{worker="0"}'] == 0

    # SIGHUP reaches the policies of both workers.
    before = d.stderr().count("policies loaded")
    d.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: d.stderr().count("policies loaded") == before + 2), d.stderr()

    time.sleep(0.5)  # the rest makes every connection longer than the conn_long duration
    second = [f for p in ports for f in rest(pair, p)]
    lab.send_frames(pair, second)
    time.sleep(1.0)
    for pid in pids:  # as systemd does (KillMode=control-group): workers leave it to the parent
        os.kill(pid, signal.SIGTERM)
    assert d.stop() == 0, d.stderr()
    assert xdp_prog_id(pair.host) == 0
    assert not (PIN_ROOT / pair.host).exists()
    # conn_long.log too is one file, written by the parent, with the analysed connections
    # (their duration grew past 0.3 s while they were open; rows repeat every 0.3 s).
    longs = {int(r["id.orig_p"]) for r in d.log("conn_long") if r["proto"] == "tcp"}
    assert set(ports[1::2]) <= longs <= set(ports), longs

    owner = owners(seen)
    assert sorted(owner) == ports
    assert set(owner.values()) == set(pids), (owner, pids)  # both workers got connections
    sent = per_conn_totals(first + second)
    rows = [r for r in d.log("conn") if r["proto"] == "tcp"]
    by_port: dict[int, dict[str, str]] = {}
    for r in rows:
        client_port = int(r["id.orig_p"])
        assert client_port not in by_port, f"connection {client_port} logged twice"
        by_port[client_port] = r
    assert sorted(by_port) == ports
    for p, r in by_port.items():
        c, s = _client_server(p)
        assert (r["id.orig_h"], r["id.resp_h"], r["conn_state"]) == (c, s, "SF"), r
        assert (r["orig_bytes"], r["resp_bytes"]) == ("200", "1500"), r
        orig = (int(r["orig_pkts"]) + int(r["orig_shunted_pkts"]),
                int(r["orig_ip_bytes"]) + int(r["orig_shunted_bytes"]))
        resp = (int(r["resp_pkts"]) + int(r["resp_shunted_pkts"]),
                int(r["resp_ip_bytes"]) + int(r["resp_shunted_bytes"]))
        assert (orig, resp) == (sent[(p, c)], sent[(p, s)]), r
        if p % 2 == 0:
            assert r["is_shunted"] == "T" and int(r["orig_shunted_pkts"]) > 0, r
            assert int(r["resp_shunted_pkts"]) > 0, r
        else:
            assert r["is_shunted"] == "F" and r["orig_shunted_pkts"] == "0", r
    shunts = d.log("shunt")
    assert sorted(int(s["id.orig_p"]) for s in shunts) == ports[::2]
    assert {s["end_reason"] for s in shunts} == {"fin"}
    assert "2 workers" in d.stderr()


def test_a_dead_worker_stops_the_daemon_and_its_shunts_are_adopted(lab: Lab, tmp_path: Path):
    pair = quiet_veth(lab)
    seen = tmp_path / "seen.txt"
    pol = policy_file(tmp_path, POLICY.format(seen=str(seen)))
    d = Daemon(lab, pair, tmp_path / "run1", "--policy", str(pol), "--workers", "2")
    ports = [41000 + i for i in range(N_CONNS)]
    first = [f for p in ports for f in handshake(pair, p)]
    lab.send_frames(pair, first)
    assert wait_for(lambda: seen.exists() and len(owners(seen)) == N_CONNS), d.stderr()
    time.sleep(0.3)
    second = [f for p in ports for f in rest(pair, p)[:5]]  # data, no FIN: still open
    lab.send_frames(pair, second)
    time.sleep(0.5)
    victim = children(d.proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    assert d.proc.wait(20) == 1, d.stderr()
    d.err.close()
    assert re.search(rf"worker \d \(pid {victim}\) died \(killed by SIGKILL\)", d.stderr())
    assert xdp_prog_id(pair.host) == 0               # failed open
    assert (PIN_ROOT / pair.host / "flows").exists()  # the dead worker's entries are kept

    owner = owners(seen)
    survivor_ports = sorted(p for p, pid in owner.items() if pid != victim)
    victim_ports = sorted(p for p, pid in owner.items() if pid == victim)
    assert survivor_ports and victim_ports
    logged = sorted(int(r["id.orig_p"]) for r in d.log("conn") if r["proto"] == "tcp")
    assert logged == survivor_ports                  # the survivor logged its connections

    # Next start: the dead worker's shunts are logged as orphaned with what XDP counted.
    d2 = Daemon(lab, pair, tmp_path / "run2", "--policy", str(pol))
    assert d2.stop() == 0, d2.stderr()
    orphans = d2.log("shunt")
    assert {o["end_reason"] for o in orphans} == {"orphaned"}
    expect = per_conn_totals(second)
    got: dict[tuple[int, str], tuple[int, int]] = {}
    for o in orphans:
        client = int(o["id.orig_p"]) if o["id.resp_p"] == "80" else int(o["id.resp_p"])
        for h, pk, by in (("id.orig_h", "orig_shunted_pkts", "orig_shunted_bytes"),
                          ("id.resp_h", "resp_shunted_pkts", "resp_shunted_bytes")):
            if int(o[pk]):
                got[(client, o[h])] = (int(o[pk]), int(o[by]))
    want = {k: v for k, v in expect.items() if k[0] in victim_ports and k[0] % 2 == 0}
    assert got == want
    assert not (PIN_ROOT / pair.host).exists()


def test_killed_parent_takes_its_workers_and_xdp_with_it(lab: Lab, tmp_path: Path):
    """Fail open: workers die with the parent and never held the bpf_link."""
    pair = quiet_veth(lab)
    d = Daemon(lab, pair, tmp_path / "logs", "--policy", str(policy_file(tmp_path, "")),
               "--workers", "2")
    pids = children(d.proc.pid)
    assert len(pids) == 2 and xdp_prog_id(pair.host) != 0
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    assert xdp_prog_id(pair.host) == 0
    assert wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), 5), pids


def test_corpus_trace_through_two_workers_conserves_every_connection(lab: Lab, tmp_path: Path):
    """Zeek's ssh.basic trace (23 TCP connections, 1797 packets) replayed into two workers that
    shunt every connection once established: each connection is logged once, and analysed plus
    shunted packets and IP bytes equal what the trace holds (counted here with scapy)."""
    import subprocess

    import pytest
    from scapy.layers.inet import IP, TCP
    from scapy.utils import rdpcap

    trace = ROOT.parent / "shared" / "corpus" / "zeek" / "core" / "ssh.basic" / "trace.pcap"
    if not trace.exists():
        pytest.skip("corpus trace ssh.basic absent")
    want: dict[tuple, tuple[int, int]] = {}
    for pkt in rdpcap(str(trace)):
        if IP in pkt and TCP in pkt:
            k = (pkt[IP].src, pkt[TCP].sport, pkt[IP].dst, pkt[TCP].dport)
            p, b = want.get(k, (0, 0))
            want[k] = (p + 1, b + pkt[IP].len)
    pair = quiet_veth(lab, mtu=9000)  # the trace has TSO-sized frames (up to 5858 bytes)
    seen = tmp_path / "seen.txt"
    pol = policy_file(tmp_path, POLICY.format(seen=str(seen)).replace(
        "if conn.orig_p % 2 == 0:", "if True:"))
    d = Daemon(lab, pair, tmp_path / "logs", "-C", "--policy", str(pol), "--workers", "2")
    subprocess.run(["ip", "netns", "exec", str(pair.netns), "tcpreplay", "-q", "-i", pair.peer,
                    "-p", "2000", str(trace)], check=True, capture_output=True, timeout=60)
    time.sleep(0.5)
    assert d.stop() == 0, d.stderr()
    rows = [r for r in d.log("conn") if r["proto"] == "tcp"]
    keys = [(r["id.orig_h"], int(r["id.orig_p"]), r["id.resp_h"], int(r["id.resp_p"]))
            for r in rows]
    assert len(keys) == len(set(keys)) == 23, keys
    shunted = 0
    for k, r in zip(keys, rows, strict=True):
        back = (k[2], k[3], k[0], k[1])
        assert (int(r["orig_pkts"]) + int(r["orig_shunted_pkts"]),
                int(r["orig_ip_bytes"]) + int(r["orig_shunted_bytes"])) == want.get(k, (0, 0))
        assert (int(r["resp_pkts"]) + int(r["resp_shunted_pkts"]),
                int(r["resp_ip_bytes"]) + int(r["resp_shunted_bytes"])) == want.get(back, (0, 0))
        shunted += r["is_shunted"] == "T"
    assert shunted > 0
    assert len(set(owners(seen).values())) == 2  # both workers had connections


def test_a_hung_worker_is_reported_and_the_parent_keeps_going(lab: Lab, tmp_path: Path):
    """SIGSTOP one worker: the parent warns after 10 s of silence, keeps serving the other,
    and once the worker runs again everything stops cleanly with every connection logged."""
    pair = quiet_veth(lab)
    seen = tmp_path / "seen.txt"
    pol = policy_file(tmp_path, POLICY.format(seen=str(seen)))
    d = Daemon(lab, pair, tmp_path / "logs", "--policy", str(pol), "--workers", "2")
    victim = children(d.proc.pid)[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        ports = [44000 + i for i in range(N_CONNS)]
        lab.send_frames(pair, [f for p in ports for f in handshake(pair, p)])
        assert wait_for(lambda: "has not reported for 10 s" in d.stderr(), 15), d.stderr()
        assert f"(pid {victim})" in d.stderr() and d.proc.poll() is None
        assert any(pid != victim for pid in owners(seen).values())  # the other one works
    finally:
        os.kill(victim, signal.SIGCONT)
    assert wait_for(lambda: "reports again" in d.stderr()), d.stderr()
    assert d.stop() == 0, d.stderr()
    rows = [r for r in d.log("conn") if r["proto"] == "tcp"]
    assert sorted(int(r["id.orig_p"]) for r in rows) == ports


def test_the_parent_keeps_early_shunts_on_for_its_workers_policies(lab: Lab, tmp_path: Path):
    """With workers the parent owns the config: it reads the policy files' EARLY_SHUNT itself,
    pushes the deadline forward every lease/3, follows a SIGHUP and turns them off at stop."""
    from shuntd.datapath import libbpf

    pair = quiet_veth(lab)
    tls = (ROOT / "policies" / "tls.py").read_text()
    pol = policy_file(tmp_path, tls, "tls_copy.py")
    d = Daemon(lab, pair, tmp_path / "logs", "--policy", str(pol), "--workers", "2",
               "--lease", "3")
    fd = libbpf.obj_get(str(PIN_ROOT / pair.host / "config"))
    lab.on_close(lambda: os.close(fd))
    port, trigger, _lease, until = early_config(fd)
    assert (port, trigger) == (443, 1)
    assert wait_for(lambda: early_config(fd)[3] > until, 5)
    pol.write_text(tls.replace('EARLY_SHUNT = "ssl"', "#"))
    d.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: early_config(fd)[0] == 0, 5), d.stderr()
    assert d.stop() == 0, d.stderr()
    assert early_config(fd) == (0, 0, 0, 0)
