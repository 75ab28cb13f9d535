"""Hand-built packet sequences for the connection-engine tests (owned by E2).

Packets are made with scapy, turned into bytes and decoded by the real decoder, then fed to a
real `ConnTracker`. The TCP notation follows zeek-conn.md §10: hosts C = 10.0.0.1:40000 and
S = 10.0.0.2:80, ISN(C) = 1000, ISN(S) = 5000, packets 0.1 s apart; a step is
`(who, code, options)` with code S, SA, A, D<n>, FA, F, RA, R, FRA, SF, SR, ... and sequence
and ack numbers following naturally unless given.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

from scapy.layers.inet import ICMP, IP, TCP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402
from scapy.packet import Raw  # noqa: E402
from shuntd.conn.record import CONN_FIELDS  # noqa: E402
from shuntd.conn.settings import EngineSettings  # noqa: E402
from shuntd.conn.tracker import ConnTracker  # noqa: E402
from shuntd.packet import LINKTYPE_RAW, Packet, decode  # noqa: E402

C_ADDR = "10.0.0.1"
S_ADDR = "10.0.0.2"
FIELD_NAMES = [name for name, _type in CONN_FIELDS]
T0 = 1_000_000.0

_FLAG_LETTERS = {"S": "S", "A": "A", "F": "F", "R": "R", "P": "P"}


def decode_ip(raw: bytes, ts: float, ignore_checksums: bool = False) -> Packet:
    pkt = decode(raw, LINKTYPE_RAW, ts, len(raw), ignore_checksums)
    assert pkt is not None, "decoder refused a hand-built packet"
    return pkt


def ip_layer(src: str, dst: str):
    return IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)


def tcp_packet(src: str, sport: int, dst: str, dport: int, flags: str, seq: int, ack: int,
               payload: bytes = b"", ts: float = T0, window: int = 8192,
               bad_checksum: bool = False, ignore_checksums: bool = False) -> Packet:
    tcp = TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=window)
    if bad_checksum:
        tcp.chksum = 0xDEAD
    layer = ip_layer(src, dst) / tcp
    if payload:
        layer = layer / Raw(payload)
    return decode_ip(bytes(layer), ts, ignore_checksums)


def udp_packet(src: str, sport: int, dst: str, dport: int, payload: bytes, ts: float,
               bad_checksum: bool = False) -> Packet:
    udp = UDP(sport=sport, dport=dport)
    if bad_checksum:
        udp.chksum = 0xDEAD
    return decode_ip(bytes(ip_layer(src, dst) / udp / Raw(payload)), ts)


def icmp_packet(src: str, dst: str, icmp_type: int, code: int, payload: bytes, ts: float,
                bad_checksum: bool = False) -> Packet:
    icmp = ICMP(type=icmp_type, code=code)
    if bad_checksum:
        icmp.chksum = 0xDEAD
    return decode_ip(bytes(IP(src=src, dst=dst) / icmp / Raw(payload)), ts)


def raw_ip_packet(src: str, dst: str, proto: int, payload: bytes, ts: float) -> Packet:
    return decode_ip(bytes(IP(src=src, dst=dst, proto=proto) / Raw(payload)), ts)


@dataclass
class TcpScript:
    """Builds a TCP exchange between C and S with natural sequence numbers."""

    c: tuple[str, int] = (C_ADDR, 40000)
    s: tuple[str, int] = (S_ADDR, 80)
    isn_c: int = 1000
    isn_s: int = 5000
    t: float = T0
    gap: float = 0.1
    packets: list[Packet] = field(default_factory=list)
    nxt: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.nxt = {"C": self.isn_c, "S": self.isn_s}
        self._first = True

    def send(self, who: str, code: str, seq: int | None = None, ack: int | None = None,
             at: float | None = None, window: int = 8192, bad_checksum: bool = False,
             data: bytes | None = None) -> TcpScript:
        """One packet: code is flags letters plus optional D<n> for n payload bytes."""
        flags = ""
        n = 0
        rest = code
        if "D" in rest:
            head, _, num = rest.partition("D")
            rest = head
            n = int(num)
            flags += "A"
        for ch in rest:
            flags += _FLAG_LETTERS[ch]
        if data is None:
            data = bytes((i * 7 + 1) & 0xFF for i in range(n))
        else:
            n = len(data)
        peer = "S" if who == "C" else "C"
        if seq is None:
            seq = self.nxt[who]
        if ack is None:
            ack = self.nxt[peer] if "A" in flags else 0
        if at is not None:
            self.t = T0 + at
        elif not self._first:
            self.t += self.gap
        self._first = False
        src, sport = self.c if who == "C" else self.s
        dst, dport = self.s if who == "C" else self.c
        self.packets.append(tcp_packet(src, sport, dst, dport, flags, seq & 0xFFFFFFFF,
                                       ack & 0xFFFFFFFF, data, self.t, window, bad_checksum))
        if not bad_checksum and "R" not in flags:
            end = seq + n + ("S" in flags) + ("F" in flags)
            if ((end - self.nxt[who]) & 0xFFFFFFFF) < 0x80000000:
                self.nxt[who] = end & 0xFFFFFFFF
        return self

    def steps(self, text: str) -> TcpScript:
        """'C S; S SA; C A; C D100' -> packets."""
        for step in filter(None, (s.strip() for s in text.split(";"))):
            who, code = step.split()
            self.send(who, code)
        return self


def run_packets(packets: list[Packet], settings: EngineSettings | None = None,
                hooks=None) -> list[dict]:
    """Feed packets to a fresh tracker, terminate it, return conn.log rows as dicts."""
    rows: list[tuple] = []
    tracker = ConnTracker(settings or EngineSettings(), hooks=hooks,
                          sink=lambda _c, row: rows.append(row))
    for pkt in packets:
        tracker.process(pkt)
    tracker.finish()
    return [dict(zip(FIELD_NAMES, r, strict=True)) for r in rows]


def summary(row: dict) -> str:
    """'STATE history orig_bytes/resp_bytes orig_pkts(orig_ip)/resp_pkts(resp_ip)'."""
    def v(x: object) -> str:
        return "-" if x is None else str(x)
    return (f"{row['conn_state']} {row['history'] or '-'} "
            f"{v(row['orig_bytes'])}/{v(row['resp_bytes'])} "
            f"{row['orig_pkts']}({row['orig_ip_bytes']})/{row['resp_pkts']}({row['resp_ip_bytes']})")
