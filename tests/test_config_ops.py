"""`config` and `pair_filter` shared by several processes (--workers N, shuntctl): every change
goes through the in-kernel helper xdp_config_op (bpf/shuntd.h), so concurrent writers lose
nothing. Real BPF maps, real processes; expected values are the number of calls made."""

from __future__ import annotations

import os

import pytest
from shuntd.datapath import program as P
from shuntd.datapath.program import CFG_IGNORE_VLANS, CFG_PASS_ALL, XdpProgram

WRITERS = 4
ADDS = 400
A, B = "10.80.0.1", "10.80.0.2"


@pytest.fixture(scope="module")
def prog():
    p = XdpProgram.compile(flows_max=64, pairs_max=64, calibrate=False)
    try:
        yield p
    finally:
        p.close()


def _forked(work) -> int:  # noqa: ANN001
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    return pid


def _slot_count(prog: XdpProgram, key) -> int:  # noqa: ANN001
    import ctypes

    slot = P.pair_filter_slot(bytes(key.addr1), bytes(key.addr2), prog.pair_filter.max_entries)
    return int(prog.pair_filter[ctypes.c_int(slot)].value)


def test_concurrent_pair_accounting_and_config_writes_lose_nothing(prog: XdpProgram) -> None:
    """Four processes add the same pair 400 times each while this one rewrites the clock and
    toggles pass-all: every increment counts, no flag or clock value is lost or restored."""
    key, _ = prog.pair_key(A, B)
    prog.write_config(flags=0, pairs_active=0)
    prog.set_flags(CFG_IGNORE_VLANS)
    start = _slot_count(prog, key)

    def add() -> None:
        for _ in range(ADDS):
            prog.pair_added(key)

    pids = [_forked(add) for _ in range(WRITERS)]
    codes: dict[int, int] = {}
    clocks = 0
    while len(codes) < len(pids):
        prog.write_config(clock=P.ClockCalibration(4_000_000, 1000 + clocks))
        prog.set_flags(CFG_PASS_ALL)
        prog.clear_flags(CFG_PASS_ALL)
        clocks += 1
        for p in pids:
            if p not in codes:
                done, status = os.waitpid(p, os.WNOHANG)
                if done:
                    codes[p] = os.waitstatus_to_exitcode(status)
    assert set(codes.values()) == {0}
    assert clocks > 0   # the writes really overlapped the children's
    cfg = prog.read_config()
    assert int(cfg.pairs_active) == WRITERS * ADDS
    assert _slot_count(prog, key) == start + WRITERS * ADDS
    assert int(cfg.flags) == CFG_IGNORE_VLANS
    assert (int(cfg.ns_per_jiffy), int(cfg.clock_offset_ns)) == (4_000_000, 1000 + clocks - 1)
    assert int(cfg.layout_version) == P.LAYOUT_VERSION

    pids = [_forked(lambda: [prog.pair_removed(key) for _ in range(ADDS)])
            for _ in range(WRITERS)]
    assert all(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) == 0 for p in pids)
    assert int(prog.read_config().pairs_active) == 0 and _slot_count(prog, key) == start


def test_counts_never_go_below_zero(prog: XdpProgram) -> None:
    """A removal without its insert (a crash between an insert and its count) leaves the
    counters at zero instead of wrapping to 2**32 - 1 ("maybe" for every packet forever)."""
    key, _ = prog.pair_key("10.80.1.1", "10.80.1.2")
    prog.write_config(pairs_active=0)
    before = _slot_count(prog, key)
    assert before == 0
    prog.pair_removed(key)
    assert int(prog.read_config().pairs_active) == 0 and _slot_count(prog, key) == 0
    prog.pair_added(key)
    assert int(prog.read_config().pairs_active) == 1 and _slot_count(prog, key) == 1
    prog.pair_removed(key)
    assert int(prog.read_config().pairs_active) == 0


def test_pairs_and_flags_share_a_word_without_touching_each_other(prog: XdpProgram) -> None:
    prog.write_config(flags=0, pairs_active=0)
    key, _ = prog.pair_key("10.80.2.1", "10.80.2.2")
    prog.set_flags(CFG_PASS_ALL | CFG_IGNORE_VLANS)
    for _ in range(3):
        prog.pair_added(key)
    prog.clear_flags(CFG_PASS_ALL)
    cfg = prog.read_config()
    assert (int(cfg.flags), int(cfg.pairs_active)) == (CFG_IGNORE_VLANS, 3)
    for _ in range(3):
        prog.pair_removed(key)
    prog.clear_flags(CFG_IGNORE_VLANS)
    cfg = prog.read_config()
    assert (int(cfg.flags), int(cfg.pairs_active)) == (0, 0)
