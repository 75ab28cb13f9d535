"""IP-pair shunts made by both workers of `shuntd --workers 2`, on a real veth pair with XDP.

Every worker adds and removes IP pairs in the shared `pair_filter` and `config` maps while the
parent may rewrite the clock calibration there; those changes go through the kernel helper
xdp_config_op (atomic per field). Here: each of 16 address pairs opens with one UDP packet,
whose worker (the policy says which, by pid) shunts the pair; then every pair sends more in both
directions, and all of it must be dropped by XDP and counted, and end in shunt.log at stop.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from lab import Lab, VethPair, lab_fixture  # noqa: F401
from shuntd.datapath.program import CFG_IGNORE_VLANS, LAYOUT_VERSION
from test_live_daemon import Daemon, policy_file
from test_workers import PIN_ROOT, children, quiet_veth, scrape, wait_for

LAB_PREFIX = "wp"
N_PAIRS = 16
AFTER = 3  # packets each way per pair once the pair is shunted

POLICY = """\
import os

from shuntd.policy import shunt_ip_pair


def new_connection(conn):
    result = shunt_ip_pair(conn.orig_h, conn.resp_h, "test")
    with open({seen!r}, "a") as f:
        f.write(f"{{os.getpid()}} {{conn.id.orig_h}} {{result}}\\n")
"""


def _udp(pair: VethPair, src: str, dst: str, sport: int, size: int) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    return bytes(Ether(dst=pair.host_mac, src=pair.peer_mac) / IP(src=src, dst=dst)
                 / UDP(sport=sport, dport=7000) / Raw(b"u" * size))


def _config(pin: Path) -> dict[str, int]:
    """The config entry (struct shunt_config, shuntd.h) as bpftool dumps it."""
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(pin)],
                         capture_output=True, text=True, timeout=10, check=True)
    (entry,) = json.loads(out.stdout)
    raw = bytes(int(b, 16) for b in entry["value"])
    names = ("flags", "pairs_active", "layout_version", "ns_per_jiffy")
    return {n: int.from_bytes(raw[4 * i:4 * i + 4], "little") for i, n in enumerate(names)}


def test_ip_pair_shunts_of_both_workers_are_all_effective(lab: Lab, tmp_path: Path):
    from prom import free_port

    pair = quiet_veth(lab)
    seen = tmp_path / "seen.txt"
    port = free_port()
    d = Daemon(lab, pair, tmp_path / "logs", "--workers", "2", "--metrics-addr",
               f"127.0.0.1:{port}", "--policy",
               str(policy_file(tmp_path, POLICY.format(seen=str(seen)))))
    pids = children(d.proc.pid)
    assert len(pids) == 2, d.stderr()
    ends = [(f"10.81.{i}.1", f"10.82.{i}.2") for i in range(N_PAIRS)]

    lab.send_frames(pair, [_udp(pair, a, b, 5000 + i, 10) for i, (a, b) in enumerate(ends)])
    m = wait_for(lambda: (s := scrape(port)).get(
        'shuntd_shunt_table_entries{table="ip_pairs"}') == N_PAIRS and s)
    assert m, (scrape(port), d.stderr())
    made = [line.split() for line in seen.read_text().splitlines()]
    assert sorted(a for _pid, a, _r in made) == sorted(a for a, _b in ends)
    assert {r for _p, _a, r in made} == {"ok"}
    assert {int(p) for p, _a, _r in made} == set(pids), made  # both workers shunted pairs

    # The shared config entry, read with bpftool (not through shuntd): the count of pairs is
    # every worker's, the workers' VLAN flag and the parent's clock calibration are intact.
    cfg = _config(PIN_ROOT / pair.host / "config")
    assert cfg["pairs_active"] == N_PAIRS and cfg["flags"] == CFG_IGNORE_VLANS, cfg
    assert cfg["ns_per_jiffy"] > 0 and cfg["layout_version"] == LAYOUT_VERSION, cfg

    # Everything after the shunt is dropped by XDP: the workers see none of it.
    later = []
    for i, (a, b) in enumerate(ends):
        later += [_udp(pair, a, b, 5000 + i, 100 + i) for _ in range(AFTER)]
        later += [_udp(pair, b, a, 7000, 200 + i) for _ in range(AFTER)]
    lab.send_frames(pair, later)
    time.sleep(0.5)
    m = scrape(port)
    assert m['shuntd_capture_packets_total{worker="0"}'] + \
        m['shuntd_capture_packets_total{worker="1"}'] == N_PAIRS, m
    assert d.stop() == 0, d.stderr()

    rows = [r for r in d.log("shunt") if r["kind"] == "ip_pair"]
    assert len(rows) == N_PAIRS, rows
    for r in rows:
        i = int(r["id.orig_h"].split(".")[2]) if r["id.orig_h"].startswith("10.81.") \
            else int(r["id.resp_h"].split(".")[2])
        by_host = {r["id.orig_h"]: (int(r["orig_shunted_pkts"]), int(r["orig_shunted_bytes"])),
                   r["id.resp_h"]: (int(r["resp_shunted_pkts"]), int(r["resp_shunted_bytes"]))}
        a, b = ends[i]
        assert by_host == {a: (AFTER, AFTER * (28 + 100 + i)),
                           b: (AFTER, AFTER * (28 + 200 + i))}, r
        assert (r["end_reason"], r["trigger"]) == ("shutdown", "test"), r
