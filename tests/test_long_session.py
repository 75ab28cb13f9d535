"""A 19-hour TCP session with 20-minute silences, through `shuntd -r` (spec §5.2).

Zeek's default tcp_inactivity_timeout (5 min) splits it at every silence; with
`--tcp-inactivity-timeout 3600` it is one record of the full duration.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

from scapy.layers.inet import IP, TCP  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402
from scapy.utils import wrpcap  # noqa: E402
from shuntd.cli import main  # noqa: E402

T0 = 1_700_000_000.0
BURSTS = 57            # one burst every 20 minutes after the first: 57 * 1200 s = 19 h
C, S = ("10.1.0.1", 41000), ("10.1.0.2", 8443)


def _build_trace(path: Path) -> None:
    frames = []
    seq = {"C": 1000, "S": 5000}

    def pkt(who: str, flags: str, t: float, n: int = 0) -> None:
        src, dst = (C, S) if who == "C" else (S, C)
        peer = "S" if who == "C" else "C"
        p = (Ether() / IP(src=src[0], dst=dst[0])
             / TCP(sport=src[1], dport=dst[1], flags=flags, seq=seq[who],
                   ack=seq[peer] if "A" in flags else 0))
        if n:
            p = p / Raw(b"z" * n)
        p.time = t
        frames.append(p)
        seq[who] += n + ("S" in flags) + ("F" in flags)

    pkt("C", "S", T0)
    pkt("S", "SA", T0 + 0.1)
    pkt("C", "A", T0 + 0.2)
    pkt("C", "PA", T0 + 0.3, 100)
    pkt("S", "A", T0 + 0.4)
    for k in range(1, BURSTS + 1):
        t = T0 + 1200.0 * k
        pkt("C", "PA", t, 100)
        pkt("S", "A", t + 0.1)
    t = T0 + 1200.0 * BURSTS
    pkt("C", "FA", t + 0.2)
    pkt("S", "FA", t + 0.3)
    pkt("C", "A", t + 0.4)
    wrpcap(str(path), frames)


def _rows(log: Path) -> list[dict[str, str]]:
    fields: list[str] = []
    rows = []
    for line in log.read_text().splitlines():
        if line.startswith("#fields\t"):
            fields = line.split("\t")[1:]
        elif line and not line.startswith("#"):
            rows.append(dict(zip(fields, line.split("\t"), strict=True)))
    return rows


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("e2_long") / "long.pcap"
    _build_trace(path)
    return path


def test_default_timeout_splits_at_every_silence(trace: Path, tmp_path: Path) -> None:
    assert main(["-r", str(trace), "--log-dir", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "conn.log")
    assert len(rows) == 1 + BURSTS
    first, middle, last = rows[0], rows[1:-1], rows[-1]
    assert (first["conn_state"], first["history"], first["orig_bytes"]) == ("S1", "ShADa", "100")
    assert first["duration"] == "0.400000"
    assert all((r["conn_state"], r["history"], r["duration"]) == ("OTH", "Da", "0.100000")
               for r in middle)
    # The final ACK is C's first pure ACK in this connection, hence the trailing `A`.
    assert (last["conn_state"], last["history"], last["duration"]) == ("SF", "DaFfA", "0.300000")
    starts = [float(r["ts"]) for r in rows]
    assert starts == [pytest.approx(T0 + 1200.0 * k, abs=1e-6) for k in range(BURSTS + 1)]


def test_one_hour_timeout_gives_one_record(trace: Path, tmp_path: Path) -> None:
    argv = ["-r", str(trace), "--log-dir", str(tmp_path), "--tcp-inactivity-timeout", "3600"]
    assert main(argv) == 0
    (row,) = _rows(tmp_path / "conn.log")
    assert (row["conn_state"], row["history"]) == ("SF", "ShADaFf")
    assert row["duration"] == f"{1200.0 * BURSTS + 0.3:.6f}"
    assert (row["orig_bytes"], row["resp_bytes"]) == (str(100 * (BURSTS + 1)), "0")
    assert (row["orig_pkts"], row["resp_pkts"]) == (str(3 + BURSTS + 2), str(2 + BURSTS + 1))
