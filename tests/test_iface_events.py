"""The interface goes down, comes back, loses its XDP program, or is deleted while shuntd runs.

Defined outcomes (daemon.py `_LinkGuard`): down -> a warning, keep running; up -> logged, XDP
re-attached if it was lost; deleted -> an error, every open connection logged, exit status 1
(systemd restarts shuntd). With two workers a down/up must not move a connection to the other
worker: the kernel re-links the fanout members in socket creation order, which is the order we
joined them in.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from lab import Lab, lab_fixture, xdp_prog_id  # noqa: F401
from test_live_daemon import Daemon, policy_file
from test_workers import (
    POLICY,
    _client_server,
    handshake,
    owners,
    per_conn_totals,
    quiet_veth,
    rest,
    wait_for,
)

LAB_PREFIX = "ie"
PIN_ROOT = Path("/sys/fs/bpf/shuntd")


def _ip_link(*args: str) -> None:
    subprocess.run(["ip", "link", *args], check=True)


def _check_rows(d: Daemon, ports: list[int], sent: dict) -> None:
    """Every connection logged once, SF, with all its packets analysed or shunted."""
    rows = [r for r in d.log("conn") if r["proto"] == "tcp"]
    assert sorted(int(r["id.orig_p"]) for r in rows) == ports, d.stderr()
    for r in rows:
        p = int(r["id.orig_p"])
        c, s = _client_server(p)
        assert r["conn_state"] == "SF", r
        assert (int(r["orig_pkts"]) + int(r["orig_shunted_pkts"]),
                int(r["orig_ip_bytes"]) + int(r["orig_shunted_bytes"])) == sent[(p, c)], r
        assert (int(r["resp_pkts"]) + int(r["resp_shunted_pkts"]),
                int(r["resp_ip_bytes"]) + int(r["resp_shunted_bytes"])) == sent[(p, s)], r
        assert (r["is_shunted"] == "T") == (p % 2 == 0), r


def _bounce(d: Daemon, ifname: str) -> None:
    _ip_link("set", "dev", ifname, "down")
    assert wait_for(lambda: f"interface {ifname} is down (set administratively down)"
                    in d.stderr()), d.stderr()
    assert d.proc.poll() is None
    _ip_link("set", "dev", ifname, "up")
    assert wait_for(lambda: f"interface {ifname} is up again" in d.stderr()), d.stderr()
    time.sleep(0.3)  # carrier back on both ends of the veth


def _down_up_keeps_every_connection_whole(lab: Lab, tmp_path: Path, *workers: str) -> None:
    pair = quiet_veth(lab)
    seen = tmp_path / "seen.txt"
    pol = policy_file(tmp_path, POLICY.format(seen=str(seen)))
    d = Daemon(lab, pair, tmp_path / "logs", "--policy", str(pol), *workers)
    prog = xdp_prog_id(pair.host)
    ports = [42000 + i for i in range(16)]
    first = [f for p in ports for f in handshake(pair, p)]
    lab.send_frames(pair, first)
    assert wait_for(lambda: seen.exists() and len(owners(seen)) == len(ports)), d.stderr()
    time.sleep(0.3)
    _bounce(d, pair.host)
    assert xdp_prog_id(pair.host) == prog   # the bpf_link survives down/up
    second = [f for p in ports for f in rest(pair, p)]
    lab.send_frames(pair, second)
    time.sleep(1.0)
    assert d.stop() == 0, d.stderr()
    _check_rows(d, ports, per_conn_totals(first + second))


def test_down_and_up_keep_running_and_lose_nothing(lab: Lab, tmp_path: Path):
    _down_up_keeps_every_connection_whole(lab, tmp_path)


def test_down_and_up_with_two_workers_keep_each_connection_on_its_worker(lab: Lab,
                                                                        tmp_path: Path):
    _down_up_keeps_every_connection_whole(lab, tmp_path, "--workers", "2")


def test_lost_xdp_attachment_is_restored_when_the_link_comes_back(lab: Lab, tmp_path: Path):
    pair = quiet_veth(lab)
    d = Daemon(lab, pair, tmp_path / "logs", "--policy", str(policy_file(tmp_path, "")))
    prog = xdp_prog_id(pair.host)
    links = json.loads(subprocess.run(["bpftool", "-j", "link", "show"], check=True,
                                      capture_output=True, text=True).stdout)
    (link,) = [x for x in links if x.get("type") == "xdp" and x.get("prog_id") == prog]
    subprocess.run(["bpftool", "link", "detach", "id", str(link["id"])], check=True)
    assert xdp_prog_id(pair.host) == 0
    _bounce(d, pair.host)
    assert wait_for(lambda: "re-attached (native mode)" in d.stderr()), d.stderr()
    assert xdp_prog_id(pair.host) == prog
    assert d.stop() == 0, d.stderr()
    assert xdp_prog_id(pair.host) == 0


def _deleted_logs_open_connections_and_exits_1(lab: Lab, tmp_path: Path, *workers: str):
    pair = quiet_veth(lab)
    seen = tmp_path / "seen.txt"
    pol = policy_file(tmp_path, POLICY.format(seen=str(seen)))
    d = Daemon(lab, pair, tmp_path / "logs", "--policy", str(pol), *workers)
    ports = [43000 + i for i in range(8)]
    frames = [f for p in ports for f in handshake(pair, p) + rest(pair, p)[:3]]  # still open
    lab.send_frames(pair, [f for p in ports for f in handshake(pair, p)])
    assert wait_for(lambda: seen.exists() and len(owners(seen)) == len(ports)), d.stderr()
    time.sleep(0.3)
    lab.send_frames(pair, [f for p in ports for f in rest(pair, p)[:3]])
    time.sleep(0.5)
    _ip_link("del", "dev", pair.host)
    assert d.proc.wait(20) == 1, d.stderr()
    d.err.close()
    assert f"interface {pair.host} was deleted" in d.stderr()
    assert not (PIN_ROOT / pair.host).exists()
    sent = per_conn_totals(frames)
    rows = [r for r in d.log("conn") if r["proto"] == "tcp"]
    assert sorted(int(r["id.orig_p"]) for r in rows) == ports
    for r in rows:
        p = int(r["id.orig_p"])
        c, s = _client_server(p)
        assert (int(r["orig_pkts"]) + int(r["orig_shunted_pkts"]),
                int(r["orig_ip_bytes"]) + int(r["orig_shunted_bytes"])) == sent[(p, c)], r
        assert (int(r["resp_pkts"]) + int(r["resp_shunted_pkts"]),
                int(r["resp_ip_bytes"]) + int(r["resp_shunted_bytes"])) == sent[(p, s)], r
        assert (r["is_shunted"] == "T") == (p % 2 == 0), r
    shunts = d.log("shunt")
    assert sorted(int(s["id.orig_p"]) for s in shunts) == ports[::2]


def test_deleted_interface_logs_open_connections_and_exits_1(lab: Lab, tmp_path: Path):
    _deleted_logs_open_connections_and_exits_1(lab, tmp_path)


def test_deleted_interface_with_two_workers(lab: Lab, tmp_path: Path):
    _deleted_logs_open_connections_and_exits_1(lab, tmp_path, "--workers", "2")
