"""The program's per-CPU `stats` array, summed, by name (for metrics and shuntctl)."""

from __future__ import annotations

from shuntd.datapath.program import StatIndex, XdpProgram


def read_stats(prog: XdpProgram) -> dict[str, int]:
    """{"seen": n, "passed": n, "dropped_flow": n, ...}: names of enum shunt_stat, lower-case,
    without the STAT_ prefix; values summed over CPUs."""
    return {idx.name.lower(): int(value) for idx, value in prog.stats().items()}


STAT_NAMES: tuple[str, ...] = tuple(idx.name.lower() for idx in StatIndex)
