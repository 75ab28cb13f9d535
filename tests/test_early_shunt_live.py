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
import subprocess
import time
from pathlib import Path

import pytest
from lab import Lab, VethPair, is_root, lab_fixture  # noqa: F401
from test_live_daemon import Daemon, frame, sent_totals

pytestmark = pytest.mark.skipif(not is_root() or not shutil.which("openssl"),
                                reason="needs root and openssl")

LAB_PREFIX = "l1e"
A, B = "10.78.0.1", "10.78.0.2"
MSS = 1448


def _contexts(tmp_path: Path, tls12: bool) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    if not cert.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                        str(cert), "-days", "1", "-subj", "/CN=test.local"],
                       check=True, capture_output=True)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    if tls12:
        client.maximum_version = ssl.TLSVersion.TLSv1_2
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(cert), str(key))
    return client, server


def tls_flights(tmp_path: Path, tls12: bool) -> list[tuple[int, bytes]]:
    """A whole TLS session as (0 client / 1 server, bytes) flights, made in memory: handshake,
    a request, a 40 kB response."""
    cctx, sctx = _contexts(tmp_path, tls12)
    ci, co, si, so = (ssl.MemoryBIO() for _ in range(4))
    c = cctx.wrap_bio(ci, co, server_side=False, server_hostname="test.local")
    s = sctx.wrap_bio(si, so, server_side=True)
    out: list[tuple[int, bytes]] = []
    cdone = sdone = False
    for _ in range(20):
        if not cdone:
            try:
                c.do_handshake()
                cdone = True
            except ssl.SSLWantReadError:
                pass
        if b := co.read():
            out.append((0, b))
            si.write(b)
        if not sdone:
            try:
                s.do_handshake()
                sdone = True
            except ssl.SSLWantReadError:
                pass
        if b := so.read():
            out.append((1, b))
            ci.write(b)
        if cdone and sdone and not co.pending and not so.pending:
            break
    assert cdone and sdone
    assert c.version() == ("TLSv1.2" if tls12 else "TLSv1.3")
    c.write(b"GET / HTTP/1.1\r\nHost: test.local\r\n\r\n")
    out.append((0, co.read()))
    si.write(out[-1][1])
    s.read(100)
    s.write(b"x" * 40_000)
    out.append((1, so.read()))
    return out


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


def offline_reference(frames: list[bytes]) -> tuple[int, dict]:
    """Feed the frames to the connection engine: the index of the frame on which it raised
    ssl_established, and its conn.log row."""
    from shuntd.conn.record import CONN_FIELDS
    from shuntd.conn.settings import EngineSettings
    from shuntd.conn.tracker import ConnTracker
    from shuntd.events import EventDispatcher
    from shuntd.packet import decode

    names = [f[0] if isinstance(f, tuple) else f for f in CONN_FIELDS]
    at: list[int] = []
    current = [0]
    d = EventDispatcher()
    d.add_handler("ssl_established", lambda _conn: at.append(current[0]))
    rows: list[tuple] = []
    tracker = ConnTracker(EngineSettings(), hooks=d, sink=lambda _c, row: rows.append(row))
    for i, f in enumerate(frames):
        current[0] = i
        pkt = decode(f, 1, 1000.0 + i * 0.001, len(f), False)
        assert pkt is not None
        tracker.process(pkt)
    tracker.finish()
    assert len(at) == 1 and len(rows) == 1, (at, rows)
    return at[0], dict(zip(names, rows[0], strict=False))


def _late_packets(stderr: str) -> int:
    m = re.search(r"(\d+) taken as late packets", stderr)
    assert m, stderr
    return int(m.group(1))


@pytest.mark.parametrize("tls12", [False, True], ids=["tls1.3", "tls1.2"])
def test_xdp_shunts_a_tls_session_itself_while_the_daemon_is_stopped(lab: Lab, tmp_path: Path,
                                                                     tls12: bool):
    pair = lab.veth_to_netns()
    lab.pin_dir(pair.host)
    sport = 47000 + tls12
    frames = session_frames(pair, tls_flights(tmp_path, tls12), sport)
    k, ref = offline_reference(frames)
    assert k < len(frames) - 10          # the response comes after the handshake
    d = Daemon(lab, pair, tmp_path / "early")   # the default policies: tls and bulk
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        lab.send_frames(pair, frames[:-3])
        time.sleep(0.3)
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
