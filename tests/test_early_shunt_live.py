"""Early shunts on a live veth (issue 4): with the shipped tls policy loaded, XDP follows a real
TLS handshake and shunts the session itself on the packet where the analyser raises
ssl_established, so a daemon that lags behind gets no late packets of it.

The daemon is stopped (SIGSTOP) while the whole session but its FINs is sent: without early
shunts every packet would wait in the capture ring and reach Python as a late packet. The
sessions are real (Python's ssl on memory BIOs, TLS 1.2 and 1.3), sent as TCP segments from
the peer namespace. What the analyser would do is decided independently of XDP: the same frames
fed offline to the connection engine give the packet of ssl_established and the conn.log row
(state, history, byte counts) the live row must match.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import ssl
import time
from pathlib import Path

import pytest
from lab import Lab, VethPair, is_root, lab_fixture  # noqa: F401
from test_live_daemon import Daemon, frame, pinned_stat, sent_totals
from tls_sessions import contexts, engine_reference, flights, make_cert

pytestmark = pytest.mark.skipif(not is_root() or not shutil.which("openssl"),
                                reason="needs root and openssl")

LAB_PREFIX = "l1e"
A, B = "10.78.0.1", "10.78.0.2"
MSS = 1448


def session_frames(pair: VethPair, flights: list[tuple[int, bytes]],
                   sport: int) -> list[bytes]:
    """SYN, SYN-ACK, ACK; each flight in MSS-sized segments acking the peer; FIN, FIN, ACK."""
    ends = ((A, sport), (B, 443))
    nxt = [1001, 5001]

    def seg(side: int, flags: str, payload: bytes = b"") -> bytes:
        (src, sp), (dst, dp) = ends[side], ends[1 - side]
        return frame(pair, src, sp, dst, dp, flags, nxt[side], nxt[1 - side], payload)

    frames = [frame(pair, A, sport, B, 443, "S", 1000, 0),
              frame(pair, B, 443, A, sport, "SA", 5000, 1001), seg(0, "A")]
    for side, data in flights:
        for off in range(0, len(data), MSS):
            chunk = data[off:off + MSS]
            frames.append(seg(side, "PA", chunk))
            nxt[side] += len(chunk)
    frames.append(seg(0, "FA"))
    nxt[0] += 1
    frames.append(seg(1, "FA"))
    nxt[1] += 1
    frames.append(seg(0, "A"))
    return frames


def _late_packets(stderr: str) -> int:
    m = re.search(r"(\d+) taken as late packets", stderr)
    assert m, stderr
    return int(m.group(1))


@pytest.mark.parametrize("tls12", [False, True], ids=["tls1.3", "tls1.2"])
def test_xdp_shunts_a_tls_session_itself_while_the_daemon_is_stopped(lab: Lab, tmp_path: Path,
                                                                     tls12: bool):
    pair = lab.veth_to_netns()
    sport = 47000 + tls12
    cctx, sctx = contexts(make_cert(tmp_path), ssl.TLSVersion.TLSv1_2 if tls12 else None)
    fl, _session, version = flights(cctx, sctx, response=40_000)
    assert version == ("TLSv1.2" if tls12 else "TLSv1.3")
    frames = session_frames(pair, fl, sport)
    k, ref = engine_reference(frames)
    assert k is not None and ref is not None
    assert k < len(frames) - 10          # the response comes after the handshake
    pin = lab.pin_dir(pair.host)
    d = Daemon(lab, pair, tmp_path / "early")   # the default policies: tls and bulk
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        lab.send_frames(pair, frames[:-3])
        # XDP itself dropped every packet after the handshake's last one (read from the pins
        # with bpftool, not through the stopped daemon).
        assert pinned_stat(pin, "EARLY_ARMED") == 1
        assert pinned_stat(pin, "EARLY_FIRED") == 1
        assert pinned_stat(pin, "DROPPED_FLOW") == len(frames) - 3 - (k + 1)
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    time.sleep(1.0)
    lab.send_frames(pair, frames[-3:])
    time.sleep(0.7)
    assert d.stop() == 0, d.stderr()
    # XDP dropped everything after the handshake: the stopped daemon had nothing late.
    assert _late_packets(d.stderr()) == 0, d.stderr()
    (r,) = [r for r in d.log("conn") if r["id.orig_p"] == str(sport)]
    assert (r["is_shunted"], r["shunt_trigger"], r["service"]) == ("T", "ssl", "ssl"), r
    # The analyser saw the packets up to and including the one of ssl_established.
    assert int(r["orig_pkts"]) + int(r["resp_pkts"]) == k + 1, (k, r)
    sent = sent_totals(frames)
    for direction, host in (("orig", A), ("resp", B)):
        assert (int(r[f"{direction}_pkts"]) + int(r[f"{direction}_shunted_pkts"]),
                int(r[f"{direction}_ip_bytes"]) + int(r[f"{direction}_shunted_bytes"])
                ) == sent[host], (direction, r)
    for field in ("conn_state", "history", "orig_bytes", "resp_bytes", "missed_bytes"):
        assert r[field] == str(ref[field]), (field, r, ref)
    (s,) = [s for s in d.log("shunt") if s["id.orig_p"] == str(sport)]
    assert (s["trigger"], s["end_reason"]) == ("ssl", "fin"), s
