"""conn_long.log (spec zeek-conn.md §9, corelight/zeek-long-connections semantics).

A synthetic 19-hour TCP session, one 10-byte data packet from the client every 20 minutes,
`tcp_inactivity_timeout` 3600 s. Expected rows by hand from §9: the poll due at 600 s runs at
the packet of 1200 s, before that packet is processed (duration then 1 s: skipped); the next
poll, 1799 s later, runs at 3600 s (duration 2400 >= 1800: row); then at 4800 s (3600 >= 3600:
row); then 39600 s later at 44400 s (43200 >= 43200: row); the 24 h poll finds the trace over
(termination: duration 68401.5 < 86400: no row).
"""

from __future__ import annotations

from pathlib import Path

from conn_packets import FIELD_NAMES, TcpScript, run_packets
from shuntd.conn.long import LongConnSettings, parse_durations
from shuntd.conn.record import CONN_FIELDS
from shuntd.conn.settings import EngineSettings
from shuntd.events import EventDispatcher
from shuntd.logs.zeek import LogSchema, open_log


def _nineteen_hours() -> list:
    s = TcpScript()
    s.send("C", "S", at=0.0).send("S", "SA", at=0.5).send("C", "A", at=1.0)
    for k in range(1, 58):                       # 1200 s .. 68400 s (19 h)
        s.send("C", "D10", at=1200.0 * k)
    s.send("C", "FA", at=68401.0).send("S", "FA", at=68401.5).send("C", "A", at=68402.0)
    return s.packets


def _read_tsv(path: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    meta: dict[str, str] = {}
    fields: list[str] = []
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition("\t")
            meta[key] = value
            if key == "fields":
                fields = value.split("\t")
            continue
        rows.append(dict(zip(fields, line.split("\t"), strict=True)))
    return meta, rows


def test_nineteen_hour_session_rows_at_default_thresholds(tmp_path: Path) -> None:
    writer = open_log(str(tmp_path), LogSchema("conn_long", CONN_FIELDS))
    found: list[str] = []
    d = EventDispatcher(long_connections=LongConnSettings(), write_long_row=writer.write)
    d.add_handler("long_conn_found", lambda c: found.append(c.uid))
    try:
        rows = run_packets(_nineteen_hours(), EngineSettings(tcp_inactivity_timeout=3600.0),
                           hooks=d)
    finally:
        writer.close()
    # conn.log: the one connection, written normally at the end.
    assert len(rows) == 1
    assert rows[0]["conn_state"] == "SF" and rows[0]["duration"] == 68401.5

    meta, long_rows = _read_tsv(tmp_path / "conn_long.log")
    assert meta["path"] == "conn_long"
    assert meta["fields"].split("\t") == FIELD_NAMES
    got = [(r["duration"], r["conn_state"], r["history"], r["orig_bytes"], r["resp_bytes"],
            r["orig_pkts"], r["resp_pkts"]) for r in long_rows]
    assert got == [
        ("2400.000000", "S1", "ShAD", "20", "0", "4", "1"),
        ("3600.000000", "S1", "ShAD", "30", "0", "5", "1"),
        ("43200.000000", "S1", "ShAD", "360", "0", "38", "1"),
    ]
    assert {r["uid"] for r in long_rows} == {rows[0]["uid"]}
    assert len(found) == 3


def test_repeat_last_duration(tmp_path: Path) -> None:
    # packets every 100 s up to 2000 s; durations [600] repeated: polls at 600 (duration 500:
    # skipped), 1200 (1100: row), 1800 (1700: row), then at termination (2000: row).
    s = TcpScript()
    s.send("C", "S", at=0.0).send("S", "SA", at=0.0).send("C", "A", at=0.0)
    for k in range(1, 21):
        s.send("C", "D1", at=100.0 * k)
    written: list[tuple] = []
    d = EventDispatcher(long_connections=LongConnSettings(durations=(600.0,),
                                                          repeat_last_duration=True),
                        write_long_row=written.append)
    run_packets(s.packets, EngineSettings(tcp_inactivity_timeout=3600.0), hooks=d)
    durations = [row[FIELD_NAMES.index("duration")] for row in written]
    assert durations == [1100.0, 1700.0, 2000.0]


def test_special_cases_by_subnet() -> None:
    s = TcpScript()
    s.send("C", "S", at=0.0).send("S", "SA", at=0.0).send("C", "A", at=0.0)
    for k in range(1, 6):
        s.send("C", "D1", at=100.0 * k)
    written: list[tuple] = []
    settings = LongConnSettings(special_cases={"10.0.0.0/8": (150.0,)})
    d = EventDispatcher(long_connections=settings, write_long_row=written.append)
    run_packets(s.packets, EngineSettings(), hooks=d)
    # poll due 150 runs at 200 (duration 100 < 150: skipped); no more thresholds.
    assert written == []


def test_parse_durations() -> None:
    assert parse_durations("10min,30min,1h,12h,24h,3d") == (600.0, 1800.0, 3600.0, 43200.0,
                                                             86400.0, 259200.0)
    assert parse_durations("90, 120s") == (90.0, 120.0)
    for bad in ("", "5x", "1h,10min", "-5"):
        try:
            parse_durations(bad)
        except ValueError as exc:
            assert str(exc)
        else:
            raise AssertionError(f"{bad!r} accepted")


def test_cli_writes_conn_long_for_nineteen_hour_trace(tmp_path: Path) -> None:
    """`shuntd -r trace --tcp-inactivity-timeout 3600` writes the same three conn_long rows."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw
    from scapy.utils import wrpcap
    from shuntd.cli import main

    c, s = ("10.0.0.1", 40000), ("10.0.0.2", 80)
    frames = []

    def add(t: float, src, dst, flags: str, seq: int, ack: int, data: bytes = b"") -> None:
        pkt = Ether() / IP(src=src[0], dst=dst[0]) / TCP(sport=src[1], dport=dst[1],
                                                         flags=flags, seq=seq, ack=ack)
        if data:
            pkt = pkt / Raw(data)
        pkt.time = 1_000_000 + t
        frames.append(pkt)

    add(0.0, c, s, "S", 1000, 0)
    add(0.5, s, c, "SA", 5000, 1001)
    add(1.0, c, s, "A", 1001, 5001)
    for k in range(1, 58):
        add(1200.0 * k, c, s, "A", 1001 + 10 * (k - 1), 5001, b"x" * 10)
    add(68401.0, c, s, "FA", 1571, 5001)
    add(68401.5, s, c, "FA", 5001, 1572)
    add(68402.0, c, s, "A", 1572, 5002)
    trace = tmp_path / "long.pcap"
    wrpcap(str(trace), frames)
    out = tmp_path / "logs"
    assert main(["-r", str(trace), "--log-dir", str(out),
                 "--tcp-inactivity-timeout", "3600"]) == 0
    _meta, long_rows = _read_tsv(out / "conn_long.log")
    assert [(r["duration"], r["conn_state"]) for r in long_rows] == [
        ("2400.000000", "S1"), ("3600.000000", "S1"), ("43200.000000", "S1")]
    _meta, conn_rows = _read_tsv(out / "conn.log")
    assert [(r["duration"], r["conn_state"]) for r in conn_rows] == [("68401.500000", "SF")]
