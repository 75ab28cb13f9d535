"""Service detection (spec zeek-conn.md §6): per protocol, positive and negative cases.

Payloads are hand-built from the protocol specs (tests/e3_payloads.py); the expected service
names, their order and the confirmation/established moments come from the spec text.
The connection here is a plain record with the attributes service detection reads; the
end-to-end path through the real tracker and pcaps is in test_events.py.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from e3_payloads import (
    CCS,
    CONNECT_REPLY,
    CONNECT_REQUEST,
    HTTP_REPLY,
    HTTP_REQUEST,
    SSH_CLIENT_BANNER,
    SSH_KEXINIT,
    SSH_NEWKEYS,
    SSH_SERVER_BANNER,
    appdata,
    client_hello,
    crypto_frame,
    dns_query,
    dns_response,
    dtls_client_hello,
    dtls_record,
    dtls_server_hello,
    encrypted_handshake,
    handshake,
    quic_client_initial,
    quic_client_keys,
    server_hello,
    tls_record,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from shuntd.conn.protocols.quic import client_initial_keys
from shuntd.conn.service import ServiceDetection, ServiceSettings


class _Side:
    def __init__(self) -> None:
        self.size = 0


class _Tracker:
    def __init__(self) -> None:
        self.timeouts: list[float] = []

    def set_inactivity_timeout(self, conn: object, secs: float) -> None:
        self.timeouts.append(secs)


class Conn:
    """The attributes of shuntd.conn.connection.Connection that service detection uses."""

    def __init__(self, proto: str, resp_p: int, resp_h: str = "10.0.0.2") -> None:
        self.proto = proto
        self.resp_p = resp_p
        self.resp_h = socket.inet_aton(resp_h)
        # The flow key (proto number, orig_h, orig_p, resp_h, resp_p): orig at side 0.
        self.orig_side = 0
        self.key = ({"tcp": 6, "udp": 17}.get(proto, 1), socket.inet_aton("10.0.0.1"), 40000,
                    self.resp_h, resp_p)
        self.ext: dict | None = None
        self.services = None
        self.service: list[str] = []
        self.failed_services: list[str] = []
        self.orig = _Side()
        self.resp = _Side()
        self.tracker = _Tracker()
        self.history = "ShAD"
        self.flips = 0


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def service_confirmed(self, conn: Conn, name: str) -> None:
        self.events.append(("confirmed", name))

    def service_violation(self, conn: Conn, name: str, reason: str) -> None:
        self.events.append(("violation", name))

    def ssl_established(self, conn: Conn) -> None:
        self.events.append(("ssl_established",))

    def flip_roles(self, conn: Conn) -> None:
        conn.flips += 1

    def set_inactivity_timeout(self, conn: Conn, seconds: float) -> None:
        conn.tracker.set_inactivity_timeout(conn, seconds)


def tcp_conn(port: int, settings: ServiceSettings | None = None,
             partial: bool = False) -> tuple[ServiceDetection, Conn, Sink]:
    sink = Sink()
    det = ServiceDetection(sink, settings)
    conn = Conn("tcp", port)
    if partial:
        conn.history = "DA"     # no SYN from either side: picked up midstream
    det.new_connection(conn)
    return det, conn, sink


def udp_conn(port: int) -> tuple[ServiceDetection, Conn, Sink]:
    sink = Sink()
    det = ServiceDetection(sink)
    conn = Conn("udp", port)
    det.new_connection(conn)
    return det, conn, sink


def feed(det: ServiceDetection, conn: Conn, *chunks: tuple[bool, bytes]) -> None:
    for is_orig, data in chunks:
        if is_orig:
            conn.orig.size += len(data)
        else:
            conn.resp.size += len(data)
        if conn.proto == "tcp":
            det.tcp_deliver(conn, is_orig, data)
        else:
            det.udp_payload(conn, is_orig, memoryview(data))


# -- TLS -------------------------------------------------------------------------------------

def test_tls_client_hello_on_443_is_ssl() -> None:
    det, conn, _ = tcp_conn(443)
    feed(det, conn, (True, tls_record(22, client_hello(), 0x0301)))
    assert conn.service == ["ssl"]


def test_plain_payload_on_443_is_not_ssl() -> None:
    det, conn, sink = tcp_conn(443)
    feed(det, conn, (True, b"hello there, this is not TLS\r\n"), (False, b"nope\r\n"))
    assert conn.service == []
    assert ("violation", "ssl") in sink.events


def test_tls_on_8443_is_ssl_by_signature() -> None:
    det, conn, _ = tcp_conn(8443)
    ch = tls_record(22, client_hello(), 0x0301)
    feed(det, conn, (True, ch[:7]), (True, ch[7:]))   # the signature needs 11 bytes
    assert conn.service == ["ssl"]


def test_server_hello_alone_does_not_confirm() -> None:
    det, conn, _ = tcp_conn(443)
    feed(det, conn, (False, tls_record(22, server_hello())))
    assert conn.service == []


def test_unsupported_client_version_is_not_ssl() -> None:
    det, conn, _ = tcp_conn(443)
    feed(det, conn, (True, tls_record(22, client_hello(0x0200), 0x0301)))
    assert conn.service == []


def test_sslv2_compatible_client_hello() -> None:
    # SSLv2 record header (2 bytes, high bit set), CLIENT-HELLO (1), version 3.1, lengths
    body = b"\x01\x03\x01" + b"\x00\x03" + b"\x00\x00" + b"\x00\x10" + b"\x00\x00\x2f" \
        + b"\x42" * 16
    record = bytes([0x80 | (len(body) >> 8), len(body) & 0xFF]) + body
    det, conn, _ = tcp_conn(9999)
    feed(det, conn, (True, record))
    assert conn.service == ["ssl"]


def _established_moment(chunks: list[tuple[bool, bytes]], port: int = 443) -> int | None:
    """Index of the chunk after which ssl_established was raised (None if never)."""
    det, conn, sink = tcp_conn(port)
    for i, chunk in enumerate(chunks):
        feed(det, conn, chunk)
        if ("ssl_established",) in sink.events:
            assert sink.events.count(("ssl_established",)) == 1
            return i
    return None


def test_ssl_established_tls12_on_server_finished() -> None:
    chunks = [
        (True, tls_record(22, client_hello(), 0x0301)),
        (False, tls_record(22, server_hello() + handshake(11, b"\x00" * 30)
                           + handshake(14, b""))),
        (True, tls_record(22, handshake(16, b"\x01" * 33)) + CCS),
        (True, encrypted_handshake()),                      # client Finished
        (False, CCS),
        (False, encrypted_handshake()),                     # server Finished
        (True, appdata()),
    ]
    assert _established_moment(chunks) == 5


def _tls12_exchange(server_hello_record: bytes) -> list[tuple[bool, bytes]]:
    return [
        (True, tls_record(22, client_hello(), 0x0301)),
        (False, server_hello_record),
        (True, tls_record(22, handshake(16, b"\x01" * 33)) + CCS),
        (True, encrypted_handshake()),                      # client Finished
        (False, CCS),
        (False, encrypted_handshake()),                     # server Finished
        (True, appdata()),
    ]


@pytest.mark.parametrize("piece", [1, 2, 3, 5, 7, 64])
def test_ssl_established_whatever_the_segmentation(piece: int) -> None:
    # Records (and the handshake messages in them) cut at every size: raised right after
    # the last byte of the server's Finished, as with whole records.
    chunks = _tls12_exchange(tls_record(22, server_hello() + handshake(11, b"\x00" * 30)
                                        + handshake(14, b"")))
    pieces = []
    last_of_finished = 0
    for i, (is_orig, data) in enumerate(chunks):
        pieces += [(is_orig, data[k:k + piece]) for k in range(0, len(data), piece)]
        if i == 5:
            last_of_finished = len(pieces) - 1
    assert _established_moment(pieces) == last_of_finished


def test_server_hello_split_over_two_records() -> None:
    sh = server_hello()
    two_records = tls_record(22, sh[:9]) + tls_record(22, sh[9:] + handshake(14, b""))
    assert _established_moment(_tls12_exchange(two_records)) == 5
    # A ServerHello never completed: no established.
    assert _established_moment(_tls12_exchange(tls_record(22, sh[:9]))) is None


def test_state_freed_once_established_and_nothing_left_to_match() -> None:
    chunks = _tls12_exchange(tls_record(22, server_hello() + handshake(14, b"")))
    det, conn, sink = tcp_conn(443)
    feed(det, conn, *chunks[:6])
    assert ("ssl_established",) in sink.events
    assert conn.services is None          # analysers and buffers freed before removal
    feed(det, conn, chunks[6], (False, b"\x99not TLS any more"))
    assert conn.service == ["ssl"] and sink.events.count(("ssl_established",)) == 1


def test_ssl_established_tls13_on_client_finished() -> None:
    chunks = [
        (True, tls_record(22, client_hello(), 0x0301)),
        (False, tls_record(22, server_hello(0x0303, 0x0304)) + CCS + appdata() + appdata()),
        (True, CCS),                                        # compatibility CCS: no effect
        (True, appdata(53)),                                # client Finished (type 23)
        (False, appdata()),
    ]
    assert _established_moment(chunks) == 3


def test_ssl_established_needs_both_sides() -> None:
    # A client alone: ClientHello, CCS, encrypted records, however many.
    client_only = [(True, tls_record(22, client_hello(), 0x0301)), (True, CCS)] + \
        [(True, appdata())] * 5
    assert _established_moment(client_only) is None
    # A server alone (SSL analyser attached by port 443).
    server_only = [(False, tls_record(22, server_hello()) + CCS)] + [(False, appdata())] * 5
    assert _established_moment(server_only) is None
    # Both directions encrypted but no ServerHello ever: application data from both sides.
    no_server_hello = [(True, tls_record(22, client_hello(), 0x0301)), (True, CCS),
                       (True, appdata()), (False, CCS), (False, appdata()), (True, appdata())]
    assert _established_moment(no_server_hello) is None


def test_violation_after_confirmation_removes_service() -> None:
    det, conn, _ = tcp_conn(443)
    feed(det, conn, (True, tls_record(22, client_hello(), 0x0301)), (True, b"\x99garbage!"))
    assert conn.service == []
    assert conn.failed_services == ["ssl"]
    assert det.services_failed(conn) == ["ssl"]


def test_violation_tracked_with_dash_prefix() -> None:
    det, conn, _ = tcp_conn(443, ServiceSettings(track_removed_services=True))
    feed(det, conn, (True, tls_record(22, client_hello(), 0x0301)), (True, b"\x99garbage!"))
    assert conn.service == ["ssl", "-ssl"]


def test_violation_after_10k_is_ignored() -> None:
    det, conn, _ = tcp_conn(443)
    feed(det, conn, (True, tls_record(22, client_hello(), 0x0301)))
    conn.resp.size = 20000       # sizes as in §1.6: more than ignore_violations_after
    feed(det, conn, (True, b"\x99garbage!"))
    assert conn.service == ["ssl"]


# -- HTTP ------------------------------------------------------------------------------------

def test_http_request_and_reply_on_8080() -> None:
    det, conn, _ = tcp_conn(8080)
    feed(det, conn, (True, HTTP_REQUEST), (False, HTTP_REPLY))
    assert conn.service == ["http"]


def test_http_on_odd_port_by_signature() -> None:
    det, conn, _ = tcp_conn(6669)
    feed(det, conn, (True, HTTP_REQUEST[:10]), (True, HTTP_REQUEST[10:]), (False, HTTP_REPLY))
    assert conn.service == ["http"]


def test_non_http_on_port_80_is_not_http() -> None:
    det, conn, _ = tcp_conn(80)
    feed(det, conn, (True, b"\x00\x01\x02 binary junk\r\n"), (False, b"whatever\r\n"))
    assert conn.service == []


def test_http_connect_then_tls_gives_http_ssl() -> None:
    det, conn, _ = tcp_conn(3128)
    feed(det, conn, (True, CONNECT_REQUEST), (False, CONNECT_REPLY),
         (True, tls_record(22, client_hello(), 0x0301)),
         (False, tls_record(22, server_hello())))
    assert conn.service == ["http", "ssl"]


def test_http_connect_refused_has_no_tunnel() -> None:
    det, conn, _ = tcp_conn(3128)
    feed(det, conn, (True, CONNECT_REQUEST),
         (False, b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"),
         (True, tls_record(22, client_hello(), 0x0301)))
    assert conn.service == ["http"]


# -- SSH -------------------------------------------------------------------------------------

SSH_FULL = [(True, SSH_CLIENT_BANNER), (False, SSH_SERVER_BANNER), (True, SSH_KEXINIT),
            (False, SSH_KEXINIT), (True, SSH_NEWKEYS), (False, SSH_NEWKEYS)]


def test_ssh_confirms_on_newkeys_and_sets_one_hour_timeout() -> None:
    det, conn, _ = tcp_conn(22)
    feed(det, conn, *SSH_FULL[:4])
    assert conn.service == []             # banners and KEXINIT do not confirm
    feed(det, conn, SSH_FULL[4])
    assert conn.service == ["ssh"]
    assert conn.tracker.timeouts == [3600.0]   # Conn::analyzer_inactivity_timeouts


def test_ssh_on_odd_port_by_signatures() -> None:
    det, conn, _ = tcp_conn(2200)
    feed(det, conn, *SSH_FULL)
    assert conn.service == ["ssh"]


def test_ssh_banners_only_is_not_ssh() -> None:
    det, conn, _ = tcp_conn(22)
    feed(det, conn, (True, SSH_CLIENT_BANNER), (False, SSH_SERVER_BANNER),
         (True, b"\x00" * 40), (False, b"\x00" * 40))
    assert conn.service == []


def test_ssh_one_side_only_is_not_ssh() -> None:
    det, conn, _ = tcp_conn(22)
    feed(det, conn, (False, SSH_SERVER_BANNER), (False, SSH_KEXINIT), (False, SSH_NEWKEYS))
    assert conn.service == []


@pytest.mark.parametrize("port,chunks", [
    (22, SSH_FULL),
    (80, [(True, HTTP_REQUEST), (False, HTTP_REPLY)]),
    (502, [(True, HTTP_REQUEST), (False, HTTP_REPLY)]),
    (443, [(True, tls_record(22, client_hello(), 0x0301))]),
])
def test_midstream_pickup_is_not_parsed(port: int, chunks: list) -> None:
    # Zeek's SSH, HTTP and SSL analysers return early on partial TCP connections
    # (corpus: modbus `Dr` row and mpls-in-vlan `D` rows carry a GET but no service).
    det, conn, _ = tcp_conn(port, partial=True)
    feed(det, conn, *chunks)
    assert conn.service == []


# -- DNS -------------------------------------------------------------------------------------

def test_dns_udp_53() -> None:
    det, conn, _ = udp_conn(53)
    feed(det, conn, (True, dns_query()), (False, dns_response()))
    assert conn.service == ["dns"]
    assert conn.flips == 0


def test_dns_on_odd_udp_port_is_not_detected_like_zeek() -> None:
    # Zeek has no DNS signature (spec §6.2: attach by content "none"): port 5000 -> no service.
    det, conn, _ = udp_conn(5000)
    feed(det, conn, (True, dns_query()), (False, dns_response()))
    assert conn.service == []


def test_dns_tcp_length_prefixed() -> None:
    det, conn, _ = tcp_conn(53)
    q = dns_query()
    msg = len(q).to_bytes(2, "big") + q
    feed(det, conn, (True, msg[:5]), (True, msg[5:]))
    assert conn.service == ["dns"]


def test_dns_response_from_orig_asks_for_flip() -> None:
    det, conn, _ = udp_conn(53)
    feed(det, conn, (True, dns_response()))
    assert conn.flips == 1
    assert conn.service == ["dns"]


def test_dns_short_first_datagram_leaves_the_flip_to_the_next_message() -> None:
    # A datagram too short for a header is not the "first message": the response after it
    # still decides the flip (Zeek's first-message rule), and confirms.
    det, conn, _ = udp_conn(53)
    feed(det, conn, (True, b"\x00" * 11), (True, dns_response()))
    assert conn.flips == 1
    assert conn.service == ["dns"]


def test_dns_unparsable_first_message_decides_the_flip_alone() -> None:
    # The first whole header decides the flip once (a query: none), even when it does not
    # parse; parsing keeps trying, and a later response from the originator confirms
    # without flipping.
    det, conn, _ = udp_conn(53)
    bad = dns_query()[:12] + b"\xc0"   # a question whose name runs past the end
    feed(det, conn, (True, bad), (True, dns_response()))
    assert conn.flips == 0
    assert conn.service == ["dns"]


def test_dns_garbage_on_53_is_not_dns() -> None:
    det, conn, _ = udp_conn(53)
    feed(det, conn, (True, b"\x01\x02\x03"), (False, b"\xff" * 5))
    assert conn.service == []


# -- QUIC ------------------------------------------------------------------------------------

def test_quic_initial_keys_match_rfc9001_appendix_a() -> None:
    dcid = bytes.fromhex("8394c8f03e515708")
    expected = (bytes.fromhex("1f369613dd76d5467730efcbe3b1a22d"),
                bytes.fromhex("fa044b2f42a3fd3b46fb255c"),
                bytes.fromhex("9f50449e04a0e810283a1e9933adedd2"))
    assert quic_client_keys(dcid) == expected          # the test helper
    assert client_initial_keys(1, dcid) == expected     # shuntd


@pytest.mark.parametrize("port", [443, 50000])
def test_quic_initial_gives_quic_ssl(port: int) -> None:
    det, conn, _ = udp_conn(port)
    feed(det, conn, (True, quic_client_initial()), (False, b"\xc0" + b"\x00" * 60))
    assert conn.service == ["quic", "ssl"]


def test_quic_undecryptable_initial_is_not_quic() -> None:
    det, conn, _ = udp_conn(443)
    feed(det, conn, (True, quic_client_initial(key_dcid=b"wrongkey")))
    assert conn.service == []


def test_quic_crypto_split_over_two_initials() -> None:
    ch = client_hello()
    det, conn, _ = udp_conn(443)
    feed(det, conn, (True, quic_client_initial(frames=crypto_frame(0, ch[:20]), pn=0)))
    assert conn.service == ["quic"]
    feed(det, conn, (True, quic_client_initial(frames=crypto_frame(20, ch[20:]), pn=1)))
    assert conn.service == ["quic", "ssl"]


# -- DTLS ------------------------------------------------------------------------------------

@pytest.mark.parametrize("port", [443, 40000])
def test_dtls_client_hello(port: int) -> None:
    det, conn, _ = udp_conn(port)
    feed(det, conn, (True, dtls_client_hello()))
    assert conn.service == ["dtls"]


def test_dtls_garbage_on_443_is_neither() -> None:
    det, conn, _ = udp_conn(443)
    feed(det, conn, (True, b"\x17" + b"\x00" * 40), (False, b"\x42" * 30))
    assert conn.service == []


def test_dtls12_established_after_both_ccs() -> None:
    det, conn, sink = udp_conn(443)
    feed(det, conn, (True, dtls_client_hello()), (False, dtls_server_hello()),
         (True, dtls_record(20, b"\x01") + dtls_record(22, b"\x5a" * 40, epoch=1)))
    assert ("ssl_established",) not in sink.events
    feed(det, conn, (False, dtls_record(20, b"\x01")))
    assert ("ssl_established",) not in sink.events
    feed(det, conn, (False, dtls_record(22, b"\x5a" * 40, epoch=1)))
    assert sink.events.count(("ssl_established",)) == 1
    assert conn.service == ["dtls"]


# -- corpus: Zeek's own baselines --------------------------------------------------------------

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "zeek" / "core"
OURS = {"ssl", "dtls", "http", "dns", "ssh", "quic"}


@pytest.mark.corpus
@pytest.mark.skipif(not CORPUS.is_dir(), reason="../shared/corpus absent")
@pytest.mark.parametrize("name", ["ssh.basic", "ssh.half-duplex-server", "ssh.http-port-22",
                                  "modbus.modbus_and_non_modbus_on_port_502", "tcp-padding",
                                  "http.http-connect-with-header"])
def test_corpus_services_match_zeek(name: str) -> None:
    """Rows whose baseline service is made only of shuntd's protocols (or unset) get exactly
    Zeek's value, paired by 4-tuple (ts is masked in these baselines)."""
    from shuntd.conn.settings import EngineSettings
    from shuntd.conn.tracker import ConnTracker
    from shuntd.events import EventDispatcher
    from shuntd.offline import run_trace

    d = CORPUS / name
    lines = (d / "conn.log").read_text().splitlines()
    fields = next(line.split("\t")[1:] for line in lines if line.startswith("#fields"))
    want: dict[tuple, list[str]] = {}
    for line in lines:
        if line.startswith("#"):
            continue
        row = dict(zip(fields, line.split("\t"), strict=False))
        svc = row["service"]
        if svc != "-" and not {s.lstrip("-") for s in svc.split(",")} <= OURS:
            continue
        key = (row["id.orig_h"], row["id.orig_p"], row["id.resp_h"], row["id.resp_p"])
        want.setdefault(key, []).append(svc)
    got: dict[tuple, list[str]] = {}

    def sink(conn, row):
        key = tuple(str(v) for v in row[2:6])
        got.setdefault(key, []).append(",".join(conn.service) or "-")

    trace = next(d.glob("trace.pcap*"))
    meta = json.loads((d / "meta.json").read_text())
    settings = EngineSettings(ignore_checksums="-C" in meta["command"].split())
    tracker = ConnTracker(settings, hooks=EventDispatcher(), sink=sink)
    run_trace(trace, tracker)
    assert want
    for key, services in want.items():
        assert sorted(got.get(key, [])) == sorted(services), key


