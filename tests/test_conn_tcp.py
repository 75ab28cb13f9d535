"""TCP rules of zeek-conn.md §10.1-10.5, one test per case, from hand-built packets.

Expected values are the spec's (its table text), never computed by the engine. Summary form:
'STATE history orig_bytes/resp_bytes orig_pkts(orig_ip_bytes)/resp_pkts(resp_ip_bytes)'.
"""

from __future__ import annotations

import dataclasses

import pytest
from conn_packets import TcpScript, run_packets, summary
from shuntd.conn.hooks import EngineHooks
from shuntd.conn.settings import EngineSettings, bare_server_ports

NEUTRAL = {"c": ("10.0.0.1", 6000), "s": ("10.0.0.2", 7000)}
CASE1 = "C S; S SA; C A; C D100; S A; S D200; C A; C FA; S FA; C A"

# (spec case, steps, expected summaries in conn.log order)
SIMPLE_CASES = [
    ("1", CASE1, ["SF ShADadFf 100/200 6(340)/4(360)"]),
    ("2", "C S; S SA; C A; C D100; S A; S D200; S FA; C FA; S A",
     ["SF ShADadfF 100/200 4(260)/5(400)"]),
    ("3", "C S; S SA; C A; C D100; S A", ["S1 ShADa 100/0 3(220)/2(80)"]),
    ("4", "C S; S SA", ["S1 Sh 0/0 1(40)/1(40)"]),
    ("5", "C S; S SA; C A; C FA", ["S2 ShAF 0/0 3(120)/1(40)"]),
    ("6", "C S; S SA; C A; S FA", ["S3 ShAf 0/0 2(80)/2(80)"]),
    ("9", "C S", ["S0 S -/- 1(40)/0(0)"]),
    ("15", "C S; C R", ["RSTOS0 SR 0/0 2(80)/0(0)"]),
    ("16", "C S; S SA; C R", ["RSTO ShR 0/0 2(80)/1(40)"]),
    ("17", "C S; S SA; C A; C D100; S A; C RA", ["RSTO ShADaR 100/0 4(260)/2(80)"]),
    ("18", "C S; S SA; C A; C D100; S RA", ["RSTR ShADr 100/0 3(220)/2(80)"]),
    ("19", "C S; S SA; C RA; S RA", ["REJ ShRr 0/0 2(80)/2(80)"]),
    ("20", "S SA; S R", ["RSTRH ^hr 0/0 0(0)/2(80)"]),
    ("21", "C D100; S R", ["RSTRH Dr 100/0 1(140)/1(40)"]),
    ("22", "S SA; C R", ["RSTO ^hR 0/0 1(40)/1(40)"]),
    ("23", "C S; S SA; C A; C FRA", ["RSTO ShAI 0/0 3(120)/1(40)"]),
    ("24a", "C SF", ["SH Q -/- 1(40)/0(0)"]),
    ("24b", "C SR", ["OTH Q -/- 1(40)/0(0)"]),
    ("26", CASE1 + "; C RA", ["SF ShADadFfR 100/200 7(380)/4(360)"]),
    ("27", "C S; S SA; C A; C D100; S A; S D200; C A; C FA; C RA; S FA",
     ["SF ShADadFRf 100/200 6(340)/4(360)"]),
    ("28", "C S; S SA; C A; C D100; S A; S D200; C A; C FA; C RA",
     ["RSTO ShADadFR 100/200 6(340)/3(320)"]),
    ("29", "C S; C FA", ["SH SF 0/0 2(80)/0(0)"]),
    ("30", "C S; C A; C D100; C FA", ["SH SADF 100/0 4(260)/0(0)"]),
    ("32", "S SA; S FA", ["SHR ^hf 0/0 0(0)/2(80)"]),
    ("33", "C S; S A", ["S0 Sa 0/0 1(40)/1(40)"]),
    ("34", "C S; S D50", ["OTH Sd 0/50 1(40)/1(90)"]),
    ("35", "C D100; S D50; C A", ["OTH DdA 100/50 2(180)/1(90)"]),
    ("36", "S D50; C A", ["OTH ^dA 0/50 1(40)/1(90)"]),
    ("37a", "C D100", ["OTH D -/- 1(140)/0(0)"]),
    ("37b", "S D100", ["OTH ^d -/- 0(0)/1(140)"]),
    ("38a", "C R", ["OTH R -/- 1(40)/0(0)"]),
    ("38b", "S R", ["RSTRH ^r -/- 0(0)/1(40)"]),
    ("39a", "C FA; S A", ["SH Fa 0/0 1(40)/1(40)"]),
    ("39b", "S FA; C A", ["SHR ^fA 0/0 1(40)/1(40)"]),
    ("40", "S SA", ["OTH ^h -/- 0(0)/1(40)"]),
    ("43", "S SA; C A; C D100; S D200; C FA; S A; S FA; C A",
     ["SF ^hADdFaf 100/200 4(260)/4(360)"]),
    ("58", "C S; S SA; C A; C FA", None),  # built below with a retransmitted FIN
]


