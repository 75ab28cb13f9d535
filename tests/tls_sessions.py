"""Real TLS sessions for tests, made in memory (ssl.MemoryBIO over OpenSSL, no network), and
the connection engine's view of a session's frames: the independent reference for early shunts
(the frame on which the analyser raises ssl_established, and the conn.log row)."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path
from typing import Any

KINDS: dict[str, dict[str, Any]] = {
    "tls1.2": dict(maxv=ssl.TLSVersion.TLSv1_2),
    "tls1.3-compat": {},
    "tls1.3-nocompat": dict(compat=False),
    "tls1.3-hrr-compat": dict(hrr=True),
    "tls1.3-hrr-nocompat": dict(hrr=True, compat=False),
}


def make_cert(d: Path, names: int = 0) -> Path:
    """Self-signed P-256 certificate and key in d; `names` extra DNS names make it big."""
    extra = ["-addext", "subjectAltName=" + ",".join(
        f"DNS:host{i}.padding.example.test" for i in range(names))] if names else []
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem"), "-days", "1", "-subj", "/CN=test.local",
                    *extra], check=True, capture_output=True)
    return d


def contexts(certdir: Path, maxv: ssl.TLSVersion | None = None, compat: bool = True,
             hrr: bool = False) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cc = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cc.check_hostname = False
    cc.verify_mode = ssl.CERT_NONE
    sc = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sc.load_cert_chain(certdir / "cert.pem", certdir / "key.pem")
    if maxv is not None:
        cc.maximum_version = maxv
    if not compat:
        cc.options &= ~ssl.OP_ENABLE_MIDDLEBOX_COMPAT
        sc.options &= ~ssl.OP_ENABLE_MIDDLEBOX_COMPAT
    if hrr:
        sc.set_ecdh_curve("prime256v1")   # the client's first key share (X25519) is refused
    return cc, sc


def flights(cctx: ssl.SSLContext, sctx: ssl.SSLContext, session: Any = None,
            response: int = 3000) -> tuple[list[tuple[int, bytes]], Any, str | None]:
    """Handshake and one request/reply of `response` bytes; returns [(direction 0 client /
    1 server, bytes)] in the order written, the client's session (for resumption) and the
    version."""
    ci, co, si, so = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = cctx.wrap_bio(ci, co, server_side=False, server_hostname="test.local", session=session)
    s = sctx.wrap_bio(si, so, server_side=True)
    out: list[tuple[int, bytes]] = []
    # (endpoint, what it writes, its peer's input, direction), the client first each round
    ends = ((c, co, si, 0), (s, so, ci, 1))
    done = [False, False]
    for _ in range(20):
        for obj, written, peer_in, d in ends:
            if not done[d]:
                try:
                    obj.do_handshake()
                    done[d] = True
                except ssl.SSLWantReadError:
                    pass
            b = written.read()
            if b:
                out.append((d, b))
                peer_in.write(b)
        if all(done) and not co.pending and not so.pending:
            break
    c.write(b"GET / HTTP/1.1\r\n\r\n")
    b = co.read()
    out.append((0, b))
    si.write(b)
    s.read(100)
    s.write(b"x" * response)
    b = so.read()
    out.append((1, b))
    ci.write(b)
    while True:
        try:
            if not c.read(65536):
                break
        except ssl.SSLWantReadError:   # all read (and TLS 1.3 session tickets taken in)
            break
    return out, c.session, c.version()


def engine_reference(frames: list[bytes]) -> tuple[int | None, dict[str, Any] | None]:
    """Feed Ethernet frames (one connection) to the connection engine: the index of the frame
    during which it raises ssl_established (None: never), and its conn.log row (None: none)."""
    from shuntd.conn.record import CONN_FIELDS
    from shuntd.conn.tracker import ConnTracker
    from shuntd.events import EventDispatcher
    from shuntd.packet import LINKTYPE_ETHERNET, decode

    seen: list[int] = []
    current = [0]
    dispatcher = EventDispatcher()
    dispatcher.add_handler("ssl_established", lambda _conn: seen.append(current[0]))
    rows: list[tuple] = []
    tracker = ConnTracker(hooks=dispatcher, sink=lambda _c, row: rows.append(row))
    for i, raw in enumerate(frames):
        current[0] = i
        pkt = decode(raw, LINKTYPE_ETHERNET, 1_000_000.0 + i * 0.001, len(raw))
        assert pkt is not None
        tracker.process(pkt)
    tracker.finish()
    assert len(seen) <= 1 and len(rows) <= 1, (seen, rows)
    names = [name for name, _type in CONN_FIELDS]
    return (seen[0] if seen else None,
            dict(zip(names, rows[0], strict=True)) if rows else None)