# -- signatures that can no longer match are dropped early -----------------------------------

def _regex_width(sig) -> int:
    """Longest match of the signature's regex after its lead (from the regex parser)."""
    import re

    try:
        from re import _parser as sre_parse  # type: ignore[attr-defined]
    except ImportError:   # Python < 3.11
        import sre_parse  # type: ignore[no-redef]
    pattern = sig.pattern.pattern
    if sig.lead:
        prefix = b"[" + re.escape(sig.lead) + b"]*(?:"
        assert pattern.startswith(prefix) and pattern.endswith(b")")
        pattern = pattern[len(prefix):-1]
    return sre_parse.parse(pattern).getwidth()[1]


def test_signature_reach_is_the_longest_match() -> None:
    from shuntd.conn.service import TCP_SIGNATURES, UDP_SIGNATURES
    for sig in TCP_SIGNATURES + UDP_SIGNATURES:
        assert sig.reach == _regex_width(sig), sig.name


def test_connection_state_sets_every_layer_slot() -> None:
    # ConnServices sets _Layer's slots itself (no super() call per connection).
    from shuntd.conn.service import _Layer
    for port in (25, 80, 443):
        _, conn, _ = tcp_conn(port)
        for name in _Layer.__slots__:
            getattr(conn.services, name)
    _, conn, _ = udp_conn(53)
    assert conn.services.prefix_orig == 0 and conn.services.prefix_resp == 0


