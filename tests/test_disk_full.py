"""Disk full for the logs, on a real tiny filesystem (a 64 KiB tmpfs the test mounts): records
are held in memory and retried every second, or shuntd stops loudly; never a silent loss, never
half a line in a log.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import lab_fixture  # noqa: F401
from shuntd.logs.zeek import LogSchema, LogSpaceError, LogWriter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount)")

LAB_PREFIX = "df"
SCHEMA = LogSchema("t", [("ts", "time"), ("text", "string")])


@pytest.fixture
def tiny(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, unmounted afterwards."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> Path:
    """Fill the filesystem with a filler file; return it (delete it to free the space)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0")
    finally:
        os.close(fd)
    with pytest.raises(OSError) as exc:
        (directory / "probe").write_bytes(b"x" * 8192)
    assert exc.value.errno == errno.ENOSPC
    (directory / "probe").unlink(missing_ok=True)
    return filler


def data_lines(path: Path) -> list[str]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "a log ends in the middle of a line"
    return [x for x in text.splitlines() if x and not x.startswith("#")]


def test_held_records_are_written_when_space_returns(tiny: Path,
                                                     caplog: pytest.LogCaptureFixture):
    w = LogWriter(tiny, SCHEMA)
    w.write((1.0, "before"))
    filler = fill(tiny)
    with caplog.at_level(logging.INFO, logger="shuntd.logs"):
        # One record bigger than what is left of the log's page: part of it reaches the file
        # before ENOSPC; the writer must cut that half line away and hold the whole record.
        big = "b" * 6000
        w.write((2.0, big))
        for i in range(50):
            w.write((3.0 + i, f"held {i}"))
        assert w.full and w.held_records == 51
        assert data_lines(w.path) == ["1.000000\tbefore"]
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "No space left on device" in errors[0].message
        assert w.write_errors >= 1
        filler.unlink()
        w.tick()                 # less than a second since the last attempt: no retry yet
        assert w.full
        time.sleep(1.05)
        w.tick()
        assert not w.full and w.held_records == 0
        assert any("written again" in r.message for r in caplog.records)
    w.write((99.0, "after"))
    w.close()
    lines = data_lines(w.path)
    assert lines == (["1.000000\tbefore", f"2.000000\t{big}"]
                     + [f"{3.0 + i:.6f}\theld {i}" for i in range(50)] + ["99.000000\tafter"])
    assert w.path.read_text().splitlines()[-1].startswith("#close")


def test_past_the_bound_it_stops_loudly_and_close_counts_the_loss(
        tiny: Path, caplog: pytest.LogCaptureFixture):
    w = LogWriter(tiny, SCHEMA, hold_max=2000)
    w.write((1.0, "x" * 100))
    fill(tiny)
    with pytest.raises(LogSpaceError, match="disk full .* held records passed the bound of "
                                            "2000 bytes; stopping"):
        for i in range(1000):
            w.write((2.0 + i, "y" * 100))
    held = w.held_records
    written = len(data_lines(w.path))  # the log's last page took a few before it filled
    assert held > 0 and written + held == w.records
    with caplog.at_level(logging.ERROR, logger="shuntd.logs"):
        w.close()
    assert w.unwritten == held
    assert f"{held} records could not be written" in caplog.text
    assert len(data_lines(w.path)) == written


def _udp_trace(path: Path, flows: int) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    pkts = []
    for i in range(flows):
        p = Ether() / IP(src="10.8.0.1", dst="10.8.1.1") / UDP(sport=40000 + i, dport=5000) / b"u"
        p.time = 1_000_000.0 + i * 0.01
        pkts.append(p)
    wrpcap(str(path), pkts)


def test_offline_run_on_a_full_disk_exits_non_zero_and_says_how_many(tmp_path: Path,
                                                                      tiny: Path):
    trace = tmp_path / "udp.pcap"
    _udp_trace(trace, 800)          # ~800 x 130 bytes of conn.log: more than 64 KiB
    cli = [str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"), "-m",
           "shuntd.cli", "-r", str(trace)]
    free = subprocess.run([*cli, "--log-dir", str(tmp_path / "free")], capture_output=True,
                          text=True, timeout=60)
    assert free.returncode == 0, free.stderr
    want = data_lines(tmp_path / "free" / "conn.log")
    assert len(want) == 800
    full = subprocess.run([*cli, "--log-dir", str(tiny)], capture_output=True, text=True,
                          timeout=60)
    assert full.returncode == 1
    got = data_lines(tiny / "conn.log")   # whole lines only
    last = full.stderr.strip().splitlines()[-1]
    assert last == f"shuntd: disk full: {800 - len(got)} of 800 records not written to " \
                   f"{tiny / 'conn.log'}", full.stderr
    assert 0 < len(got) < 800
    # What was written is the start of what a free disk gets (uids differ per run).
    strip = [x.split("\t", 2)[0] + x.split("\t", 2)[2] for x in got]
    assert strip == [x.split("\t", 2)[0] + x.split("\t", 2)[2] for x in want[:len(got)]]


