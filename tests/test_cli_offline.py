"""`shuntd -r` end to end: conn.log in TSV and JSON, and bad input handling (E2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shuntd.cli import main

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "zeek"
SSH = CORPUS / "core" / "ssh.basic" / "trace.pcap"

needs_corpus = pytest.mark.skipif(not SSH.is_file(), reason="../shared/corpus is absent")


def _data_lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]


@needs_corpus
def test_tsv_and_json_have_the_baseline_row_count(tmp_path: Path) -> None:
    want = len(_data_lines(SSH.parent / "conn.log"))
    assert main(["-r", str(SSH), "--log-dir", str(tmp_path / "t")]) == 0
    assert len(_data_lines(tmp_path / "t" / "conn.log")) == want
    assert main(["-r", str(SSH), "--log-dir", str(tmp_path / "j"), "--log-format", "json"]) == 0
    rows = [json.loads(ln) for ln in _data_lines(tmp_path / "j" / "conn.log")]
    assert len(rows) == want
    assert all(r["proto"] in ("tcp", "udp") and r["uid"].startswith("C") for r in rows)
    assert sum(r["proto"] == "udp" for r in rows) == 2   # as in the baseline


@needs_corpus
def test_truncated_trace_writes_records_and_fails(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(SSH.read_bytes()[:100_000])
    assert main(["-r", str(cut), "--log-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "packet" in err[0]
    assert len(_data_lines(tmp_path / "conn.log")) > 0


def test_missing_and_garbage_traces_give_one_line_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-r", str(tmp_path / "nope.pcap"), "--log-dir", str(tmp_path)]) == 2
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"this is not a capture file")
    assert main(["-r", str(junk), "--log-dir", str(tmp_path / "o")]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(ln.startswith("shuntd: ") for ln in lines)


def test_bad_option_value_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["-r", "x.pcap", "--tcp-inactivity-timeout", "soon"])
    assert exc.value.code == 2