def test_smtp_like_dialogue_stops_service_detection() -> None:
    det, conn, _ = tcp_conn(25)
    feed(det, conn, (False, b"220 mx.lab ESMTP ready\r\n"), (True, b"EHLO client.lab\r\n"))
    assert conn.services is None       # no signature can match any more: state freed
    feed(det, conn, (False, b"250 ok\r\n"), (True, b"GET / HTTP/1.1\r\n\r\n"))
    assert conn.service == []


def test_whitespace_before_http_method_keeps_the_signature() -> None:
    det, conn, _ = tcp_conn(6669)
    feed(det, conn, (True, b"\r\n" * 20), (True, b"GE"), (True, b"T / HTTP/1.1\r\n\r\n"))
    assert conn.service == ["http"]     # the client's signature attached it


def test_resp_signature_matching_late_still_gets_the_orig_bytes() -> None:
    # The orig direction's signatures are settled by its first bytes, but its chunks stay
    # buffered: the analyser the server's reply attaches must see the request too.
    det, conn, _ = tcp_conn(6669)
    feed(det, conn, (True, b"\x00GET / HTTP/1.1\r\n\r\n"), (False, HTTP_REPLY))
    assert conn.services is None
    assert conn.service == []     # no request line in the orig bytes: never confirmed
    det, conn, _ = tcp_conn(6669)
    feed(det, conn, (True, b"GET / HTTP/1.1\r\n\r\n"), (False, b"HT"),
         (False, HTTP_REPLY[2:]))
    assert conn.service == ["http"]