def _rows(script: TcpScript, settings: EngineSettings | None = None) -> list[dict]:
    return run_packets(script.packets, settings)


@pytest.mark.parametrize(("case", "steps", "expected"),
                         [c for c in SIMPLE_CASES if c[2] is not None],
                         ids=[f"case{c[0]}" for c in SIMPLE_CASES if c[2] is not None])
def test_spec_table_case(case: str, steps: str, expected: list[str]) -> None:
    rows = _rows(TcpScript().steps(steps))
    assert [summary(r) for r in rows] == expected


def test_case1_duration_ends_at_second_fin_and_ids() -> None:
    rows = _rows(TcpScript().steps(CASE1))
    (row,) = rows
    assert row["duration"] == pytest.approx(0.8, abs=1e-6)     # C S @0 .. S FA @0.8
    assert (row["id.orig_h"], row["id.orig_p"], row["id.resp_h"], row["id.resp_p"]) == (
        "10.0.0.1", 40000, "10.0.0.2", 80)
    assert row["proto"] == "tcp" and row["ip_proto"] == 6
    assert row["local_orig"] is True and row["local_resp"] is True
    assert row["missed_bytes"] == 0 and row["tunnel_parents"] is None
    assert row["uid"].startswith("C") and 3 <= len(row["uid"]) <= 18


def test_case2_duration_ends_at_client_fin() -> None:
    (row,) = _rows(TcpScript().steps("C S; S SA; C A; C D100; S A; S D200; S FA; C FA; S A"))
    assert row["duration"] == pytest.approx(0.7, abs=1e-6)


def test_case7_synack_retransmission_adds_no_letter() -> None:
    s = TcpScript().steps("C S; S SA")
    s.send("S", "SA", seq=5000)
    s.send("C", "A")
    assert [summary(r) for r in _rows(s)] == ["S1 ShA 0/0 2(80)/2(80)"]


def test_case8_syn_data_counted_without_d() -> None:
    s = TcpScript()
    s.send("C", "S", data=bytes(50))
    s.send("S", "SA")          # ack 1051
    s.send("C", "A")
    # Spec §10 #8 ([D], hand-derived) says `ShA`; Zeek's source disagrees and wins:
    # init_endpoint sets last_seq = seq + 51 for the SYN, so update_last_seq sees delta 0 with
    # 50 payload bytes and calls DidRxmit -> `T` right after `S` (TCPSessionAdapter.cc).
    assert [summary(r) for r in _rows(s)] == ["S1 SThA 50/0 2(130)/1(40)"]


def test_case10_syn_retransmissions_within_attempt_delay() -> None:
    s = TcpScript()
    for at in (0, 1, 3):
        s.send("C", "S", seq=1000, at=at)
    (row,) = _rows(s)
    assert summary(row) == "S0 S 0/0 3(120)/0(0)"
    assert row["duration"] == pytest.approx(3.0, abs=1e-6)


