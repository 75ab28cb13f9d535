"""scripts/veth-lab (the demo's and the Vagrant VM's lab) builds, carries traffic, mirrors both
directions to the sensor port, and tears down without leftovers."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "veth-lab"
PREFIX = f"vl{os.getpid() % 100000}"
SENSOR = f"{PREFIX}0"


def _lab(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, LAB_PREFIX=PREFIX)
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def lab():
    proc = _lab("up")
    try:
        assert proc.returncode == 0, proc.stderr
        yield
    finally:
        _lab("down")


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_lab_mirrors_both_directions_to_the_sensor(lab) -> None:
    assert {f"{PREFIX}-cli", f"{PREFIX}-srv"} <= _netns()
    counts = {"to_srv": 0, "from_srv": 0}
    stop = threading.Event()
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    sock.bind((SENSOR, 0))
    sock.settimeout(0.2)

    def sniff() -> None:
        while not stop.is_set():
            try:
                frame = sock.recv(65535)
            except TimeoutError:
                continue
            if len(frame) < 38 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
                continue
            ihl = (frame[14] & 0x0F) * 4
            sport, dport = struct.unpack_from("!HH", frame, 14 + ihl)
            if dport == 9000:
                counts["to_srv"] += 1
            elif sport == 9000:
                counts["from_srv"] += 1

    t = threading.Thread(target=sniff, daemon=True)
    t.start()
    try:
        proc = _lab("traffic", "--tls-sessions", "1", "--bulk-mb", "1")
        time.sleep(0.5)
    finally:
        stop.set()
        t.join(5)
        sock.close()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bulk sent 1000000 bytes" in proc.stdout
    assert "bulk received 1000000" in proc.stdout
    assert "tls session 1: 1000000 bytes received" in proc.stdout
    # 1 MB in segments of at most 1448 bytes: at least 691 data segments to the server, and
    # ACKs back; both directions must reach the sensor port.
    assert counts["to_srv"] >= 691
    assert counts["from_srv"] > 0


def test_lab_down_leaves_nothing() -> None:
    assert _lab("up").returncode == 0
    assert _lab("down").returncode == 0
    assert not {f"{PREFIX}-cli", f"{PREFIX}-srv"} & _netns()
    assert not Path(f"/sys/class/net/{SENSOR}").exists()


def test_demo_shunts_tls_and_bulk_and_cleans_up() -> None:
    """`sudo make demo`: shuntd on the lab's sensor port shunts the TLS sessions and the bulk
    transfer; every conn.log record adds up to what crossed the wire and closes SF."""
    import re
    import shutil

    proc = _lab("demo", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = Path(re.search(r"logs in (\S+)\)", proc.stdout).group(1))
    try:
        lines = (out / "conn.log").read_text().splitlines()
        fields = next(line for line in lines if line.startswith("#fields")).split("\t")[1:]
        rows = [dict(zip(fields, line.split("\t"), strict=True))
                for line in lines if not line.startswith("#")]
        tls = [r for r in rows if r["id.resp_p"] == "443"]
        bulk = [r for r in rows if r["id.resp_p"] == "9000"]
        assert len(tls) == 5 and len(bulk) == 1
        for r in tls:
            assert (r["service"], r["conn_state"], r["is_shunted"], r["shunt_trigger"]) == (
                "ssl", "SF", "T", "ssl")
            assert int(r["resp_shunted_pkts"]) > int(r["resp_pkts"])  # most of the reply
        (b,) = bulk
        assert (b["conn_state"], b["shunt_trigger"]) == ("SF", "bulk")
        assert b["orig_bytes"] == "20000000"  # from sequence numbers, shunted part included
        assert int(b["orig_shunted_pkts"]) > 0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    assert not {f"{PREFIX}-cli", f"{PREFIX}-srv"} & _netns()
