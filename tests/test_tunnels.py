"""Tunnel decapsulation (conn/tunnels.py): scapy-built encapsulated packets through the real
decoder and tracker; the rows must look like Zeek's conn.log for the same packets.

Expectations are Zeek's rules, written out by hand: IP-in-IP/GRE tunnels make no row and
their uid appears only in the inner rows' tunnel_parents; UDP tunnels make an ordinary UDP
row whose service names the tunnel and whose uid is the inner rows' parent.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from scapy.contrib.erspan import ERSPAN_II, ERSPAN_III  # noqa: E402
from scapy.contrib.geneve import GENEVE  # noqa: E402
from scapy.contrib.gtp import GTP_U_Header  # noqa: E402
from scapy.layers.inet import ICMP, IP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402
from scapy.layers.l2 import GRE, Ether  # noqa: E402
from scapy.layers.ppp import GRE_PPTP  # noqa: E402
from scapy.layers.vxlan import VXLAN  # noqa: E402
from scapy.packet import Raw  # noqa: E402
from shuntd import cli  # noqa: E402
from shuntd.conn.record import CONN_FIELDS  # noqa: E402
from shuntd.conn.settings import EngineSettings  # noqa: E402
from shuntd.conn.tracker import ConnTracker  # noqa: E402
from shuntd.conn.tunnels import MAX_DEPTH  # noqa: E402
from shuntd.packet import LINKTYPE_ETHERNET, decode  # noqa: E402

NAMES = [n for n, _t in CONN_FIELDS]
T0 = 1_500_000_000.0
OUT_A, OUT_B = "192.0.2.1", "192.0.2.2"
IN_A, IN_B = "10.9.0.1", "10.9.0.2"
IN6_A, IN6_B = "fd00::1", "fd00::2"


def _eth():
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def _run(frames: list[bytes], **kw) -> list[dict]:
    rows: list[tuple] = []
    tracker = ConnTracker(EngineSettings(**kw), sink=lambda _c, r: rows.append(r))
    for i, frame in enumerate(frames):
        pkt = decode(frame, LINKTYPE_ETHERNET, T0 + i * 0.1, len(frame))
        assert pkt is not None
        tracker.process(pkt)
    tracker.finish()
    return [dict(zip(NAMES, r, strict=True)) for r in rows]


def _row(rows: list[dict], orig_h: str, resp_h: str) -> dict:
    found = [r for r in rows if r["id.orig_h"] == orig_h and r["id.resp_h"] == resp_h]
    assert len(found) == 1, (orig_h, resp_h, rows)
    return found[0]


def _inner_udp(src: str = IN_A, dst: str = IN_B, payload: bytes = b"hello"):
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    return ip / UDP(sport=40000, dport=40001) / Raw(payload)


def _inner_echo(seq: int, reply: bool = False):
    if reply:
        return IP(src=IN_B, dst=IN_A) / ICMP(type=0, id=7, seq=seq) / Raw(b"p" * 8)
    return IP(src=IN_A, dst=IN_B) / ICMP(type=8, id=7, seq=seq) / Raw(b"p" * 8)


# ---- IP tunnels: no row of their own ------------------------------------------------------

@pytest.mark.parametrize("outer,inner", [
    (IP(src=OUT_A, dst=OUT_B), _inner_udp()),                        # 4in4
    (IP(src=OUT_A, dst=OUT_B), _inner_udp(IN6_A, IN6_B)),            # 6in4
    (IPv6(src="2001:db8::1", dst="2001:db8::2"), _inner_udp()),      # 4in6
    (IPv6(src="2001:db8::1", dst="2001:db8::2"), _inner_udp(IN6_A, IN6_B)),  # 6in6
])
def test_ip_in_ip(outer, inner) -> None:
    rows = _run([bytes(_eth() / outer / inner)])
    assert len(rows) == 1                      # the outer IP pair is no connection
    row = rows[0]
    assert row["proto"] == "udp" and row["id.orig_p"] == 40000
    assert row["orig_pkts"] == 1 and row["orig_ip_bytes"] == len(bytes(inner))
    (parent,) = row["tunnel_parents"]
    assert parent.startswith("C") and parent != row["uid"]


def test_ip_tunnel_uid_is_per_ip_pair_in_both_directions() -> None:
    frames = [bytes(_eth() / IP(src=OUT_A, dst=OUT_B) / _inner_echo(1)),
              bytes(_eth() / IP(src=OUT_B, dst=OUT_A) / _inner_echo(1, reply=True)),
              bytes(_eth() / IP(src=OUT_A, dst="192.0.2.3") / _inner_udp())]
    rows = _run(frames)
    echo = next(r for r in rows if r["proto"] == "icmp")
    udp = next(r for r in rows if r["proto"] == "udp")
    assert len(rows) == 2
    assert echo["orig_pkts"] == 1 and echo["resp_pkts"] == 1
    assert len(echo["tunnel_parents"]) == 1     # both directions: the same tunnel uid
    assert echo["tunnel_parents"] != udp["tunnel_parents"]   # another pair, another tunnel


@pytest.mark.parametrize("gre", [
    GRE(proto=0x0800),
    GRE(proto=0x0800, key_present=1, key=5, seqnum_present=1, sequence_number=9),
    GRE(proto=0x0800, chksum_present=1),
])
def test_gre_ip(gre) -> None:
    rows = _run([bytes(_eth() / IP(src=OUT_A, dst=OUT_B) / gre / _inner_udp())])
    assert [(r["id.orig_h"], r["proto"]) for r in rows] == [(IN_A, "udp")]
    assert len(rows[0]["tunnel_parents"]) == 1


def test_gre_transparent_ethernet_and_erspan() -> None:
    inner = bytes(_eth() / _inner_udp())
    frames = [
        bytes(_eth() / IP(src=OUT_A, dst=OUT_B) / GRE(proto=0x6558) / Raw(inner)),
        bytes(_eth() / IP(src=OUT_A, dst="192.0.2.5") / GRE(proto=0x88BE, seqnum_present=1)
              / ERSPAN_II(vlan=1) / Raw(bytes(_eth() / _inner_udp(IN_A, "10.9.0.5")))),
        bytes(_eth() / IP(src=OUT_A, dst="192.0.2.6") / GRE(proto=0x22EB)
              / ERSPAN_III(vlan=1) / Raw(bytes(_eth() / _inner_udp(IN_A, "10.9.0.6")))),
    ]
    rows = _run(frames)
    assert sorted(r["id.resp_h"] for r in rows) == [IN_B, "10.9.0.5", "10.9.0.6"]
    assert all(r["tunnel_parents"] for r in rows)


def test_gre_aruba_80211_amsdu_gives_every_subframe() -> None:
    # Aruba GRE (type 0x8200) carrying an 802.11 QoS data frame with an A-MSDU of two
    # subframes (Zeek's gre-aruba-amsdu.pcap: one frame, two packets of one connection).
    from scapy.layers.dot11 import Dot11, Dot11QoS
    subs = b""
    for i in range(2):
        ip = bytes(IP(src=IN_A, dst=IN_B) / UDP(sport=40000, dport=40001) / Raw(b"a" * (9 + i)))
        llc = b"\xaa\xaa\x03\x00\x00\x00\x08\x00" + ip
        sub = b"\x02" * 12 + struct.pack("!H", len(llc)) + llc
        subs += sub + b"\x00" * (len(llc) % 4 if i == 0 else 0)   # Zeek's padding rule
    wlan = bytes(Dot11(type=2, subtype=8, FCfield=0x01) / Dot11QoS(A_MSDU_Present=1)) + subs
    rows = _run([bytes(_eth() / IP(src=OUT_A, dst=OUT_B) / GRE(proto=0x8200) / Raw(wlan))])
    assert len(rows) == 1
    assert rows[0]["orig_pkts"] == 2 and rows[0]["orig_ip_bytes"] == (28 + 9) + (28 + 10)
    assert len(rows[0]["tunnel_parents"]) == 1


def test_gre_pptp_needs_exact_inner_length() -> None:
    inner = _inner_udp()
    good = (_eth() / IP(src=OUT_A, dst=OUT_B) / GRE_PPTP(seqnum_present=1, call_id=3)
            / Raw(b"\xff\x03\x00\x21") / inner)
    bad = bytes(good) + b"\x00\x00"   # trailing bytes after the inner IP: Zeek drops it
    rows = _run([bytes(good)])
    assert len(rows) == 1 and rows[0]["id.orig_h"] == IN_A
    frame = bytearray(bad)
    struct.pack_into("!H", frame, 16, len(frame) - 14)     # outer IPv4 total length
    frame[24:26] = b"\x00\x00"
    csum = sum(struct.unpack("!10H", frame[14:34]))
    csum = (csum & 0xFFFF) + (csum >> 16)
    struct.pack_into("!H", frame, 24, ~csum & 0xFFFF)
    outer = decode(bytes(frame), LINKTYPE_ETHERNET, T0, len(frame))
    assert outer is not None and outer.proto == 47 and outer.ip_len == len(frame) - 14
    assert _run([bytes(frame)]) == []


def test_undecodable_gre_makes_no_row() -> None:
    # Zeek's IP analyzer hands protocol 47 to GRE, never to the unknown-transport session.
    frames = [bytes(_eth() / IP(src=OUT_A, dst=OUT_B) / GRE(proto=0x1234) / Raw(b"x" * 30)),
              bytes(_eth() / IP(src=OUT_A, dst=OUT_B, proto=47) / Raw(b"\x00\x07" + b"y" * 30))]
    assert _run(frames) == []


def test_max_depth_two_encapsulations() -> None:
    three = (_eth() / IP(src=OUT_A, dst=OUT_B) / IP(src="192.0.2.3", dst="192.0.2.4")
             / IP(src="192.0.2.5", dst="192.0.2.6") / _inner_udp())
    two = _eth() / IP(src=OUT_A, dst=OUT_B) / IP(src="192.0.2.3", dst="192.0.2.4") / _inner_udp()
    assert MAX_DEPTH == 2
    assert _run([bytes(three)]) == []
    rows = _run([bytes(two)])
    assert len(rows) == 1 and len(rows[0]["tunnel_parents"]) == 1   # innermost tunnel only


# ---- UDP tunnels: the outer connection is a row with the tunnel's service ------------------

def _udp_outer(sport: int, dport: int, src: str = OUT_A, dst: str = OUT_B):
    return _eth() / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport)


def test_vxlan_outer_row_service_and_parents_union() -> None:
    # Each direction has its own outer UDP flow (different source ports), as in Zeek's
    # vxlan.pcap: the inner ICMP connection gets both uids.
    frames = [
        bytes(_udp_outer(38071, 4789) / VXLAN(vni=10) / _eth() / _inner_echo(1)),
        bytes(_udp_outer(48134, 4789, OUT_B, OUT_A) / VXLAN(vni=10) / _eth()
              / _inner_echo(1, reply=True)),
    ]
    rows = _run(frames)
    outer1 = _row(rows, OUT_A, OUT_B)
    outer2 = _row(rows, OUT_B, OUT_A)
    inner = _row(rows, IN_A, IN_B)
    for outer in (outer1, outer2):
        assert outer["service"] == "vxlan" and outer["conn_state"] == "S0"
        assert outer["history"] == "D" and outer["tunnel_parents"] is None
    assert inner["tunnel_parents"] == {outer1["uid"], outer2["uid"]}
    assert inner["orig_pkts"] == 1 and inner["resp_pkts"] == 1 and inner["service"] is None


def test_tunnel_changes_past_the_limit_mark_x() -> None:
    # Requests through one outer flow, replies through another: every packet changes the
    # encapsulation. Zeek reports 5 changes (tunnel_max_changes_per_connection); the 6th
    # adds no parent but 'X' to the history (Zeek's vxlan.pcap: 8 packets, history "X").
    def frames(n: int) -> list[bytes]:
        out = []
        for i in range(n):
            if i % 2:
                out.append(bytes(_udp_outer(48134, 4789, OUT_B, OUT_A) / VXLAN(vni=1) / _eth()
                                 / _inner_echo(i // 2, reply=True)))
            else:
                out.append(bytes(_udp_outer(38071, 4789) / VXLAN(vni=1) / _eth()
                                 / _inner_echo(i // 2)))
        return out
    six = _row(_run(frames(6)), IN_A, IN_B)
    eight = _row(_run(frames(8)), IN_A, IN_B)
    assert six["history"] is None and len(six["tunnel_parents"]) == 2
    assert eight["history"] == "X" and len(eight["tunnel_parents"]) == 2
    assert eight["orig_pkts"] == 4 and eight["resp_pkts"] == 4


def test_inner_fragments_are_reassembled() -> None:
    from scapy.layers.inet import fragment
    whole = IP(src=IN_A, dst=IN_B, id=77) / UDP(sport=40000, dport=40001) / Raw(b"f" * 600)
    frags = fragment(whole, fragsize=256)
    assert len(frags) == 3
    frames = [bytes(_udp_outer(38071, 4789) / VXLAN(vni=1) / _eth() / f) for f in frags]
    frames += [bytes(_eth() / IP(src=OUT_A, dst="192.0.2.9") / f) for f in frags]   # 4in4
    rows = _run(frames)
    inner = _row(rows, IN_A, IN_B)
    # One datagram through each tunnel: two packets of 20 + 8 + 600 bytes, both parents.
    assert inner["orig_pkts"] == 2 and inner["orig_ip_bytes"] == 2 * 628
    assert len(inner["tunnel_parents"]) == 2


def test_vxlan_without_i_flag_is_a_violation() -> None:
    frames = [bytes(_udp_outer(1000, 4789) / VXLAN(flags=0) / _eth() / _inner_udp()),
              bytes(_udp_outer(1000, 4789) / VXLAN(vni=1) / _eth() / _inner_udp())]
    rows = _run(frames)
    assert len(rows) == 1                     # once violated, never decapsulated again
    assert rows[0]["service"] is None and rows[0]["orig_pkts"] == 2


def test_vxlan_only_on_the_responder_port() -> None:
    rows = _run([bytes(_udp_outer(4789, 5555) / VXLAN(vni=1) / _eth() / _inner_udp())])
    # 4789 is a likely server port, so the connection flips and 4789 is the responder port.
    assert {r["id.orig_h"] for r in rows} == {OUT_B, IN_A}
    rows = _run([bytes(_udp_outer(5555, 4788) / VXLAN(vni=1) / _eth() / _inner_udp())])
    assert len(rows) == 1 and rows[0]["service"] is None


def test_geneve_ethernet_and_ip_payloads() -> None:
    frames = [
        bytes(_udp_outer(50901, 6081) / GENEVE(vni=1, proto=0x6558) / _eth() / _inner_udp()),
        bytes(_udp_outer(50902, 6081) / GENEVE(vni=1, proto=0x0800, optionlen=2)
              / Raw(b"\x01\x02\x03\x04\x05\x06\x07\x08") / _inner_udp(IN_A, "10.9.0.7")),
    ]
    # scapy's GENEVE fills proto from the layer above; with Raw options we force it.
    rows = _run(frames)
    for port in (50901, 50902):
        outer = next(r for r in rows if r["id.orig_p"] == port)
        assert outer["service"] == "geneve"
    inner1 = _row(rows, IN_A, IN_B)
    inner2 = _row(rows, IN_A, "10.9.0.7")
    assert inner1["tunnel_parents"] == {next(r["uid"] for r in rows if r["id.orig_p"] == 50901)}
    assert inner2["tunnel_parents"] == {next(r["uid"] for r in rows if r["id.orig_p"] == 50902)}


def test_geneve_in_vxlan_parent_is_innermost() -> None:
    vx = (IP(src="127.0.0.2", dst="127.0.0.3") / UDP(sport=26383, dport=4789) / VXLAN(vni=2)
          / _eth() / _inner_udp())
    frame = bytes(_udp_outer(11803, 6081) / GENEVE(vni=1, proto=0x0800) / vx)
    rows = _run([frame])
    geneve = next(r for r in rows if r["id.resp_p"] == 6081)
    vxlan = next(r for r in rows if r["id.resp_p"] == 4789)
    inner = _row(rows, IN_A, IN_B)
    assert geneve["service"] == "geneve" and vxlan["service"] == "vxlan"
    assert vxlan["tunnel_parents"] == {geneve["uid"]}
    assert inner["tunnel_parents"] == {vxlan["uid"]}


def test_gtpv1_user_plane() -> None:
    frames = [
        bytes(_udp_outer(2152, 2152) / GTP_U_Header(teid=1) / _inner_echo(1)),
        bytes(_udp_outer(2152, 2152, OUT_B, OUT_A) / GTP_U_Header(teid=2)
              / _inner_echo(1, reply=True)),
        # With the optional sequence number field (S flag): 4 more header bytes.
        bytes(_udp_outer(2152, 2152) / GTP_U_Header(teid=1, S=1, seq=5) / _inner_echo(2)),
        # A GTP control message (echo request, type 1): ignored, no violation.
        bytes(_udp_outer(2152, 2152) / GTP_U_Header(teid=0, gtp_type=1) / Raw(b"\x00" * 4)),
    ]
    rows = _run(frames)
    outer = next(r for r in rows if r["proto"] == "udp")
    inner = next(r for r in rows if r["proto"] == "icmp")
    assert outer["service"] == "gtpv1" and outer["orig_pkts"] + outer["resp_pkts"] == 4
    assert inner["tunnel_parents"] == {outer["uid"]}
    assert inner["orig_pkts"] == 2 and inner["resp_pkts"] == 1


def _teredo_bubble(src6: str, dst6: str) -> bytes:
    return bytes(IPv6(src=src6, dst=dst6, nh=59, plen=0))


def test_teredo_confirmation_waits_for_both_directions() -> None:
    teredo_client = "2001:0:4137:9e50:8000:f12a:b9c8:2815"
    inner = IPv6(src=teredo_client, dst="2001:4860::68") / UDP(sport=1, dport=2) / Raw(b"q")
    reply = IPv6(src="2001:4860::68", dst=teredo_client) / UDP(sport=2, dport=1) / Raw(b"r")
    one_way = [bytes(_udp_outer(3797, 3544) / inner)]
    rows = _run(one_way)
    outer = _row(rows, OUT_A, OUT_B)
    assert outer["service"] is None                     # delay_teredo_confirmation = T
    assert _row(rows, teredo_client, "2001:4860::68")["tunnel_parents"] == {outer["uid"]}
    rows = _run(one_way, delay_teredo_confirmation=False)
    assert _row(rows, OUT_A, OUT_B)["service"] == "teredo"
    both = one_way + [bytes(_udp_outer(3544, 3797, OUT_B, OUT_A) / reply)]
    rows = _run(both)
    assert _row(rows, OUT_A, OUT_B)["service"] == "teredo"


def test_teredo_found_by_content_on_another_port() -> None:
    # Origin indication (8 bytes) + a bubble, then IPv6 data on a non-Teredo port: found by
    # TeredoAnalyzer::DetectProtocol.
    client = "2001:0:4137:9e50:8000:f12a:b9c8:2815"
    bubble = _teredo_bubble(client, "2001:4860::68")
    frames = [bytes(_udp_outer(3797, 32900) / Raw(b"\x00\x00\x7f\x7b\xac\x55\xfe\xd9" + bubble)),
              bytes(_udp_outer(3797, 32900) / IPv6(src=client, dst="2001:4860::68")
                    / UDP(sport=5, dport=6) / Raw(b"z" * 10)),
              bytes(_udp_outer(32900, 3797, OUT_B, OUT_A) / IPv6(src="2001:4860::68", dst=client)
                    / UDP(sport=6, dport=5) / Raw(b"y" * 10))]
    rows = _run(frames)
    outer = _row(rows, OUT_A, OUT_B)
    inner = _row(rows, client, "2001:4860::68")
    assert outer["service"] == "teredo"       # valid both ways
    assert inner["tunnel_parents"] == {outer["uid"]}
    assert inner["orig_pkts"] == 1 and inner["resp_pkts"] == 1
    assert len(rows) == 2                     # the bubble makes no connection


def test_ayiya() -> None:
    # id len 2^4 = 16; 0x52: signature 5 words (20 bytes), SHA1; 0x11: IPv6 id, opcode 1
    # (forward); next header 41 (IPv6); epoch; identity; signature.
    hdr = bytes([0x41, 0x52, 0x11, 41]) + b"\x00" * 4 + b"\x01" * 16 + b"\x02" * 20
    inner = _inner_udp(IN6_A, IN6_B)
    frames = [bytes(_udp_outer(12345, 5072) / Raw(hdr + bytes(inner))),
              # found by content (0x52 0x11) on another port
              bytes(_udp_outer(12346, 7777) / Raw(hdr + bytes(inner)))]
    rows = _run(frames)
    outers = [r for r in rows if r["id.orig_h"] == OUT_A]
    assert sorted(r["service"] for r in outers) == ["ayiya", "ayiya"]
    inner_row = _row(rows, IN6_A, IN6_B)
    assert inner_row["tunnel_parents"] == {r["uid"] for r in outers}
    assert inner_row["orig_pkts"] == 2


# ---- malformed tunnel headers never raise --------------------------------------------------

_FUZZ = settings(max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_UDP_PORTS = st.sampled_from([4789, 6081, 2152, 2123, 3544, 5072, 9999])


@_FUZZ
@given(port=_UDP_PORTS, body=st.binary(max_size=160))
def test_arbitrary_bytes_in_udp_tunnels_never_raise(port: int, body: bytes) -> None:
    frame = bytes(_udp_outer(1234, port) / Raw(body))
    rows = _run([frame])
    assert any(r["id.resp_p"] == port for r in rows)


@_FUZZ
@given(gre=st.sampled_from([0x8200, 0x6558, 0x88BE, 0x22EB, 0x0800]), body=st.binary(max_size=160))
def test_arbitrary_bytes_after_gre_headers_never_raise(gre: int, body: bytes) -> None:
    _run([bytes(_eth() / IP(src=OUT_A, dst=OUT_B) / GRE(proto=gre) / Raw(body))])


@_FUZZ
@given(proto=st.sampled_from([4, 41, 47]), body=st.binary(max_size=160))
def test_arbitrary_bytes_in_ip_tunnels_never_raise(proto: int, body: bytes) -> None:
    frame = bytes(_eth() / IP(src=OUT_A, dst=OUT_B, proto=proto) / Raw(body))
    for row in _run([frame]):
        assert row["tunnel_parents"]         # a row can only come from an inner packet


@_FUZZ
@given(prefix=st.sampled_from([
    bytes(VXLAN(vni=1)), bytes(GENEVE(vni=1, proto=0x6558)), bytes(GTP_U_Header(teid=1)),
    b"\x00\x00\x7f\x7b\xac\x55\xfe\xd9", bytes([0x41, 0x52, 0x11, 41]) + b"\x00" * 20]),
    port=_UDP_PORTS, body=st.binary(max_size=120))
def test_valid_tunnel_header_then_garbage_never_raises(prefix: bytes, port: int,
                                                      body: bytes) -> None:
    _run([bytes(_udp_outer(1234, port) / Raw(prefix + body))])


# ---- tunnel.log ----------------------------------------------------------------------------

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "zeek" / "stretch"

# Zeek's own tunnel.log baselines (testing/btest/Baseline/core.tunnels.{vxlan,gre-in-gre}),
# uid left out: (ts, orig_h, orig_p, resp_h, resp_p, tunnel_type, action).
ZEEK_TUNNEL_LOGS = {
    "tunnels.vxlan": [
        ("1467818432.676047", "192.168.56.11", "48134", "192.168.56.12", "4789",
         "Tunnel::VXLAN", "Tunnel::DISCOVER"),
        ("1467818432.676385", "192.168.56.12", "38071", "192.168.56.11", "4789",
         "Tunnel::VXLAN", "Tunnel::DISCOVER"),
        ("1467818435.680663", "192.168.56.11", "48134", "192.168.56.12", "4789",
         "Tunnel::VXLAN", "Tunnel::CLOSE"),
        ("1467818435.680663", "192.168.56.12", "38071", "192.168.56.11", "4789",
         "Tunnel::VXLAN", "Tunnel::CLOSE"),
    ],
    "tunnels.gre-in-gre": [
        ("1341436424.204043", "72.205.54.70", "0", "86.106.164.150", "0",
         "Tunnel::GRE", "Tunnel::DISCOVER"),
        ("1341436424.204043", "10.10.11.2", "0", "10.10.13.2", "0",
         "Tunnel::GRE", "Tunnel::DISCOVER"),
    ],
}


@pytest.mark.parametrize("name", sorted(ZEEK_TUNNEL_LOGS))
def test_tunnel_log_matches_zeek(name: str, tmp_path: Path) -> None:
    trace = CORPUS / name / "trace.pcap"
    if not trace.is_file():
        pytest.skip("../shared/corpus is absent")
    assert cli.main(["-r", str(trace), "--log-dir", str(tmp_path), "--no-conn-long"]) == 0
    lines = [ln.split("\t") for ln in (tmp_path / "tunnel.log").read_text().splitlines()
             if not ln.startswith("#")]
    got = [(f[0], *f[2:]) for f in lines]
    want = ZEEK_TUNNEL_LOGS[name]
    # Same rows; DISCOVERs in Zeek's order (CLOSEs at one timestamp may come in any order).
    assert sorted(got) == sorted(want)
    assert [r for r in got if r[-1] == "Tunnel::DISCOVER"] == [
        r for r in want if r[-1] == "Tunnel::DISCOVER"]
    conn_uids = {ln.split("\t")[1] for ln in (tmp_path / "conn.log").read_text().splitlines()
                 if not ln.startswith("#")}
    for f in lines:    # UDP tunnels are connections: the same uid as their conn.log row
        assert (f[1] in conn_uids) == (f[3] != "0")


def test_tunnel_log_expires_idle_ip_tunnels(tmp_path: Path) -> None:
    rows: list[tuple] = []
    tracker = ConnTracker(EngineSettings(udp_inactivity_timeout=0))  # inner conns stay
    tracker.tunnels.write_log = rows.append
    # (time, inner source port): a new inner connection refreshes the tunnel, an old one not
    # (Tunnel::active is only looked at by new_connection / tunnel_changed).
    for dt, sport in ((0, 1), (10, 2), (3605, 1), (3611, 3)):
        inner = IP(src=IN_A, dst=IN_B) / UDP(sport=sport, dport=9) / Raw(b"x")
        frame = bytes(_eth() / IP(src=OUT_A, dst=OUT_B) / inner)
        tracker.process(decode(frame, LINKTYPE_ETHERNET, T0 + dt, len(frame)))
    tracker.finish()
    actions = [(r[0] - T0, r[6], r[7]) for r in rows]
    # Discovered at T0, refreshed at T0+10, so still active at T0+3605; due at T0+3610:
    # timers run in network time, so the expiry is logged when the next packet (T0+3611)
    # moves the clock, and that packet's new connection discovers the tunnel again.
    assert actions == [(0.0, "Tunnel::IP", "Tunnel::DISCOVER"),
                       (3611.0, "Tunnel::IP", "Tunnel::EXPIRE"),
                       (3611.0, "Tunnel::IP", "Tunnel::DISCOVER")]


def test_unwritable_tunnel_log_costs_no_conn_record(tmp_path: Path, capsys):
    """tunnel.log that cannot be written (here: a directory in its place) is reported and the
    exit status says so, but every conn.log record is still written."""
    trace = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "zeek" / \
        "stretch" / "tunnels.vxlan" / "trace.pcap"
    if not trace.is_file():
        pytest.skip("../shared/corpus is absent")
    good, bad = tmp_path / "good", tmp_path / "bad"
    (bad / "tunnel.log" / "d").mkdir(parents=True)
    assert cli.main(["-r", str(trace), "--log-dir", str(good), "--no-conn-long"]) == 0
    assert cli.main(["-r", str(trace), "--log-dir", str(bad), "--no-conn-long"]) == 1
    assert "tunnel.log records not written" in capsys.readouterr().err

    def rows(d: Path) -> list[str]:
        return [x for x in (d / "conn.log").read_text().splitlines() if not x.startswith("#")]
    assert len(rows(bad)) == len(rows(good)) == 5


# ---- encapsulation seen before events; the whole stack compared -------------------------

def test_policy_new_connection_sees_tunnel_parents(tmp_path: Path) -> None:
    # A policy file, loaded as the daemon loads it, records what new_connection shows it:
    # the inner connection already carries its tunnel parent (Zeek: c$tunnel is set when
    # new_connection is raised), and the outer VXLAN connection carries none.
    from shuntd import policyfile
    from shuntd.events import EVENTS, EventDispatcher

    policy = tmp_path / "seen.py"
    policy.write_text("SEEN = []\n\n"
                      "def new_connection(conn):\n"
                      "    SEEN.append((conn.orig_h, conn.uid, set(conn.tunnel_parents or ())))\n")
    policy.chmod(0o644)
    loaded = policyfile.load(str(policy), EVENTS)
    hooks = EventDispatcher()
    hooks.add_handlers(loaded.handlers)
    tracker = ConnTracker(EngineSettings(), hooks=hooks)
    frame = bytes(_udp_outer(38071, 4789) / VXLAN(vni=10) / _eth() / _inner_echo(1))
    tracker.process(decode(frame, LINKTYPE_ETHERNET, T0, len(frame)))
    seen = loaded.module.SEEN
    assert [s[0] for s in seen] == [_ip4(OUT_A), _ip4(IN_A)]   # outer first, then inner
    (_o, outer_uid, outer_parents), (_i, _u, inner_parents) = seen
    assert outer_parents == set() and inner_parents == {outer_uid}


def _ip4(text: str) -> bytes:
    import socket
    return socket.inet_aton(text)


def test_tunnel_changed_compares_the_whole_stack() -> None:
    # 4in4 carrying VXLAN carrying ICMP. The outer IP pair alternates between two tunnels
    # while the VXLAN connection (the innermost encapsulation) stays the same: Zeek compares
    # the whole EncapsulationStack, so every packet is a tunnel change of the inner ICMP
    # connection (5 reported, then 'X'), though its tunnel_parents stays the one VXLAN uid.
    frames = []
    for i in range(8):
        outer_dst = OUT_B if i % 2 == 0 else "192.0.2.3"
        frames.append(bytes(_eth() / IP(src=OUT_A, dst=outer_dst)
                            / IP(src="198.51.100.1", dst="198.51.100.2")
                            / UDP(sport=38071, dport=4789) / VXLAN(vni=1) / _eth()
                            / _inner_echo(i)))
    rows = _run(frames)
    vxlan = _row(rows, "198.51.100.1", "198.51.100.2")
    inner = _row(rows, IN_A, IN_B)
    assert vxlan["service"] == "vxlan" and vxlan["orig_pkts"] == 8
    assert len(vxlan["tunnel_parents"]) == 2          # both IP tunnels (innermost for it)
    assert inner["tunnel_parents"] == {vxlan["uid"]}
    assert inner["history"] == "X" and inner["orig_pkts"] == 8
    # The same 8 packets through one outer pair: no change at all.
    steady = [bytes(_eth() / IP(src=OUT_A, dst=OUT_B) / IP(src="198.51.100.1",
                                                         dst="198.51.100.2")
                    / UDP(sport=38071, dport=4789) / VXLAN(vni=1) / _eth() / _inner_echo(i))
              for i in range(8)]
    rows = _run(steady)
    assert _row(rows, IN_A, IN_B)["history"] is None


def test_gre_carrying_mpls_allocates_the_tunnel_uid_and_makes_no_row() -> None:
    # Zeek (reference commit; zeek/zeek#5829): GRE type 0x8847 has no analyzer of its own,
    # so IPTunnel takes it: the IP pair gets its tunnel uid, the label stack is handed on as
    # raw IP and fails (unknown IP version). No row; that uid stays the pair's, so a later
    # plain GRE packet of the pair (either direction) names it.
    from scapy.contrib.mpls import MPLS

    mpls = bytes(_eth() / IP(src=OUT_A, dst=OUT_B) / GRE(proto=0x8847)
                 / MPLS(label=100, s=1, ttl=64) / _inner_udp())
    gre_ip = bytes(_eth() / IP(src=OUT_B, dst=OUT_A) / GRE(proto=0x0800) / _inner_udp())
    rows: list[tuple] = []
    tracker = ConnTracker(EngineSettings(), sink=lambda _c, r: rows.append(r))
    tracker.process(decode(mpls, LINKTYPE_ETHERNET, T0, len(mpls)))
    assert tracker.stats.connections == 0
    ((tunnel_uid, *_rest),) = tracker.tunnels.ip_tunnels.values()
    tracker.process(decode(gre_ip, LINKTYPE_ETHERNET, T0 + 1, len(gre_ip)))
    tracker.finish()
    (row,) = [dict(zip(NAMES, r, strict=True)) for r in rows]
    assert row["id.orig_h"] == IN_A and row["tunnel_parents"] == {tunnel_uid}
    assert _run([mpls, mpls]) == []


# ---- 802.11 A-MSDU at the link layer (IEEE802_11Analyzer: every subframe) ----------------

def _amsdu_frame(subframe_llc: list[bytes]) -> bytes:
    """A QoS data frame (to DS) whose A-MSDU holds these LLC payloads, padded by Zeek's rule
    (`len % 4` bytes after every subframe but the last)."""
    from scapy.layers.dot11 import Dot11, Dot11QoS
    body = b""
    for i, llc in enumerate(subframe_llc):
        body += b"\x02" * 12 + struct.pack("!H", len(llc)) + llc
        if i < len(subframe_llc) - 1:
            body += b"\x00" * (len(llc) % 4)
    return bytes(Dot11(type=2, subtype=8, FCfield=0x01) / Dot11QoS(A_MSDU_Present=1)) + body


def _llc_ip(payload: bytes, sport: int = 40000) -> bytes:
    ip = bytes(IP(src=IN_A, dst=IN_B) / UDP(sport=sport, dport=40001) / Raw(payload))
    return b"\xaa\xaa\x03\x00\x00\x00\x08\x00" + ip


def _run_link(frames: list[bytes], linktype: int) -> tuple[list[dict], ConnTracker]:
    rows: list[tuple] = []
    tracker = ConnTracker(EngineSettings(), sink=lambda _c, r: rows.append(r))
    for i, frame in enumerate(frames):
        pkt = decode(frame, linktype, T0 + i, len(frame))
        assert pkt is not None
        tracker.process(pkt)
    tracker.finish()
    return [dict(zip(NAMES, r, strict=True)) for r in rows], tracker


def test_link_layer_80211_amsdu_gives_every_subframe() -> None:
    from scapy.layers.dot11 import RadioTap
    frame = _amsdu_frame([_llc_ip(b"a" * 9), _llc_ip(b"b" * 10), _llc_ip(b"c" * 11, 40002)])
    for linktype, data in ((105, frame), (127, bytes(RadioTap()) + frame)):
        rows, tracker = _run_link([data], linktype)
        first = _row([r for r in rows if r["id.orig_p"] == 40000], IN_A, IN_B)
        other = _row([r for r in rows if r["id.orig_p"] == 40002], IN_A, IN_B)
        assert first["orig_pkts"] == 2 and first["orig_ip_bytes"] == (28 + 9) + (28 + 10)
        assert other["orig_pkts"] == 1
        assert first["tunnel_parents"] is None            # a link layer, not a tunnel
        assert tracker.stats.packets == 3                  # three IP packets, one frame


def test_link_layer_80211_amsdu_walk_stops_at_a_bad_subframe() -> None:
    # Zeek stops at the first subframe its IP analyzer refuses (here an unknown IP version)
    # and at a truncated one; what came before is analysed.
    bad = b"\xaa\xaa\x03\x00\x00\x00\x08\x00" + b"\x70" + b"\x00" * 27
    rows, _t = _run_link([_amsdu_frame([_llc_ip(b"a" * 9), bad, _llc_ip(b"c" * 11)])], 105)
    assert len(rows) == 1 and rows[0]["orig_pkts"] == 1
    cut = _amsdu_frame([_llc_ip(b"a" * 9), _llc_ip(b"b" * 10), _llc_ip(b"c" * 11)])[:-3]
    rows, _t = _run_link([cut], 105)
    assert len(rows) == 1 and rows[0]["orig_pkts"] == 2