def test_case11_attempt_timer_splits_slow_retransmissions() -> None:
    s = TcpScript()
    for at in (0, 3, 9):
        s.send("C", "S", seq=1000, at=at)
    rows = _rows(s)
    assert [summary(r) for r in rows] == ["S0 S 0/0 2(80)/0(0)", "S0 S -/- 1(40)/0(0)"]
    assert rows[1]["ts"] == pytest.approx(s.packets[2].ts)


def test_case12_syn_with_new_isn_is_reuse() -> None:
    s = TcpScript()
    s.send("C", "S", seq=1000, at=0)
    s.send("C", "S", seq=7777, at=1)
    assert [summary(r) for r in _rows(s)] == ["S0 S -/- 1(40)/0(0)"] * 2


def test_case13_rejected() -> None:
    s = TcpScript().steps("C S")
    s.send("S", "RA", seq=0, ack=1001)
    assert [summary(r) for r in _rows(s)] == ["REJ Sr 0/0 1(40)/1(40)"]


def test_case14_syn_after_reported_close_is_reuse() -> None:
    s = TcpScript().steps("C S")
    s.send("S", "RA", seq=0, ack=1001)
    s.send("C", "S", seq=1000, at=1.1)
    s.send("S", "RA", seq=0, ack=1001)
    assert [summary(r) for r in _rows(s)] == ["REJ Sr 0/0 1(40)/1(40)"] * 2


def test_case25_rst_letter_repeats_only_on_new_seq() -> None:
    s = TcpScript().steps("C S; S SA; C A")
    s.send("S", "RA", seq=5001)
    s.send("S", "RA", seq=5001)
    s.send("S", "RA", seq=5002)
    assert [summary(r) for r in _rows(s)] == ["RSTR ShArr 0/0 2(80)/4(160)"]


def test_case31_attempt_timer_splits_one_sided_client() -> None:
    s = TcpScript()
    s.send("C", "S", at=0)
    s.send("C", "A", at=0.1)
    s.send("C", "D100", at=0.2)
    s.send("C", "D100", seq=1101, at=6.0)
    s.send("C", "A", at=6.1)
    s.send("C", "FA", at=7.0)
    rows = _rows(s)
    assert [summary(r) for r in rows] == ["S0 SAD 100/0 3(220)/0(0)", "SH DAF 100/0 3(220)/0(0)"]
    assert rows[0]["duration"] == pytest.approx(0.2, abs=1e-6)
    assert rows[1]["duration"] == pytest.approx(1.0, abs=1e-6)


def test_case40_bare_mode_does_not_flip_lone_synack() -> None:
    tcp, udp = bare_server_ports([])
    settings = EngineSettings(likely_tcp_ports=tcp, likely_udp_ports=udp)
    rows = _rows(TcpScript().steps("S SA"), settings)
    assert [summary(r) for r in rows] == ["OTH H -/- 1(40)/0(0)"]
    assert rows[0]["id.orig_p"] == 80


def test_case41_second_packet_flip() -> None:
    s = TcpScript(**NEUTRAL).steps("S SA; C A; C D100; S A; C FA; S FA; C A")
    (row,) = _rows(s)
    assert summary(row) == "SF ^hADaFf 100/0 4(260)/3(120)"
    assert (row["id.orig_p"], row["id.resp_p"]) == (6000, 7000)


def test_case42_flip_when_synack_sender_sends_data() -> None:
    s = TcpScript(**NEUTRAL).steps("S SA; S D50")
    (row,) = _rows(s)
    assert summary(row) == "OTH ^hd 0/50 0(0)/2(130)"
    assert row["id.orig_p"] == 6000


def test_case44_syn_synack_reversal() -> None:
    s = TcpScript(**NEUTRAL)
    s.send("S", "SA", seq=5000, ack=1001, at=0)
    s.send("C", "S", seq=1000, at=0.001)
    s.steps("C A; C D100; S A; C FA; S FA; C A")
    (row,) = _rows(s)
    assert summary(row) == "SF Hs^ADaFf 100/0 5(300)/3(120)"
    assert row["id.orig_p"] == 6000


