"""The live daemon (`shuntd --iface`) on a real veth pair, run as a subprocess.

Both directions of a TCP conversation are injected from the peer namespace (AF_PACKET), so every
packet crosses the one XDP hook on the host side, where the daemon captures what XDP passed.
Expectations come from the frames we built: packets and IPv4 total lengths per direction.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from lab import Lab, VethPair, lab_fixture, xdp_prog_id  # noqa: F401

LAB_PREFIX = "l1"
A, B = "10.78.0.1", "10.78.0.2"
ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"

SHUNT_AT_ESTABLISHED = """\
from shuntd.policy import shunt


def connection_established(conn):
    shunt(conn, "test")
"""


def frame(pair: VethPair, src: str, sport: int, dst: str, dport: int, flags: str,
          seq: int, ack: int, payload: bytes = b"") -> bytes:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    return bytes(Ether(dst=pair.host_mac, src=pair.peer_mac) / IP(src=src, dst=dst)
                 / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack) / payload)


def handshake(pair: VethPair, sport: int) -> list[bytes]:
    return [frame(pair, A, sport, B, 80, "S", 1000, 0),
            frame(pair, B, 80, A, sport, "SA", 5000, 1001)]


def rest(pair: VethPair, sport: int) -> list[bytes]:
    """ACK, 3 x 100 bytes orig, 2 x 1000 bytes resp, FIN / FIN-ACK / ACK."""
    out = [frame(pair, A, sport, B, 80, "A", 1001, 5001)]
    out += [frame(pair, A, sport, B, 80, "PA", 1001 + 100 * i, 5001, b"q" * 100)
            for i in range(3)]
    out += [frame(pair, B, 80, A, sport, "PA", 5001 + 1000 * i, 1301, b"r" * 1000)
            for i in range(2)]
    out += [frame(pair, A, sport, B, 80, "FA", 1301, 7001),
            frame(pair, B, 80, A, sport, "FA", 7001, 1302),
            frame(pair, A, sport, B, 80, "A", 1302, 7002)]
    return out


def sent_totals(frames: list[bytes]) -> dict[str, tuple[int, int]]:
    """(packets, IP bytes) per sender address, from the frames themselves."""
    import ipaddress
    out: dict[str, tuple[int, int]] = {}
    for f in frames:
        src = str(ipaddress.IPv4Address(f[26:30]))
        ip_len = int.from_bytes(f[16:18], "big")
        p, b = out.get(src, (0, 0))
        out[src] = (p + 1, b + ip_len)
    return out


class Daemon:
    def __init__(self, lab: Lab, pair: VethPair, log_dir: Path, *extra: str) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self.err_path = log_dir / "stderr.txt"
        self.err = open(self.err_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(PYTHON), "-m", "shuntd.cli", "--iface", pair.host, "--log-dir", str(log_dir),
             "--metrics-addr", "none", *extra], stdout=subprocess.DEVNULL, stderr=self.err)
        lab.on_close(self.kill)
        deadline = time.monotonic() + 30
        while "running on" not in self.stderr():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"daemon did not start: {self.stderr()}")
            time.sleep(0.05)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(20)
        self.err.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.err.close()

    def log(self, name: str) -> list[dict[str, str]]:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return []
        fields: list[str] = []
        rows = []
        for line in path.read_text().splitlines():
            if line.startswith("#fields"):
                fields = line.split("\t")[1:]
            elif line and not line.startswith("#"):
                rows.append(dict(zip(fields, line.split("\t"), strict=True)))
        return rows


def policy_file(tmp_path: Path, text: str, name: str = "pol.py") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o644)
    return path


def conversation(lab: Lab, pair: VethPair, sport: int) -> list[bytes]:
    """Send one conversation; a pause after the handshake lets the daemon shunt."""
    first = handshake(pair, sport)
    lab.send_frames(pair, first)
    time.sleep(0.7)
    second = rest(pair, sport)
    lab.send_frames(pair, second)
    time.sleep(0.7)
    return first + second


def test_shunted_connection_conserves_counts_and_closes_sf(lab: Lab, tmp_path: Path):
    pair = lab.veth_to_netns()
    lab.pin_dir(pair.host)
    pol = policy_file(tmp_path, SHUNT_AT_ESTABLISHED)
    d = Daemon(lab, pair, tmp_path / "shunt", "--policy", str(pol))
    frames = conversation(lab, pair, 40000)
    assert d.stop() == 0, d.stderr()
    assert xdp_prog_id(pair.host) == 0
    assert not (Path("/sys/fs/bpf/shuntd") / pair.host).exists()
    sent = sent_totals(frames)
    rows = [r for r in d.log("conn") if r["id.orig_p"] == "40000"]
    assert len(rows) == 1, d.stderr()
    r = rows[0]
    assert r["is_shunted"] == "T" and r["shunt_trigger"] == "test"
    assert int(r["orig_shunted_pkts"]) > 0 and int(r["resp_shunted_pkts"]) > 0
    assert (int(r["orig_pkts"]) + int(r["orig_shunted_pkts"]),
            int(r["orig_ip_bytes"]) + int(r["orig_shunted_bytes"])) == sent[A]
    assert (int(r["resp_pkts"]) + int(r["resp_shunted_pkts"]),
            int(r["resp_ip_bytes"]) + int(r["resp_shunted_bytes"])) == sent[B]
    assert r["conn_state"] == "SF"
    assert (r["orig_bytes"], r["resp_bytes"]) == ("300", "2000")
    assert "F" in r["history"] and "f" in r["history"]
    shunts = d.log("shunt")
    assert len(shunts) == 1
    s = shunts[0]
    assert (s["uid"], s["trigger"], s["end_reason"]) == (r["uid"], "test", "fin")
    assert s["orig_shunted_pkts"] == r["orig_shunted_pkts"]
    assert s["resp_shunted_bytes"] == r["resp_shunted_bytes"]

    # Same traffic, no shunting: same conn_state and sizes; history has the data letters.
    pair2 = lab.veth_to_netns()
    lab.pin_dir(pair2.host)
    none = policy_file(tmp_path, "", "none.py")
    d2 = Daemon(lab, pair2, tmp_path / "plain", "--policy", str(none))
    conversation(lab, pair2, 40000)
    assert d2.stop() == 0, d2.stderr()
    (p,) = [x for x in d2.log("conn") if x["id.orig_p"] == "40000"]
    assert p["is_shunted"] == "F"
    assert (int(p["orig_pkts"]), int(p["orig_ip_bytes"])) == sent[A]
    assert (int(p["resp_pkts"]), int(p["resp_ip_bytes"])) == sent[B]
    assert (p["conn_state"], p["orig_bytes"], p["resp_bytes"]) == (
        r["conn_state"], r["orig_bytes"], r["resp_bytes"])
    assert p["history"] == "ShADdFf"  # resp never sends a pure ACK: no "a"
    # Letters the issue allows to differ once data is shunted: t, w, c, g (either case).
    assert set(r["history"]) - set("tTwWcCgG") <= set(p["history"])


def test_map_full_stays_analysed_and_sigkill_leaves_orphans(lab: Lab, tmp_path: Path):
    pair = lab.veth_to_netns()
    lab.pin_dir(pair.host)
    pol = policy_file(tmp_path, SHUNT_AT_ESTABLISHED)
    d = Daemon(lab, pair, tmp_path / "run1", "--policy", str(pol), "--flows-max", "1")
    conversation(lab, pair, 41000)            # takes the only map slot
    second = conversation(lab, pair, 41001)   # refused: map full, stays analysed
    assert d.stop() == 0, d.stderr()
    assert d.stderr().count("WARNING shunt map full") == 1, d.stderr()
    (r,) = [x for x in d.log("conn") if x["id.orig_p"] == "41001"]
    sent = sent_totals(second)
    assert r["is_shunted"] == "F" and r["conn_state"] == "SF"
    assert (int(r["orig_pkts"]), int(r["orig_ip_bytes"])) == sent[A]
    assert (int(r["resp_pkts"]), int(r["resp_ip_bytes"])) == sent[B]

    # SIGKILL mid-run: the program detaches with the process (bpf_link), the pins stay.
    d2 = Daemon(lab, pair, tmp_path / "run2", "--policy", str(pol))
    first = conversation(lab, pair, 42000)
    d2.proc.send_signal(signal.SIGKILL)
    d2.proc.wait(10)
    assert xdp_prog_id(pair.host) == 0
    # Restart: the pinned map is adopted, its entry logged as orphaned with its counters.
    d3 = Daemon(lab, pair, tmp_path / "run3", "--policy", str(pol))
    assert d3.stop() == 0, d3.stderr()
    (orphan,) = d3.log("shunt")
    assert orphan["end_reason"] == "orphaned" and orphan["trigger"] == "test"
    after = sent_totals(first[2:])  # everything after the handshake was dropped and counted
    assert (int(orphan["orig_shunted_pkts"]), int(orphan["orig_shunted_bytes"])) == after[A]
    assert (int(orphan["resp_shunted_pkts"]), int(orphan["resp_shunted_bytes"])) == after[B]


def test_raising_policy_is_disabled_and_sighup_reloads(lab: Lab, tmp_path: Path):
    pair = lab.veth_to_netns()
    lab.pin_dir(pair.host)
    pol = policy_file(tmp_path, "def connection_established(conn):\n    raise KeyError('x')\n")
    d = Daemon(lab, pair, tmp_path / "run", "--policy", str(pol))
    conversation(lab, pair, 43000)
    assert "raised" in d.stderr() and d.proc.poll() is None
    # A broken file on reload keeps the old set; a good one replaces it.
    pol.write_text("def connection_established(conn:\n")
    d.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert "reload failed" in d.stderr() and d.proc.poll() is None
    pol.write_text(SHUNT_AT_ESTABLISHED)
    d.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    conversation(lab, pair, 43001)
    assert d.stop() == 0, d.stderr()
    rows = {x["id.orig_p"]: x for x in d.log("conn")}
    assert rows["43000"]["is_shunted"] == "F"
    assert rows["43001"]["is_shunted"] == "T" and rows["43001"]["conn_state"] == "SF"


def test_prometheus_scrapes_shunted_packets_of_a_live_daemon(lab: Lab, tmp_path: Path):
    """A real Prometheus server scrapes a running shuntd; its query API returns the number of
    packets XDP shunted: every frame sent after the handshake (the policy shunts at
    connection_established, and the test waits before sending the rest)."""
    from prom import PrometheusServer, free_port, have_prometheus, promtool_check_metrics

    if not have_prometheus():
        pytest.skip("prometheus not installed")
    pair = lab.veth_to_netns()
    lab.pin_dir(pair.host)
    port = free_port()
    pol = policy_file(tmp_path, SHUNT_AT_ESTABLISHED)
    d = Daemon(lab, pair, tmp_path / "metrics", "--policy", str(pol),
               "--metrics-addr", f"127.0.0.1:{port}")
    with PrometheusServer([f"127.0.0.1:{port}"], scrape_interval="1s") as prom:
        prom.wait_for_target_up()
        first = handshake(pair, 41000)
        lab.send_frames(pair, first)
        time.sleep(0.7)
        second = rest(pair, 41000)
        lab.send_frames(pair, second)
        prom.wait_for_value('shuntd_xdp_shunted_packets_total{table="flows"}', len(second))
        prom.wait_for_value('shuntd_shunt_inserts_total{result="ok",trigger="test"}', 1)
        prom.wait_for_value('shuntd_shunt_table_entries{table="flows"}', 1)
        info = prom.query('shuntd_info')
        assert info and info[0][0]["interface"] == pair.host
        import urllib.request
        exposition = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        lint = promtool_check_metrics(exposition)
        assert lint.returncode == 0, lint.stdout + lint.stderr
        from docs_check import undocumented
        assert undocumented(exposition.decode()) == []  # docs/metrics.md lists every family
        # The frames were analysed within moments of their capture (an idle daemon, one
        # worker): the lag is the newest frame's wait, small but measured (not the default 0).
        lag = [float(ln.split()[1]) for ln in exposition.decode().splitlines()
               if ln.startswith("shuntd_capture_lag_seconds ")]
        assert len(lag) == 1 and 0.0 < lag[0] < 2.0, lag
    assert d.stop() == 0, d.stderr()


def test_tells_systemd_when_ready_and_stopping(lab: Lab, tmp_path: Path, monkeypatch):
    """systemd/shuntd@.service is Type=notify: READY=1 once XDP is attached, STOPPING=1 on
    SIGTERM, sent to $NOTIFY_SOCKET (here a socket the test listens on)."""
    import socket

    sock_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    pair = lab.veth_to_netns()
    lab.pin_dir(pair.host)
    try:
        d = Daemon(lab, pair, tmp_path / "notify")
        assert listener.recv(256) == b"READY=1"
        assert xdp_prog_id(pair.host) != 0  # attached by the time it said so
        d.proc.send_signal(signal.SIGTERM)
        assert listener.recv(256) == b"STOPPING=1"
        assert d.proc.wait(20) == 0, d.stderr()
    finally:
        listener.close()


def early_config(fd: int) -> tuple[int, int, int, int]:
    """(early_port, early_trigger, early_lease_ns, early_until_ns) of the `config` map behind
    `fd` (struct shunt_config, bpf/shuntd.h: offsets 24 until, 32 lease, 40 trigger, 44 port)."""
    import ctypes
    import struct

    from shuntd.datapath import libbpf

    buf = ctypes.create_string_buffer(48)
    assert libbpf.map_lookup(fd, ctypes.c_int(0), buf)
    until, lease, trigger, port = struct.unpack_from("=QQIH", buf.raw, 24)
    return port, trigger, lease, until


def test_early_shunts_follow_the_policy_declaration_and_end_with_the_daemon(lab: Lab,
                                                                           tmp_path: Path):
    """The early-shunt fields of the pinned config, read through a descriptor of our own (it
    outlives the pins a clean stop removes): on with the tls policy (its EARLY_SHUNT), on the
    port given and with the `ssl` trigger code (1), a deadline one lease ahead that moves on
    every lease/3; off after a SIGHUP loads the policy without the declaration, on again with
    it, off after the stop."""
    import os

    from shuntd.datapath import libbpf

    pair = lab.veth_to_netns()
    pins = lab.pin_dir(pair.host)
    tls = (ROOT / "policies" / "tls.py").read_text()
    assert 'EARLY_SHUNT = "ssl"' in tls
    pol = policy_file(tmp_path, tls, "tls_copy.py")
    d = Daemon(lab, pair, tmp_path / "run", "--policy", str(pol), "--lease", "3",
               "--early-port", "8443")
    fd = libbpf.obj_get(str(pins / "config"))
    lab.on_close(lambda: os.close(fd))
    port, trigger, lease, until = early_config(fd)
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    assert (port, trigger, lease) == (8443, 1, 3_000_000_000)
    assert now < until <= now + 3_000_000_000 + 50_000_000  # (map time: coarse ticks)
    time.sleep(1.6)                                            # past lease/3
    assert early_config(fd)[3] > until

    def wait_port(want: int) -> None:
        deadline = time.monotonic() + 5
        while early_config(fd)[0] != want:
            assert time.monotonic() < deadline, (want, early_config(fd), d.stderr())
            time.sleep(0.05)

    pol.write_text(tls.replace('EARLY_SHUNT = "ssl"', "#"))
    d.proc.send_signal(signal.SIGHUP)
    wait_port(0)
    assert early_config(fd)[3] == 0
    pol.write_text(tls)
    d.proc.send_signal(signal.SIGHUP)
    wait_port(8443)
    assert d.stop() == 0, d.stderr()
    assert early_config(fd) == (0, 0, 0, 0)
    assert "early shunts on" in d.stderr() and "early shunts off" in d.stderr()


def pinned_stat(pin: Path, name: str) -> int:
    """A `stats` counter (enum shunt_stat), summed over CPUs, read with bpftool from the pinned
    map (not through shuntd)."""
    import json

    from shuntd.datapath.program import StatIndex

    index = int(StatIndex[name])
    key = [str(b) for b in index.to_bytes(4, "little")]
    out = subprocess.run(["bpftool", "-j", "map", "lookup", "pinned", str(pin / "stats"),
                          "key", *key], capture_output=True, text=True, timeout=10, check=True)
    doc = json.loads(out.stdout)
    if "formatted" in doc:
        return sum(int(v["value"]) for v in doc["formatted"]["values"])
    return sum(int.from_bytes(bytes(int(x, 16) for x in v["value"]), "little")
               for v in doc["values"])
