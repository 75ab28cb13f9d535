"""shuntctl against real pinned maps on a veth lab: list/shunt/unshunt/flush/detach/status.

Expected counters come from the frames the test sends (IP bytes counted by hand)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from lab import Lab, lab_fixture, xdp_prog_id  # noqa: F401
from xdp_frames import udp

LAB_PREFIX = "o1"
A, B, C = "10.91.0.1", "10.91.0.2", "10.91.0.3"
UDP_IP_BYTES = 20 + 8 + 8  # IPv4 header + UDP header + 8-byte payload

pytestmark = pytest.mark.root


def ctl(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    pre = (lambda: os.setuid(user)) if user is not None else None
    return subprocess.run([sys.executable, "-m", "shuntd.ctl", *args], capture_output=True,
                          text=True, timeout=60, preexec_fn=pre)  # noqa: PLW1509


def open_dp(lab: Lab, ifname: str):
    from shuntd.datapath.loader import open_datapath

    lab.pin_dir(ifname)  # removed at lab close whatever happens
    dp = open_datapath(ifname, lease_seconds=600)
    lab.on_close(dp.close)
    return dp


def test_list_shunt_unshunt_flush_detach(lab: Lab):
    pair = lab.veth_to_netns()
    dp = open_dp(lab, pair.host)
    assert dp.table.shunt_flow(A, 5000, B, 53, 17).value == "ok"
    lab.send_frames(pair, [udp(A, 5000, B, 53)] * 3 + [udp(B, 53, A, 5000)] * 2)

    listed = ctl("list", pair.host, "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == 1
    row = rows[0]
    # A < B, so A:5000 is side 1 (shuntd.h endpoint ordering).
    assert (row["kind"], row["addr1"], row["port1"], row["addr2"], row["port2"],
            row["proto"]) == ("flow", A, 5000, B, 53, "udp")
    assert (row["pkts1"], row["bytes1"]) == (3, 3 * UDP_IP_BYTES)
    assert (row["pkts2"], row["bytes2"]) == (2, 2 * UDP_IP_BYTES)
    assert row["last_seen"] is not None

    human = ctl("list", pair.host, "--sort", "bytes")
    assert human.returncode == 0 and f"{A}:5000" in human.stdout and "180" in human.stdout

    # Shunt by hand: a flow (given from the other side) and an IP pair.
    r = ctl("shunt", pair.host, "--flow", f"{B}:8080", f"{A}:6000", "--proto", "tcp")
    assert r.returncode == 0, r.stderr
    assert dp.table.lookup_flow(A, 6000, B, 8080, 6) is not None
    r = ctl("shunt", pair.host, "--pair", C, A)
    assert r.returncode == 0, r.stderr
    assert dp.table.lookup_pair(A, C) is not None
    assert dp.prog.read_config().pairs_active == 1  # else XDP never looks at ip_pairs
    lab.send_frames(pair, [udp(C, 1, A, 2)] * 4)
    assert dp.table.lookup_pair(A, C).pkts1 + dp.table.lookup_pair(A, C).pkts2 == 4

    # Our bpf_link is on the interface, as a running shuntd's is: deleting its entries behind
    # its back would lose their counters from the logs, so that needs --force.
    r = ctl("unshunt", pair.host, "--flow", f"{A}:6000", f"{B}:8080")
    assert r.returncode == 1 and "shuntd is running" in r.stderr, r.stderr
    assert dp.table.lookup_flow(A, 6000, B, 8080, 6) is not None
    r = ctl("unshunt", pair.host, "--flow", f"{A}:6000", f"{B}:8080", "--json", "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"pkts1": 0, "bytes1": 0, "pkts2": 0, "bytes2": 0}
    assert dp.table.lookup_flow(A, 6000, B, 8080, 6) is None
    r = ctl("unshunt", pair.host, "--flow", f"{A}:6000", f"{B}:8080", "--force")
    assert r.returncode == 1 and "not shunted" in r.stderr

    status = ctl("status", pair.host, "--json")
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    assert (st["flows"], st["pairs"], st["pass_all"]) == (1, 1, False)
    assert st["early"]["port"] == 0
    # Early shunts as a running shuntd sets them (docs/operations.md), then lapsed.
    dp.prog.set_early(443, 1, 30 * 10**9, dp.prog.map_now_ns() + 20 * 10**9)
    st = json.loads(ctl("status", pair.host, "--json").stdout)
    assert st["early"]["port"] == 443 and st["early"]["trigger"] == "ssl"
    assert 10 < st["early"]["seconds_left"] <= 20
    assert "early      on: TLS handshakes on port 443" in ctl("status", pair.host).stdout
    dp.prog.set_early(443, 1, 30 * 10**9, dp.prog.map_now_ns() - 1)
    assert json.loads(ctl("status", pair.host, "--json").stdout)["early"]["port"] == 0
    dp.prog.set_early(0)
    assert st["prog_id"] == xdp_prog_id(pair.host) and st["links"]
    assert st["stats"]["dropped_flow"] == 5 and st["stats"]["dropped_pair"] == 4

    r = ctl("flush", pair.host)
    assert r.returncode == 1 and "shuntd is running" in r.stderr, r.stderr
    r = ctl("flush", pair.host, "--json", "--force")
    assert r.returncode == 0 and json.loads(r.stdout) == {"removed": 2}
    assert list(dp.table.entries()) == [] and list(dp.table.pair_entries()) == []
    assert dp.prog.read_config().pairs_active == 0

    r = ctl("detach", pair.host)
    assert r.returncode == 0, r.stderr
    assert "pass-all set" in r.stdout and "bpf_link" in r.stdout
    assert xdp_prog_id(pair.host) == 0
    assert dp.prog.read_config().flags & 1  # SHUNT_CFG_PASS_ALL


def test_exit_codes(lab: Lab):
    missing = lab.name("z")
    r = ctl("status", missing)
    assert r.returncode == 3 and "nothing pinned" in r.stderr
    r = ctl("detach", missing)
    assert r.returncode == 3 and "does not exist" in r.stderr
    r = ctl("shunt", missing, "--flow", "1.2.3.4", "5.6.7.8:9")
    assert r.returncode == 2 and "ADDR:PORT" in r.stderr
    r = ctl("shunt", missing, "--pair", "1.2.3.4", "nope")
    assert r.returncode == 2 and "not an IP address" in r.stderr
    r = ctl("list", missing, "--sort", "nope")
    assert r.returncode == 2
    r = ctl("status", missing, user=65534)
    assert r.returncode == 1 and "needs root" in r.stderr and "Traceback" not in r.stderr