def test_case45_simultaneous_open_is_reuse() -> None:
    s = TcpScript(**NEUTRAL)
    s.send("C", "S", seq=1000)
    s.send("S", "S", seq=5000)
    s.send("C", "SA", seq=1000, ack=5001)
    s.send("S", "SA", seq=5000, ack=1001)
    rows = _rows(s)
    assert [summary(r) for r in rows] == ["S0 S -/- 1(40)/0(0)", "S1 Sh 0/0 2(80)/1(40)"]
    assert rows[1]["id.orig_p"] == 7000


def _case46(times: int) -> TcpScript:
    s = TcpScript().steps("C S; S SA; C A")
    for _ in range(times):
        s.send("C", "D100", seq=1001)
    s.send("S", "A", ack=1101)
    return s


def test_case46_retransmission() -> None:
    assert [summary(r) for r in _rows(_case46(2))] == ["S1 ShADTa 100/0 4(360)/2(80)"]


def test_case47_retransmission_letters_are_logarithmic() -> None:
    # 11 sends = 10 retransmissions: the second `T` comes at the 10th.
    assert [summary(r) for r in _rows(_case46(11))] == ["S1 ShADTTa 100/0 13(1620)/2(80)"]


def test_case48_one_byte_keepalive_is_retransmission() -> None:
    s = TcpScript().steps("C S; S SA; C A; C D100; S A")
    s.send("C", "D1", seq=1100)
    assert [summary(r) for r in _rows(s)] == ["S1 ShADaT 100/0 4(261)/2(80)"]


def test_case49_zero_window() -> None:
    s = TcpScript().steps("C S; S SA; C A; C D100")
    s.send("S", "A", window=0)
    assert [summary(r) for r in _rows(s)] == ["S1 ShADaw 100/0 3(220)/2(80)"]


def test_case50_bad_checksum_syn() -> None:
    s = TcpScript()
    s.send("C", "S", bad_checksum=True)
    assert [summary(r) for r in _rows(s)] == ["OTH C -/- 0(0)/0(0)"]
    rows = _rows(s, EngineSettings(ignore_checksums=True))
    assert [summary(r) for r in rows] == ["S0 S -/- 1(40)/0(0)"]


def _case51() -> TcpScript:
    s = TcpScript().steps("C S; S SA; C A")
    s.send("C", "D100", bad_checksum=True)
    s.send("C", "D100", seq=1001)
    s.send("S", "A")
    return s


def test_case51_bad_checksum_data_then_good() -> None:
    assert [summary(r) for r in _rows(_case51())] == ["S1 ShACDa 100/0 3(220)/2(80)"]


def test_case51_with_ignore_checksums() -> None:
    rows = _rows(_case51(), EngineSettings(ignore_checksums=True))
    assert [summary(r) for r in rows] == ["S1 ShADTa 100/0 4(360)/2(80)"]


def test_case52_bad_checksum_synack() -> None:
    s = TcpScript().steps("C S")
    s.send("S", "SA", bad_checksum=True)
    s.send("S", "SA")
    s.send("C", "A")
    assert [summary(r) for r in _rows(s)] == ["S1 SchA 0/0 2(80)/1(40)"]


def test_case53_gap_revealed_by_ack() -> None:
    s = TcpScript().steps("C S; S SA; C A")
    s.send("C", "D100", seq=1001)
    s.send("C", "D100", seq=1201)
    s.send("S", "A", ack=1301)
    s.steps("C FA; S FA; C A")
    (row,) = _rows(s)
    assert summary(row) == "SF ShADaGFf 300/0 6(440)/3(120)"
    assert row["missed_bytes"] == 100


def test_case54_responder_gap() -> None:
    s = TcpScript().steps("C S; S SA; C A; C D100; S A")
    s.send("C", "A", ack=5201)
    s.send("C", "FA", ack=5201)
    s.send("S", "FA", seq=5201)
    s.send("C", "A", ack=5202)
    (row,) = _rows(s)
    assert summary(row) == "SF ShADagFf 100/200 6(340)/3(120)"
    assert row["missed_bytes"] == 200


