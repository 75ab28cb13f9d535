"""The shunt-gain benchmark's traffic mix (scripts/make-tls-mix), judged by tshark, not by the
generator: about 88% of its bytes belong to TLS sessions, both TLS 1.2 and 1.3 are negotiated,
TLS handshakes are spread over the file (not a burst at its start), and the engine logs every TLS
session tshark finds as a complete `ssl` connection."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lab import is_root

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not is_root() or not all(shutil.which(t) for t in ("tshark", "dumpcap", "openssl")),
    reason="needs root, tshark, dumpcap and openssl")


def tshark(pcap: Path, *args: str) -> list[list[str]]:
    out = subprocess.run(["tshark", "-r", str(pcap), *args], check=True, capture_output=True,
                         text=True).stdout
    return [line.split("\t") for line in out.splitlines() if line]


def test_mix_is_88_percent_tls_by_bytes(tmp_path: Path):
    pcap = tmp_path / "mix.pcap"
    # A tenth of the sessions' size, a tenth of the gap: flows laid out as in the full-size mix.
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make-tls-mix"), str(pcap),
                    "--scale", "0.1", "--gap", "40"], check=True, capture_output=True, timeout=120)

    # TLS sessions: TCP streams in which tshark dissects a ClientHello.
    tls_streams = {r[0] for r in tshark(pcap, "-Y", "tls.handshake.type == 1", "-T", "fields",
                                        "-e", "tcp.stream")}
    total = tls = 0
    for stream, length in tshark(pcap, "-T", "fields", "-e", "tcp.stream", "-e", "frame.len"):
        total += int(length)
        tls += int(length) if stream in tls_streams else 0
    assert len(tls_streams) >= 40
    assert 0.85 <= tls / total <= 0.91, f"TLS share {tls / total:.3f}"

    # ClientHellos spread over the file: the first tenth holds well under a third of them (it
    # held all of them when flows were interleaved round robin), the second half a good share.
    frames = len(tshark(pcap, "-T", "fields", "-e", "frame.number"))
    hellos = [int(r[0]) for r in tshark(pcap, "-Y", "tls.handshake.type == 1", "-T", "fields",
                                        "-e", "frame.number")]
    assert sum(n <= frames / 10 for n in hellos) < 0.3 * len(hellos), hellos
    assert sum(n > frames / 2 for n in hellos) >= 0.3 * len(hellos), hellos

    # ServerHellos: TLS 1.3 names itself in supported_versions, TLS 1.2 does not.
    versions = [r[1] or "0x0303"
                for r in tshark(pcap, "-Y", "tls.handshake.type == 2", "-T", "fields", "-e",
                                "tcp.stream", "-e", "tls.handshake.extensions.supported_version")]
    assert {"0x0303", "0x0304"} <= set(versions), versions

    # The engine sees what tshark sees: each TLS session an ssl connection closed normally.
    out = tmp_path / "logs"
    subprocess.run([sys.executable, "-m", "shuntd.cli", "-r", str(pcap), "--log-dir", str(out)],
                   check=True, capture_output=True, timeout=120)
    rows = [line.split("\t") for line in (out / "conn.log").read_text().splitlines()
            if not line.startswith("#")]
    ssl = [r for r in rows if r[7] == "ssl"]
    assert len(ssl) == len(tls_streams)
    assert {r[11] for r in rows} == {"SF"}
