"""Contents extraction (spec zeek-conn.md §7 "Contents extraction")."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from conn_packets import TcpScript, run_packets
from shuntd.conn.contents import ContentsExtractor, ContentsSettings, contents_file_name
from shuntd.events import EventDispatcher

ORIG_NAME = "contents_10.0.0.1:40000-10.0.0.2:80_orig.dat"
RESP_NAME = "contents_10.0.0.1:40000-10.0.0.2:80_resp.dat"


def _session_with_hole() -> list:
    """Client sends 10 bytes 'a', skips 5 bytes (never seen, later acknowledged by the server),
    then 10 bytes 'b'; the server sends 'hello'."""
    s = TcpScript()
    s.steps("C S; S SA; C A")
    s.send("C", "A", data=b"a" * 10)                   # seq 1001..1010
    s.send("C", "A", seq=1016, data=b"b" * 10)         # 1011..1015 missing
    s.send("S", "A", ack=1026, data=b"hello")
    s.steps("C FA; S FA")
    s.send("C", "A")
    return s.packets


def test_files_named_like_zeek_with_stream_and_gap_marker(tmp_path: Path) -> None:
    extractor = ContentsExtractor(ContentsSettings(directory=str(tmp_path), default_extract=True))
    rows = run_packets(_session_with_hole(), hooks=EventDispatcher(contents=extractor))
    assert rows[0]["missed_bytes"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [ORIG_NAME, RESP_NAME]
    assert (tmp_path / ORIG_NAME).read_bytes() == b"a" * 10 + b"\n<<gap 5>>\n" + b"b" * 10
    assert (tmp_path / RESP_NAME).read_bytes() == b"hello"


def test_nothing_extracted_by_default(tmp_path: Path) -> None:
    extractor = ContentsExtractor(ContentsSettings(directory=str(tmp_path)))
    run_packets(_session_with_hole(), hooks=EventDispatcher(contents=extractor))
    assert list(tmp_path.iterdir()) == []


def test_policy_can_extract_one_direction(tmp_path: Path) -> None:
    extractor = ContentsExtractor(ContentsSettings(directory=str(tmp_path), prefix="x"))
    d = EventDispatcher(contents=extractor)
    d.add_handler("connection_established",
                  lambda c: d.extract_contents(c, orig=False, resp=True))
    run_packets(_session_with_hole(), hooks=d)
    assert [p.name for p in tmp_path.iterdir()] == ["x" + RESP_NAME[len("contents"):]]


def test_only_established_connections_are_extracted(tmp_path: Path) -> None:
    extractor = ContentsExtractor(ContentsSettings(directory=str(tmp_path), default_extract=True))
    s = TcpScript()
    s.send("C", "A", data=b"midstream data")          # no handshake: no connection_established
    run_packets(s.packets, hooks=EventDispatcher(contents=extractor))
    assert list(tmp_path.iterdir()) == []


def test_ipv6_names_in_brackets() -> None:
    a = ipaddress.ip_address("2001:db8::1").packed
    b = ipaddress.ip_address("2001:db8::2").packed
    assert contents_file_name("contents", a, 5000, b, 443, False) == \
        "contents_[2001:db8::1]:5000-[2001:db8::2]:443_resp.dat"