_CHUNK_PIECES = [b"", b" ", b"\r\n", b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n",
                 b"SSH-2.0-x\r\n", b"SSH-", b"220 ready\r\n", b"\x16\x03\x01\x00\x05\x01",
                 b"\x00\x00\x03\x03", b"x" * 30, b"CONNECT h:443 HTTP/1.1\r\n\r\n"]


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.tuples(st.booleans(),
                                 st.lists(st.sampled_from(_CHUNK_PIECES), max_size=3)
                                 .map(b"".join)), max_size=10),
       port=st.sampled_from([80, 443, 22, 25, 6000]))
def test_dropping_settled_signatures_changes_no_outcome(chunks, port) -> None:
    """Same services and events as with signatures that never settle (the PIA then looks at
    every chunk up to the DPD limits, as before signatures were dropped)."""
    import dataclasses

    from shuntd.conn import service

    det, conn, sink = tcp_conn(port)
    feed(det, conn, *chunks)
    never = tuple(dataclasses.replace(s, reach=1 << 62) for s in service.TCP_SIGNATURES)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(service, "TCP_SIGNATURES", never)
        ref_det, ref_conn, ref_sink = tcp_conn(port)
        feed(ref_det, ref_conn, *chunks)
    assert conn.service == ref_conn.service
    assert sink.events == ref_sink.events


# -- robustness: bad input never raises out of the detectors -----------------------------------

@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.tuples(st.booleans(), st.binary(max_size=300)), max_size=8),
       port=st.sampled_from([443, 80, 22, 53, 8443, 6000]), udp=st.booleans(),
       prefix=st.sampled_from([b"", b"\x16\x03\x01", b"GET ", b"SSH-2.0-x\r\n",
                               b"\xc3\x00\x00\x00\x01", b"\x16\xfe\xfd" + b"\x00" * 10]))
def test_fuzzed_payloads_never_raise(chunks, port, udp, prefix) -> None:
    det, conn, _ = udp_conn(port) if udp else tcp_conn(port)
    feed(det, conn, (True, prefix), *chunks)
    det.content_gap(conn, False, 10)
    feed(det, conn, *chunks)
