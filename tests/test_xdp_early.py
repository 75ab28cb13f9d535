"""Early shunts (bpf/shuntd.h "Early shunts"): the XDP program follows TLS handshakes itself and
starts dropping right after the packet on which Zeek's analyser raises ssl_established.

Frames come from real TLS sessions made in memory (ssl.MemoryBIO, OpenSSL; certificate made
with the `openssl` CLI at test time), cut into TCP segments of a given MSS and run through the
real program with BPF_PROG_TEST_RUN. The expected firing frame comes from the project's
connection engine (ConnTracker + EventDispatcher, i.e. conn/protocols/tls.py) fed the same
frames: the frame during which it raises ssl_established. Never from the BPF logic.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

pytestmark = pytest.mark.root

if os.geteuid() != 0:
    pytest.skip("needs root (BPF)", allow_module_level=True)
bcc = pytest.importorskip("bcc")
if shutil.which("openssl") is None:
    pytest.skip("needs the openssl CLI (test certificate)", allow_module_level=True)

from scapy.layers.inet import IP, TCP  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402
from scapy.layers.l2 import Dot1Q, Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402
from shuntd.datapath.program import (  # noqa: E402
    F_EARLY,
    XDP_DROP,
    XDP_PASS,
    EventType,
    StatIndex,
    XdpProgram,
)
from tls_sessions import KINDS, contexts, engine_reference, flights, make_cert  # noqa: E402

S = StatIndex
C_ADDR, S_ADDR = "10.0.0.1", "10.0.0.2"   # the client is side 1 (smaller address)
C_ADDR6, S_ADDR6 = "2001:db8::1", "2001:db8::2"
C_PORT, S_PORT = 40000, 443
ISN = (1000, 900000)                      # client, server
M32 = 0xFFFFFFFF
TRIGGER = 7
FLOWS_MAX = 64
MACS = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}


# ---------------------------------------------------------------------------------------------
# TLS sessions in memory


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[int, bytes]]]:
    """Each kind, full and resumed: {"tls1.2 full": flights, ...}; and "tls1.3 bigcert" (a
    7 KB certificate)."""
    d = make_cert(tmp_path_factory.mktemp("tlscert"))
    big = make_cert(tmp_path_factory.mktemp("tlsbigcert"), names=200)
    out = {"tls1.3 bigcert": flights(*contexts(big))[0]}
    for name, kw in KINDS.items():
        cc, sc = contexts(d, **kw)
        fl, sess, ver = flights(cc, sc)
        assert ver == ("TLSv1.2" if name == "tls1.2" else "TLSv1.3")
        out[name + " full"] = fl
        out[name + " resumed"] = flights(cc, sc, session=sess)[0]
    return out


# ---------------------------------------------------------------------------------------------
# TCP segments and frames


@dataclass
class Seg:
    """One TCP segment of the session: direction (0 client), flags, seq, ack, payload."""

    d: int
    flags: str
    seq: int
    ack: int
    payload: bytes = b""
    v6: bool = False
    vlan: int = 0

    def frame(self) -> bytes:
        c, s = (C_ADDR6, S_ADDR6) if self.v6 else (C_ADDR, S_ADDR)
        src, sport, dst, dport = (c, C_PORT, s, S_PORT) if self.d == 0 else (s, S_PORT, c, C_PORT)
        pkt = Ether(**MACS)
        if self.vlan:
            pkt = pkt / Dot1Q(vlan=self.vlan)
        pkt = (pkt / (IPv6(src=src, dst=dst) if self.v6 else IP(src=src, dst=dst))
               / TCP(sport=sport, dport=dport, flags=self.flags, seq=self.seq & M32,
                     ack=self.ack & M32))
        return bytes(pkt / Raw(self.payload) if self.payload else pkt)


def segments(fl: list[tuple[int, bytes]], mss: int, v6: bool = False,
             vlan: int = 0, isn: tuple[int, int] = ISN) -> list[Seg]:
    """Three-way handshake, then every flight cut at `mss`, each segment acking all the peer
    sent so far (sequence numbers 64-bit here, mod 2^32 in the frames)."""
    nxt = [isn[0] + 1, isn[1] + 1]
    out = [Seg(0, "S", isn[0], 0), Seg(1, "SA", isn[1], nxt[0]), Seg(0, "A", nxt[0], nxt[1])]
    for d, data in fl:
        for o in range(0, len(data), mss):
            chunk = data[o:o + mss]
            out.append(Seg(d, "PA", nxt[d], nxt[1 - d], chunk))
            nxt[d] += len(chunk)
    for seg in out:
        seg.v6, seg.vlan = v6, vlan
    return out


def established_at(segs: list[Seg]) -> int | None:
    """Index of the segment during which the connection engine raises ssl_established."""
    return engine_reference([s.frame() for s in segs])[0]


def sides_at(segs: list[Seg]) -> list[tuple[int, int]]:
    """(next seq, highest ack) of client and server over the payload segments in `segs`
    (what the new entry's tcp[] must start from; the client is side 1)."""
    nxt = [segs[0].seq + 1, segs[1].seq + 1]
    ack = [0, 0]
    for s in segs:
        if s.payload:
            nxt[s.d] = max(nxt[s.d], s.seq + len(s.payload))   # 64-bit: no wrap here
            ack[s.d] = max(ack[s.d], s.ack)
    return [(nxt[0] & M32, ack[0] & M32), (nxt[1] & M32, ack[1] & M32)]


# ---------------------------------------------------------------------------------------------
# the program


@dataclass
class Lab:
    prog: XdpProgram
    events: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.prog.events.open_ring_buffer(self._on_event)
        self.watch = self.prog.bpf[b"tls_watch"]

    def _on_event(self, _ctx: Any, data: Any, _size: int) -> None:
        self.events.append(self.prog.parse_event(data))

    def drain(self) -> list[Any]:
        self.prog.bpf.ring_buffer_consume()
        out, self.events = self.events, []
        return out

    def early(self, port: int = S_PORT, lease_s: float = 60.0, until_s: float = 60.0) -> None:
        now = self.prog.map_now_ns()
        self.prog.set_early(port, TRIGGER, int(lease_s * 1e9), now + int(until_s * 1e9))

    def run(self, frame: bytes, frags: bool = False) -> int:
        return self.prog.test_run(frame, frags=frags).retval

    def run_all(self, segs: list[Seg], frags: bool = False) -> list[int]:
        return [self.run(s.frame(), frags) for s in segs]

    def key(self, v6: bool = False, vlan: int = 0) -> Any:
        c, s = (C_ADDR6, S_ADDR6) if v6 else (C_ADDR, S_ADDR)
        return self.prog.flow_key(c, C_PORT, s, S_PORT, 6, vlan=vlan)[0]

    def reset(self) -> None:
        self.prog.flows.clear()
        self.watch.clear()
        self.prog.set_early(0)
        self.drain()


@pytest.fixture(scope="module")
def lab_module() -> Iterator[Lab]:
    # one-page ring: the full-ring test fills it with 43 events
    prog = XdpProgram.compile(flows_max=FLOWS_MAX, pairs_max=64, ring_pages=1)
    try:
        yield Lab(prog)
    finally:
        prog.close()


@pytest.fixture
def lab(lab_module: Lab) -> Iterator[Lab]:
    lab_module.reset()
    lab_module.early()
    yield lab_module
    lab_module.reset()


def delta(lab: Lab, before: dict[Any, int]) -> dict[Any, int]:
    after = lab.prog.stats()
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def check_fires_at(lab: Lab, segs: list[Seg], fire: int, frags: bool = False) -> None:
    """Frames up to and incl. `fire` pass, the entry XDP made holds the state of the passed
    ones, the rest drop and count in it; one EARLY event."""
    key = lab.key(segs[0].v6, segs[0].vlan)
    before = lab.prog.stats()
    verdicts = lab.run_all(segs[:fire + 1], frags)
    assert verdicts == [XDP_PASS] * (fire + 1)
    v = lab.prog.flows[key]
    assert v.flags == F_EARLY and v.trigger == TRIGGER and v.event_seq == 1
    assert (v.pkts1, v.pkts2, v.last_seen_ns) == (0, 0, 0)
    assert v.lease_expiry_ns > lab.prog.map_now_ns() + 50 * 10**9
    (n1, a1), (n2, a2) = sides_at(segs[:fire + 1])
    assert [(t.next, t.ack) for t in v.tcp] == [(n1, a1), (n2, a2)]
    assert [(t.next_wraps, t.ack_wraps) for t in v.tcp] == [(0, 0), (0, 0)]
    ev = lab.drain()
    assert len(ev) == 1
    e = ev[0]
    last = segs[fire]
    assert (e.type, e.entry, e.event_seq, e.side) == (EventType.EARLY, 1, 1, last.d + 1)
    assert (e.seq, e.ack, e.payload_len, e.tcp_flags) == (last.seq & M32, last.ack & M32,
                                                          len(last.payload), 0x18)
    assert bytes(e.key) == bytes(key)
    rest = segs[fire + 1:]
    assert lab.run_all(rest, frags) == [XDP_DROP] * len(rest)
    v = lab.prog.flows[key]
    assert (v.pkts1, v.pkts2) == (sum(s.d == 0 for s in rest), sum(s.d == 1 for s in rest))
    d = delta(lab, before)
    assert d[S.EARLY_ARMED] == 1 and d[S.EARLY_FIRED] == 1
    assert S.EARLY_GAVE_UP not in d and S.EARLY_FULL not in d
    assert len(lab.watch) == 0


def check_gives_up(lab: Lab, segs: list[Seg], armed: int = 1, gave_up: int = 1) -> None:
    before = lab.prog.stats()
    assert lab.run_all(segs) == [XDP_PASS] * len(segs)
    with pytest.raises(KeyError):
        lab.prog.flows[lab.key()]
    assert lab.drain() == []
    d = delta(lab, before)
    assert d.get(S.EARLY_ARMED, 0) == armed and d.get(S.EARLY_GAVE_UP, 0) == gave_up
    assert S.EARLY_FIRED not in d
    assert len(lab.watch) == 0


# ---------------------------------------------------------------------------------------------
# fires on the analyser's packet


CASES = [k + " " + m for k in KINDS for m in ("full", "resumed")]


@pytest.mark.parametrize("mss", [1448, 536, 100])
@pytest.mark.parametrize("case", CASES)
def test_fires_on_the_ssl_established_packet(lab: Lab, sessions: dict, case: str,
                                             mss: int) -> None:
    segs = segments(sessions[case], mss)
    est = established_at(segs)
    assert est is not None
    if case.startswith("tls1.2") and mss == 100:
        # the 1.2 flights cut record headers at 100 bytes: XDP leaves them to the daemon
        check_gives_up(lab, segs)
        return
    check_fires_at(lab, segs, est)
    if "hrr-compat" in case:
        # HRR + compat: S:22,20 then C:20,22 (second ClientHello) looks like "both sides sent
        # CCS" to a version-blind rule; the fire is at least one client flight later
        ch2 = next(i for i, s in enumerate(segs) if s.d == 0 and s.payload[:1] == b"\x14")
        assert est > ch2


@pytest.mark.parametrize("v6,vlan,frags", [(True, 0, False), (False, 42, False),
                                            (True, 7, True)], ids=["v6", "vlan", "v6-vlan-frags"])
@pytest.mark.parametrize("case", ["tls1.2 full", "tls1.3-compat full"])
def test_fires_over_ipv6_vlan_and_multibuffer_load(lab: Lab, sessions: dict, case: str,
                                                   v6: bool, vlan: int, frags: bool) -> None:
    # frags: the copy loaded with BPF_F_XDP_HAS_FRAGS (what native attach uses at jumbo MTU)
    segs = segments(sessions[case], 536, v6=v6, vlan=vlan)
    est = established_at(segs)
    assert est is not None
    check_fires_at(lab, segs, est, frags)


def test_records_in_the_fragments_of_a_multibuffer_frame(lab: Lab, sessions: dict) -> None:
    # One 7 KB server flight (SH, CCS, EE, Cert, CV, Fin) in one frame: the test run puts what
    # does not fit a page into fragments, so the CertificateVerify and Finished headers are
    # read from fragments. The walk must still reach the analyser's packet.
    segs = segments(sessions["tls1.3 bigcert"], 9000)
    server_flight = next(s for s in segs if s.d == 1 and s.payload)
    assert len(server_flight.frame()) > 6000
    est = established_at(segs)
    assert est is not None
    check_fires_at(lab, segs, est, frags=True)


def test_retransmitted_handshake_packet_still_fires_on_time(lab: Lab, sessions: dict) -> None:
    segs = segments(sessions["tls1.3-compat full"], 536)
    est = established_at(segs)
    assert est is not None
    server_first = next(i for i, s in enumerate(segs) if s.d == 1 and s.payload)
    segs = segs[:server_first + 2] + [segs[server_first]] + segs[server_first + 2:]
    est2 = established_at(segs)
    assert est2 == est + 1
    check_fires_at(lab, segs, est2)


def test_tls12_over_ipv4_pair_filter_path_still_fires(lab: Lab, sessions: dict) -> None:
    # with IP pairs active (another pair shunted) the flow still takes the early path
    k, _ = lab.prog.pair_key("192.0.2.1", "192.0.2.2")
    lab.prog.ip_pairs[k] = lab.prog.new_value(lab.prog.map_now_ns() + 10**10)
    lab.prog.pair_added(k)
    try:
        segs = segments(sessions["tls1.2 full"], 1448)
        est = established_at(segs)
        assert est is not None
        check_fires_at(lab, segs, est)
    finally:
        del lab.prog.ip_pairs[k]
        lab.prog.pair_removed(k)


@pytest.mark.parametrize("case", ["tls1.2 full", "tls1.3-compat full"])
def test_fires_on_time_across_sequence_number_wrap(lab: Lab, sessions: dict, case: str) -> None:
    # Both sides' handshake bytes cross 2^32 (the client's within its ClientHello, the
    # server's within its first flight): record positions and next seq wrap with them.
    segs = segments(sessions[case], 536, isn=(2**32 - 200, 2**32 - 1000))
    assert segs[3].seq < 2**32 < segs[3].seq + len(segs[3].payload)
    est = established_at(segs)
    assert est is not None
    check_fires_at(lab, segs, est)


# ---------------------------------------------------------------------------------------------
# gives up (the flow stays on the daemon's path)


def handshake_payload_indices(segs: list[Seg], upto: int) -> list[int]:
    return [i for i in range(3, upto) if segs[i].payload]


def test_swapped_segments_give_up(lab: Lab, sessions: dict) -> None:
    segs = segments(sessions["tls1.2 full"], 536)
    est = established_at(segs)
    assert est is not None
    j = next(i for i in handshake_payload_indices(segs, est)
             if segs[i + 1].d == segs[i].d and segs[i + 1].payload)
    segs[j], segs[j + 1] = segs[j + 1], segs[j]
    check_gives_up(lab, segs)


def test_sequence_gap_gives_up(lab: Lab, sessions: dict) -> None:
    # a server segment lost in the middle of its first flight
    segs = segments(sessions["tls1.3-compat full"], 100)
    est = established_at(segs)
    assert est is not None
    server_first = next(i for i, s in enumerate(segs) if s.d == 1 and s.payload)
    assert segs[server_first + 1].d == segs[server_first + 2].d == 1
    del segs[server_first + 1]
    check_gives_up(lab, segs)


def test_fin_mid_handshake_gives_up(lab: Lab, sessions: dict) -> None:
    segs = segments(sessions["tls1.3-compat full"], 1448)
    est = established_at(segs)
    assert est is not None
    ch = segs[3]
    assert ch.d == 0 and ch.payload[:1] == b"\x16"
    fin = Seg(1, "FA", segs[2].ack, ch.seq + len(ch.payload))
    check_gives_up(lab, segs[:4] + [fin] + segs[4:])


def test_server_first_record_not_a_server_hello_gives_up(lab: Lab, sessions: dict) -> None:
    segs = segments(sessions["tls1.3-compat full"][:1], 1448)
    ch = segs[3]
    reply = Seg(1, "PA", segs[2].ack, ch.seq + len(ch.payload), b"HTTP/1.1 400 Bad\r\n\r\n")
    check_gives_up(lab, segs + [reply])


def test_client_hello_from_the_port_side_arms_nothing(lab: Lab, sessions: dict) -> None:
    # Roles swapped: the side on the watched port (the responder) sends the ClientHello, the
    # originator answers as a TLS server. The analyser never raises ssl_established (it needs
    # the ClientHello from the originator: one that connects TO the port); XDP must not fire.
    segs = segments([(1 - d, data) for d, data in sessions["tls1.3-compat full"]], 1448)
    assert segs[3].d == 1 and segs[3].payload[5] == 1
    assert established_at(segs) is None
    check_gives_up(lab, segs, armed=0, gave_up=0)


def test_http_and_random_bytes_on_the_port_arm_nothing(lab: Lab) -> None:
    nxt = [ISN[0] + 1, ISN[1] + 1]
    segs = [Seg(0, "S", ISN[0], 0), Seg(1, "SA", ISN[1], nxt[0]), Seg(0, "A", nxt[0], nxt[1]),
            Seg(0, "PA", nxt[0], nxt[1], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            Seg(0, "PA", nxt[0] + 27, nxt[1], os.urandom(300).replace(b"\x16", b"\x17")),
            # a TLS record header but a ServerHello, not a ClientHello, from the client
            Seg(0, "PA", nxt[0] + 327, nxt[1], bytes.fromhex("160303002a02") + b"\0" * 41),
            # an SSLv2-framed ClientHello
            Seg(0, "PA", nxt[0] + 374, nxt[1], bytes.fromhex("802e0100020015") + b"\0" * 41)]
    check_gives_up(lab, segs, armed=0, gave_up=0)


def test_zero_rtt_data_before_server_hello_gives_up(lab: Lab, sessions: dict) -> None:
    fl = list(sessions["tls1.3-compat full"])
    assert fl[0][0] == 0
    early_data = bytes.fromhex("1703030020") + b"\xaa" * 32
    # in its own segment after the ClientHello: armed, then left
    check_gives_up(lab, segments(fl[:1] + [(0, early_data)] + fl[1:], 1448))
    lab.reset()
    lab.early()
    # in the ClientHello's segment: armed and left on the same packet
    fl[0] = (0, fl[0][1] + early_data)
    check_gives_up(lab, segments(fl, 1448))


def server_hello(exts: list[tuple[int, bytes]] | None, legacy: int = 0x0303) -> bytes:
    """A handshake record holding a hand-made ServerHello (32-byte session id)."""
    body = legacy.to_bytes(2, "big") + bytes(32) + b"\x20" + bytes(32) + b"\x13\x01\x00"
    if exts is not None:
        e = b"".join(t.to_bytes(2, "big") + len(d).to_bytes(2, "big") + d for t, d in exts)
        body += len(e).to_bytes(2, "big") + e
    hs = b"\x02" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x03" + len(hs).to_bytes(2, "big") + hs


PAD = (0xFFAA, b"\0" * 4)          # an unknown extension
SV13 = (43, b"\x03\x04")           # supported_versions: TLS 1.3


@pytest.mark.parametrize("sh,follows", [
    (server_hello([PAD] * 15 + [SV13]), True),            # 16 extensions: walked
    (server_hello(None), True),                           # no extensions: legacy 1.2
    (server_hello([PAD], legacy=0x0300), True),           # SSL 3.0
    (server_hello([PAD] * 16 + [SV13]), False),           # 17: more than XDP walks
    (server_hello([(43, b"\x03\x05")]), False),           # unknown version
    (server_hello([(43, b"\x7f\x1c")]), False),           # TLS 1.3 draft 28
    (server_hello(None, legacy=0x0200), False),           # SSLv2 number
    (server_hello([(43, b"\x03\x04\x00")]), False),       # supported_versions of 3 bytes
    (server_hello([SV13])[:-3], False),                   # record longer than the packet
    (bytes.fromhex("1503030002022816030300"), False),     # an alert first, not a ServerHello
], ids=["16ext", "noext", "ssl3", "17ext", "v0305", "draft", "sslv2", "sv3bytes",
        "truncated", "alert"])
def test_server_hello_parse(lab: Lab, sessions: dict, sh: bytes, follows: bool) -> None:
    fl = [sessions["tls1.3-compat full"][0], (1, sh)]
    segs = segments(fl, 1448)
    if follows:
        before = lab.prog.stats()
        assert lab.run_all(segs) == [XDP_PASS] * len(segs)
        assert delta(lab, before).get(S.EARLY_ARMED) == 1 and len(lab.watch) == 1
        assert S.EARLY_GAVE_UP not in delta(lab, before)
    else:
        check_gives_up(lab, segs)


def test_early_port_zero_is_off(lab: Lab, sessions: dict) -> None:
    lab.prog.set_early(0, TRIGGER, 60 * 10**9, lab.prog.map_now_ns() + 60 * 10**9)
    check_gives_up(lab, segments(sessions["tls1.3-compat full"], 1448), armed=0, gave_up=0)


def test_other_port_is_not_watched(lab: Lab, sessions: dict) -> None:
    lab.early(port=8443)
    check_gives_up(lab, segments(sessions["tls1.3-compat full"], 1448), armed=0, gave_up=0)


def test_dead_man_switch_lapsed_arms_nothing(lab: Lab, sessions: dict) -> None:
    now = lab.prog.map_now_ns()
    lab.prog.set_early(S_PORT, TRIGGER, 60 * 10**9, now - 1)
    check_gives_up(lab, segments(sessions["tls1.3-compat full"], 1448), armed=0, gave_up=0)


def test_dead_man_switch_lapsing_mid_handshake_gives_up(lab: Lab, sessions: dict) -> None:
    segs = segments(sessions["tls1.3-compat full"], 1448)
    before = lab.prog.stats()
    assert lab.run_all(segs[:4]) == [XDP_PASS] * 4        # up to the ClientHello: armed
    assert len(lab.watch) == 1
    lab.prog.set_early(S_PORT, TRIGGER, 60 * 10**9, lab.prog.map_now_ns() - 1)
    assert lab.run_all(segs[4:]) == [XDP_PASS] * (len(segs) - 4)
    d = delta(lab, before)
    assert (d[S.EARLY_ARMED], d[S.EARLY_GAVE_UP]) == (1, 1) and S.EARLY_FIRED not in d
    assert len(lab.prog.flows) == 0 and lab.drain() == []


def test_stale_watch_gives_up(lab: Lab, sessions: dict) -> None:
    segs = segments(sessions["tls1.3-compat full"], 1448)
    lab.early(lease_s=0.02)
    assert lab.run_all(segs[:4]) == [XDP_PASS] * 4
    assert len(lab.watch) == 1
    time.sleep(0.1)
    before = lab.prog.stats()
    assert lab.run_all(segs[4:]) == [XDP_PASS] * (len(segs) - 4)
    d = delta(lab, before)
    assert d[S.EARLY_GAVE_UP] == 1 and S.EARLY_FIRED not in d
    assert len(lab.prog.flows) == 0


def test_full_flows_map_fails_open(lab: Lab, sessions: dict) -> None:
    keys = (lab.prog.FlowKey * FLOWS_MAX)()
    values = (lab.prog.FlowValue * FLOWS_MAX)()
    for i in range(FLOWS_MAX):
        keys[i], _ = lab.prog.flow_key(f"172.16.0.{i + 1}", 1000, "192.168.0.1", 80, 6)
        values[i].lease_expiry_ns = lab.prog.map_now_ns() + 10**10
    lab.prog.flows.items_update_batch(keys, values)
    assert len(lab.prog.flows) == FLOWS_MAX
    segs = segments(sessions["tls1.3-compat full"], 1448)
    before = lab.prog.stats()
    assert lab.run_all(segs) == [XDP_PASS] * len(segs)
    d = delta(lab, before)
    assert (d[S.EARLY_ARMED], d[S.EARLY_FULL]) == (1, 1)
    assert S.EARLY_FIRED not in d and S.EVENTS not in d
    assert lab.drain() == [] and len(lab.watch) == 0
    with pytest.raises(KeyError):
        lab.prog.flows[lab.key()]


def test_full_ring_fails_open(lab: Lab, sessions: dict) -> None:
    other, _ = lab.prog.flow_key("172.16.0.1", 1000, "192.168.0.1", 80, 6)
    lab.prog.flows[other] = lab.prog.new_value(lab.prog.map_now_ns() + 10**10)
    fin = bytes(Ether(**MACS) / IP(src="172.16.0.1", dst="192.168.0.1")
                / TCP(sport=1000, dport=80, flags="FA"))
    before = lab.prog.stats()
    for _ in range(4096 // 96 + 1):          # 88-byte records + 8-byte headers in one page
        assert lab.run(fin) == XDP_DROP
    assert delta(lab, before)[S.RINGBUF_RESERVE_FAIL] >= 1
    segs = segments(sessions["tls1.3-compat full"], 1448)
    before = lab.prog.stats()
    assert lab.run_all(segs) == [XDP_PASS] * len(segs)
    d = delta(lab, before)
    assert (d[S.EARLY_ARMED], d[S.EARLY_FULL], d[S.RINGBUF_RESERVE_FAIL]) == (1, 1, 1)
    assert S.EARLY_FIRED not in d and len(lab.watch) == 0
    with pytest.raises(KeyError):
        lab.prog.flows[lab.key()]
    assert {e.type for e in lab.drain()} == {EventType.TCP_FIN}


def test_daemon_shunt_first_takes_precedence(lab: Lab, sessions: dict) -> None:
    # the daemon's own entry landed before the handshake completed: its packets just drop
    segs = segments(sessions["tls1.2 full"], 1448)
    est = established_at(segs)
    assert est is not None
    assert lab.run_all(segs[:4]) == [XDP_PASS] * 4
    lab.prog.flows[lab.key()] = lab.prog.new_value(lab.prog.map_now_ns() + 10**10, trigger=3)
    assert lab.run_all(segs[4:]) == [XDP_DROP] * (len(segs) - 4)
    assert lab.prog.flows[lab.key()].flags & F_EARLY == 0
    assert lab.drain() == []


def test_watch_value_layout(lab: Lab) -> None:
    assert ctypes.sizeof(lab.watch.Leaf) == 48 and ctypes.sizeof(lab.watch.Key) == 44
