"""Short version of bench/fuzz.py, plus the replay of tests/fuzz_regressions/.

Expectations come from Zeek's baselines beside the corpus traces (their rows and exact
fields), from the spec's drop rules (a frame Zeek drops before any connection makes no row),
and from the bytes sent.
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shuntd.packet import decode

ROOT = Path(__file__).resolve().parents[1]
REGRESSIONS = Path(__file__).resolve().parent / "fuzz_regressions"
CORPUS = ROOT.parent / "shared" / "corpus" / "zeek" / "core"


def _load_fuzz() -> Any:
    spec = importlib.util.spec_from_file_location("shuntd_bench_fuzz", ROOT / "bench" / "fuzz.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


fz = _load_fuzz()
needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason="../shared/corpus absent")
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_garbage_frame_alone_makes_no_row(seed: int, tmp_path_factory: Any) -> None:
    rng = random.Random(seed)
    frames = [fz.garbage_frame(rng) for _ in range(4)]
    header = fz.struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    data = fz.write_pcap(header, [(100 + i, 0, f, len(f)) for i, f in enumerate(frames)])
    rows, why = fz.engine_rows(data, tmp_path_factory.mktemp("g") / "t.pcap")
    assert why is None and rows == []


@needs_corpus
@pytest.mark.parametrize("name", fz.ENGINE_TRACES)
@pytest.mark.parametrize("seed", range(4))
def test_interleaved_garbage_still_gives_zeeks_rows(name: str, seed: int, tmp_path: Path) -> None:
    header, records = fz.read_pcap(CORPUS / name / "trace.pcap")
    baseline = fz.read_baseline(CORPUS / name)
    mixed = fz.interleave_garbage(random.Random(seed), records, 0.5)
    assert len(mixed) > len(records)
    rows, why = fz.engine_rows(fz.write_pcap(header, mixed), tmp_path / "t.pcap")
    assert why is None
    assert fz.diff_against_baseline(rows, baseline, exact=True) is None


@needs_corpus
@pytest.mark.parametrize("name", fz.ENGINE_TRACES)
@pytest.mark.parametrize("seed", range(4))
def test_mutated_duplicates_log_each_connection_once(name: str, seed: int,
                                                     tmp_path: Path) -> None:
    header, records = fz.read_pcap(CORPUS / name / "trace.pcap")
    baseline = fz.read_baseline(CORPUS / name)
    doubled = fz.duplicate_mutated(random.Random(seed), records)
    rows, why = fz.engine_rows(fz.write_pcap(header, doubled), tmp_path / "t.pcap")
    assert why is None
    assert fz.diff_against_baseline(rows, baseline, exact=False) is None


def test_short_fuzz_run_has_no_escape() -> None:
    lines: list[str] = []
    assert fz.run(30_000, seed=12345, save=None, out=lines.append) == 0, lines
    assert lines[-1].startswith("fuzz: ") and " 0 escapes" in lines[-1]


def _regressions(pattern: str) -> list[Path]:
    return sorted(REGRESSIONS.glob(pattern)) if REGRESSIONS.is_dir() else []


@pytest.mark.parametrize("path", _regressions("*.bin"), ids=lambda p: p.name)
def test_regression_frames_decode(path: Path) -> None:
    frame = path.read_bytes()
    defrag = fz.Defragmenter(ignore_checksums=True, max_pending=8, timeout=1.0)
    for linktype in fz.LINKTYPES:
        assert fz.check_decode(frame, linktype, len(frame), defrag) is None


@pytest.mark.parametrize("path", _regressions("*.pcap"), ids=lambda p: p.name)
def test_regression_traces_run(path: Path, tmp_path: Path) -> None:
    assert fz.check_trace(path.read_bytes(), tmp_path / "t.pcap") is None
    _rows, why = fz.engine_rows(path.read_bytes(), tmp_path / "e.pcap")
    assert why is None


@pytest.mark.parametrize("path", _regressions("xdp-*.bin"), ids=lambda p: p.name)
def test_regression_frames_pass_xdp(path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (BPF)")
    pytest.importorskip("bcc")
    from shuntd.datapath import program as P
    frame = path.read_bytes()
    # the engine: no connection (Zeek drops these before one exists)
    assert decode(frame, 1, 1.0, len(frame), True) is None or \
        not decode(frame, 1, 1.0, len(frame), True).l4_ok
    prog = P.XdpProgram.compile(flows_max=64, pairs_max=16)
    try:
        for flow in (("10.0.0.1", 1, "10.0.0.2", 2, 6), ("2001:db8::1", 1, "2001:db8::2", 2, 6),
                     ("10.0.0.1", 8, "10.0.0.2", 0, 1)):
            key, _side = prog.flow_key(*flow)
            prog.flows[key] = prog.new_value(P.lease_deadline_ns(60.0))
        before = prog.stats()
        assert prog.test_run(frame).retval == P.XDP_PASS
        after = prog.stats()
        d = {k.name: after[k] - before[k] for k in after if after[k] != before[k]}
        assert "DROPPED_FLOW" not in d
        assert d.get("UNPARSEABLE", 0) + d.get("L4_UNPARSEABLE", 0) == 1
    finally:
        prog.close()
