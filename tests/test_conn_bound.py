"""The bound on tracked connections (`--max-connections`): eviction of the longest-inactive
connections, logged to conn.log as on timeout, one warning per episode, no record lost.

The traces are built here with scapy; expected counts come from the frames we wrote.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
from shuntd.cli import main
from shuntd.conn.bound import ConnBound

IDLE_UDP = 200      # one-packet UDP flows early in the trace: idle until their 60 s timeout
TCP_CONNS = 100     # complete TCP conversations afterwards, one per second


def _tcp_conv(sport: int) -> list:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    a, b = "10.9.0.1", "10.9.1.1"

    def f(src, dst, sp, dp, flags, seq, ack, payload=b""):
        return Ether() / IP(src=src, dst=dst) / TCP(sport=sp, dport=dp, flags=flags, seq=seq,
                                                     ack=ack) / payload

    return [f(a, b, sport, 80, "S", 100, 0), f(b, a, 80, sport, "SA", 500, 101),
            f(a, b, sport, 80, "A", 101, 501), f(a, b, sport, 80, "PA", 101, 501, b"x" * 50),
            f(b, a, 80, sport, "PA", 501, 151, b"y" * 70), f(a, b, sport, 80, "FA", 151, 571),
            f(b, a, 80, sport, "FA", 571, 152), f(a, b, sport, 80, "A", 152, 572)]


def _write_trace(path: Path, interleave: bool) -> Counter:
    """Write the trace; return packets per (proto, orig port) as the sender sees them."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    sent: Counter = Counter()
    pkts = []
    t = 1_000_000.0
    for i in range(IDLE_UDP):
        p = Ether() / IP(src="10.8.0.1", dst="10.8.1.1") / UDP(sport=40000 + i, dport=5000) \
            / b"u"
        p.time = t + i * 0.001
        pkts.append(p)
        sent[("udp", 40000 + i)] += 1
    t += 1.0
    convs = [(30000 + i, _tcp_conv(30000 + i)) for i in range(TCP_CONNS)]
    if interleave:  # every conversation open at once: packet k of each, then k+1, ...
        for k in range(8):
            for sport, conv in convs:
                conv[k].time = t
                t += 0.001
                pkts.append(conv[k])
                sent[("tcp", sport)] += 1
    else:
        for sport, conv in convs:
            for k, p in enumerate(conv):
                p.time = t + k * 0.01
                pkts.append(p)
                sent[("tcp", sport)] += 1
            t += 1.0
    wrpcap(str(path), pkts)
    return sent


def _rows(path: Path) -> list[dict[str, str]]:
    fields: list[str] = []
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("#fields"):
            fields = line.split("\t")[1:]
        elif line and not line.startswith("#"):
            out.append(dict(zip(fields, line.split("\t"), strict=True)))
    return out


def _pkts_by_flow(rows: list[dict[str, str]]) -> Counter:
    got: Counter = Counter()
    for r in rows:
        got[(r["proto"], int(r["id.orig_p"]))] += int(r["orig_pkts"]) + int(r["resp_pkts"])
    return got


def test_idle_connections_are_evicted_first_and_logged_as_on_timeout(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trace = tmp_path / "many.pcap"
    sent = _write_trace(trace, interleave=False)
    assert main(["-r", str(trace), "--log-dir", str(tmp_path / "free")]) == 0
    with caplog.at_level(logging.INFO, logger="shuntd.conn.bound"):
        assert main(["-r", str(trace), "--log-dir", str(tmp_path / "bound"),
                     "--max-connections", "50"]) == 0
    free, bound = _rows(tmp_path / "free" / "conn.log"), _rows(tmp_path / "bound" / "conn.log")
    # Every flow once, every packet counted: nothing lost, nothing split.
    assert len(bound) == IDLE_UDP + TCP_CONNS
    assert _pkts_by_flow(bound) == sent
    # Only idle UDP flows were evicted, and their records are what a timeout writes: the
    # same rows as the unbounded run (uids are random per run, so they are left out).
    def strip(rows):
        return sorted(tuple(v for k, v in r.items() if k != "uid") for r in rows)
    assert strip(bound) == strip(free)
    assert all(r["conn_state"] == "SF" for r in bound if r["proto"] == "tcp")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "connection bound hit (50 tracked)" in warnings[0].message


def test_tiny_bound_splits_active_connections_but_loses_no_packet(tmp_path: Path) -> None:
    trace = tmp_path / "interleaved.pcap"
    sent = _write_trace(trace, interleave=True)
    assert main(["-r", str(trace), "--log-dir", str(tmp_path), "--max-connections", "10"]) == 0
    rows = _rows(tmp_path / "conn.log")
    # All 100 conversations are open at once and the bound is 10: active connections are
    # evicted mid-conversation and come back as new ones. Records multiply; packets do not.
    assert len(rows) > IDLE_UDP + TCP_CONNS
    assert _pkts_by_flow(rows) == sent
    assert len({r["uid"] for r in rows}) == len(rows)


def test_bound_counts_evictions_and_rejects_nonsense() -> None:
    b = ConnBound(1000)
    assert (b.limit, b.batch, b.evicted) == (1000, 10, 0)
    with pytest.raises(ValueError, match=">= 1"):
        ConnBound(0)


def test_max_connections_flag_validates(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.pcap"
    _write_trace(trace, interleave=False)
    assert main(["-r", str(trace), "--log-dir", str(tmp_path), "--max-connections", "0"]) == 2
    assert capsys.readouterr().err == "shuntd: --max-connections must be >= 1, not 0\n"


def test_evictions_and_held_records_are_metrics() -> None:
    from shuntd.metrics import Metrics, MetricSources

    m = Metrics(MetricSources(connections_evicted=lambda: 7,
                              log_state=lambda: {"conn": (3, 2), "shunt": (0, 0)}))
    text = m.exposition().decode()
    assert "shuntd_connections_evicted_total 7.0" in text
    assert 'shuntd_log_records_held{log="conn"} 3.0' in text
    assert 'shuntd_log_disk_full_errors_total{log="conn"} 2.0' in text