# -- live: the daemon on a veth pair with its logs on the tiny filesystem ----------------------

def _live_conversations(lab, pair, first_port: int, n: int) -> None:
    from test_live_daemon import handshake, rest

    for sport in range(first_port, first_port + n):
        # Without the last ACK: with --tcp-close-delay 0 it would open a second connection.
        lab.send_frames(pair, handshake(pair, sport) + rest(pair, sport)[:-1])


def test_live_daemon_holds_records_until_space_returns(lab, tmp_path: Path, tiny: Path):
    from test_live_daemon import Daemon

    pair = lab.veth_to_netns()
    lab.pin_dir(pair.host)
    # Its stderr goes to tmp_path/d; its logs (the later --log-dir) to the tiny filesystem.
    d = Daemon(lab, pair, tmp_path / "d", "--log-dir", str(tiny), "--policy", "tls",
               "--tcp-close-delay", "0")
    d.log_dir = tiny
    filler = fill(tiny)
    _live_conversations(lab, pair, 45000, 20)
    deadline = time.monotonic() + 15
    while "holding records in memory" not in d.stderr() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "holding records in memory" in d.stderr()
    assert d.proc.poll() is None          # still running, still capturing
    _live_conversations(lab, pair, 45020, 10)
    time.sleep(1.5)
    filler.unlink()
    deadline = time.monotonic() + 10
    while "written again" not in d.stderr() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "written again" in d.stderr()
    assert d.stop() == 0, d.stderr()
    assert d.stderr().count("holding records in memory") == 1
    ports = sorted(int(r["id.orig_p"]) for r in d.log("conn") if r["id.resp_p"] == "80")
    assert ports == list(range(45000, 45030))   # each conversation once, none lost
    data_lines(tiny / "conn.log")               # and no half line


def test_live_daemon_stops_loudly_when_the_hold_bound_is_passed(lab, tmp_path: Path,
                                                                tiny: Path):
    """Past --log-hold-max shuntd exits 1 with one clear line; what is still shunted stays in
    the pinned map, and the next start logs it as orphaned with its counters."""
    from test_live_daemon import SHUNT_AT_ESTABLISHED, Daemon, handshake, policy_file, rest

    pair = lab.veth_to_netns()
    pin = lab.pin_dir(pair.host)
    pol = policy_file(tmp_path, SHUNT_AT_ESTABLISHED)
    d = Daemon(lab, pair, tmp_path / "d", "--log-dir", str(tiny), "--policy", str(pol),
               "--tcp-close-delay", "0", "--log-hold-max", "1000")
    # An open connection, shunted: its data is dropped and counted by XDP.
    lab.send_frames(pair, handshake(pair, 46999))
    time.sleep(0.7)
    shunted = rest(pair, 46999)[:6]          # the ACK and the data, no FIN: still open
    lab.send_frames(pair, shunted)
    fill(tiny)
    _live_conversations(lab, pair, 46000, 20)
    rc = d.proc.wait(20)
    assert rc == 1
    err = d.stderr()
    assert "held records passed the bound of 1000 bytes; stopping" in err
    assert "records could not be written" in err
    assert (pin / "flows").exists()          # kept for the next start
    d2 = Daemon(lab, pair, tmp_path / "d2", "--policy", str(pol))
    assert d2.stop() == 0, d2.stderr()
    (orphan,) = [r for r in d2.log("shunt") if "46999" in (r["id.orig_p"], r["id.resp_p"])]
    assert orphan["end_reason"] == "orphaned"
    from test_live_daemon import sent_totals
    sent = sent_totals(shunted)
    got = {(orphan["id.orig_h"]): (int(orphan["orig_shunted_pkts"]),
                                   int(orphan["orig_shunted_bytes"])),
           (orphan["id.resp_h"]): (int(orphan["resp_shunted_pkts"]),
                                   int(orphan["resp_shunted_bytes"]))}
    assert got == sent


def test_a_log_that_cannot_be_created_holds_its_records(tmp_path: Path):
    """No room for the file itself (here: no free inode, as after logrotate on a full disk):
    the records are held and retried, not raised; the file appears, header first, once there
    is room."""
    mnt = tmp_path / "noinode"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=3,mode=0755", "tmpfs",
                    str(mnt)], check=True)
    try:
        fillers = []
        with contextlib.suppress(OSError):
            for i in range(10):
                (mnt / f"f{i}").touch()
                fillers.append(mnt / f"f{i}")
        w = LogWriter(mnt, SCHEMA)
        for i in range(5):
            w.write((1.0 + i, f"rec {i}"))   # must not raise
        assert not w.path.exists() and w.full and w.held_records == 5
        fillers[-1].unlink()
        time.sleep(1.1)
        w.tick()
        assert not w.full and w.held_records == 0
        lines = w.path.read_text().splitlines()
        assert lines[0].startswith("#separator")
        assert data_lines(w.path) == [f"{1.0 + i:.6f}\trec {i}" for i in range(5)]
        w.close()
        assert w.path.read_text().splitlines()[-1].startswith("#close")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