def test_case56_sequence_wraparound() -> None:
    s = TcpScript(isn_c=4294967040).steps("C S; S SA; C A")
    s.send("C", "D500", seq=4294967041)
    s.send("C", "D500", seq=245)
    s.send("S", "A", ack=745)
    s.send("C", "FA", seq=745)
    s.send("S", "FA", ack=746)
    s.send("C", "A", seq=746)
    (row,) = _rows(s)
    assert summary(row) == "SF ShADaFf 1000/0 6(1240)/3(120)"
    assert row["missed_bytes"] == 0


def test_case58_fin_retransmission() -> None:
    s = TcpScript().steps("C S; S SA; C A; C FA")
    s.send("C", "FA", seq=1001)
    assert [summary(r) for r in _rows(s)] == ["S2 ShAF 0/0 4(160)/1(40)"]


def test_case59_new_syn_after_close_logs_old_connection_first() -> None:
    s = TcpScript().steps(CASE1)
    s.send("C", "S", seq=9000, at=0.8 + 2.0)
    rows = _rows(s)
    assert [summary(r) for r in rows] == ["SF ShADadFf 100/200 6(340)/4(360)",
                                          "S0 S -/- 1(40)/0(0)"]
    assert rows[1]["ts"] == pytest.approx(s.packets[-1].ts)


def test_case60_late_final_ack_is_its_own_connection() -> None:
    s = TcpScript().steps("C S; S SA; C A; C D100; S A; S D200; C A; C FA; S FA")
    s.send("C", "A", at=0.8 + 6.0)
    rows = _rows(s)
    assert [summary(r) for r in rows] == ["SF ShADadFf 100/200 5(300)/4(360)",
                                          "OTH A -/- 1(40)/0(0)"]
    assert rows[1]["ts"] == pytest.approx(s.packets[-1].ts)


def test_case61_inactivity_timeout_splits() -> None:
    s = TcpScript().steps("C S; S SA; C A")
    s.send("C", "D100", at=0.2 + 300.5)
    rows = _rows(s)
    assert [summary(r) for r in rows] == ["S1 ShA 0/0 2(80)/1(40)", "OTH D -/- 1(140)/0(0)"]


def test_case62_port_22_gets_one_hour() -> None:
    s = TcpScript(s=("10.0.0.2", 22)).steps("C S; S SA; C A")
    s.send("C", "D100", at=0.2 + 300.5)
    rows = _rows(s)
    assert [summary(r)[:12] for r in rows] == ["S1 ShAD 100/"]


def test_set_inactivity_timeout_setting_from_cli_applies() -> None:
    s = TcpScript().steps("C S; S SA; C A")
    s.send("C", "D100", at=0.2 + 300.5)
    settings = dataclasses.replace(EngineSettings(), tcp_inactivity_timeout=3600.0)
    assert len(_rows(s, settings)) == 1


class _Stream(EngineHooks):
    def __init__(self) -> None:
        self.data: dict[bool, bytearray] = {True: bytearray(), False: bytearray()}
        self.gaps: list[tuple[bool, int]] = []

    def tcp_deliver(self, conn, is_orig, data) -> None:
        self.data[is_orig] += data

    def content_gap(self, conn, is_orig, nbytes) -> None:
        self.gaps.append((is_orig, nbytes))


def test_stream_delivered_in_order_and_gap_reported() -> None:
    s = TcpScript().steps("C S; S SA; C A")
    s.send("C", "D3", seq=1004, data=b"def")        # out of order: buffered
    s.send("C", "D3", seq=1001, data=b"abc")        # fills the hole: abc + def delivered
    s.send("C", "D3", seq=1010, data=b"jkl")        # 1007-1009 never captured
    s.send("S", "A", ack=1013)                      # ack reveals the gap
    s.send("S", "D2", data=b"ok")
    hooks = _Stream()
    (row,) = run_packets(s.packets, hooks=hooks)
    assert bytes(hooks.data[True]) == b"abcdefjkl"
    assert bytes(hooks.data[False]) == b"ok"
    assert hooks.gaps == [(True, 3)]
    assert row["missed_bytes"] == 3 and "G" in row["history"]
