"""Renew a lease in place, without touching the entry's counters.

Why: userspace can only replace a whole hash-map value. A lookup + update renewal would lose
every packet XDP counts between the two syscalls, and conn.log byte counts must be exact.
So a 20-instruction XDP program, run on demand with BPF_PROG_TEST_RUN, looks the key up and
writes ``lease_expiry_ns`` (one aligned 8-byte store) and clears SHUNT_F_LEASE_EVENT_SENT
and SHUNT_F_EARLY (an atomic AND: an entry being renewed is somebody's own, never an early
shunt nobody adopted) in the live entry. The "packet" it runs on is ``key || deadline``.
It is never attached to any interface.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import Any

from shuntd.datapath import libbpf
from shuntd.datapath.program import F_EARLY, F_LEASE_EVENT_SENT

BPF_PROG_TYPE_XDP = 6
_FOUND, _MISSING = 2, 1  # return codes of the renew program


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def renew_program(map_fd: int, key_size: int, lease_off: int, flags_off: int,
                  flags_size: int) -> bytes:
    """Bytecode: if key found, value.lease = deadline; value.flags &= ~(LEASE_EVENT_SENT |
    EARLY)."""
    atomic = {8: 0xDB, 4: 0xC3}[flags_size]  # BPF_STX | BPF_ATOMIC | BPF_DW / BPF_W
    return b"".join([
        _insn(0x61, 6, 1, 0),  # 0: r6 = ctx->data
        _insn(0x61, 7, 1, 4),  # 1: r7 = ctx->data_end
        _insn(0xBF, 2, 6),  # 2: r2 = r6
        _insn(0x07, 2, imm=key_size + 8),  # 3: r2 += key + deadline
        _insn(0x2D, 2, 7, off=13),  # 4: if r2 > r7 goto 18 (short input)
        _insn(0x18, 1, 1, imm=map_fd),  # 5: r1 = map (BPF_PSEUDO_MAP_FD)
        _insn(0x00),  # 6: (second half of the 64-bit load)
        _insn(0xBF, 2, 6),  # 7: r2 = r6 (the key)
        _insn(0x85, imm=1),  # 8: call bpf_map_lookup_elem
        _insn(0x15, 0, off=6),  # 9: if r0 == 0 goto 16
        _insn(0x79, 1, 6, key_size),  # 10: r1 = deadline
        _insn(0x7B, 0, 1, lease_off),  # 11: value->lease_expiry_ns = r1
        _insn(0xB7, 1, imm=~(F_LEASE_EVENT_SENT | F_EARLY)),  # 12: r1 = ~flags
        _insn(atomic, 0, 1, flags_off, imm=0x50),  # 13: lock value->flags &= r1
        _insn(0xB7, 0, imm=_FOUND),  # 14
        _insn(0x95),  # 15: exit
        _insn(0xB7, 0, imm=_MISSING),  # 16
        _insn(0x95),  # 17: exit
        _insn(0xB7, 0, imm=0),  # 18
        _insn(0x95),  # 19: exit
    ])


class LeaseWriter:
    """In-place lease renewal for one map (flows or ip_pairs). One test run per key, on a
    buffer and options made once (the deadline is written once per batch)."""

    __slots__ = ("key_size", "_fd", "_buf", "_view", "_opts", "_opts_ref", "_run")

    def __init__(self, table: Any):
        leaf = table.Leaf
        self.key_size = ctypes.sizeof(table.Key)
        code = renew_program(table.map_fd, self.key_size, leaf.lease_expiry_ns.offset,
                             leaf.flags.offset, leaf.flags.size)
        self._fd = libbpf.prog_load(BPF_PROG_TYPE_XDP, b"shuntd_renew", code)
        # XDP test runs need an Ethernet header's worth of bytes.
        self._buf = ctypes.create_string_buffer(max(14, self.key_size + 8))
        self._view = memoryview(self._buf).cast("B")  # slice writes without ctypes' cost
        self._opts = libbpf.TestRunOpts(sz=ctypes.sizeof(libbpf.TestRunOpts),
                                        data_in=ctypes.addressof(self._buf),
                                        data_size_in=len(self._buf), repeat=1)
        self._opts_ref = ctypes.byref(self._opts)
        self._run = libbpf.lib().bpf_prog_test_run_opts

    def renew(self, key: Any, deadline_ns: int) -> bool:
        """Set the lease of ``key``; False if the entry does not exist."""
        return self.renew_many([key], deadline_ns) == 1

    def renew_many(self, keys: list[Any], deadline_ns: int) -> int:
        """Set the lease of each key (ctypes keys or their bytes); returns how many exist."""
        view, size, opts, ref, run, fd = (self._view, self.key_size, self._opts,
                                          self._opts_ref, self._run, self._fd)
        struct.pack_into("<Q", view, size, deadline_ns)
        found = 0
        for key in keys:
            view[:size] = bytes(key)
            ret = run(fd, ref)
            if ret < 0:
                err = -ret if ret != -1 else (ctypes.get_errno() or errno.EINVAL)
                raise OSError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)}")
            found += opts.retval == _FOUND
        return found

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
