"""Start-up checks for the XDP datapath, so a missing prerequisite is one clear line, not a
bcc traceback half-way through a compile."""

from __future__ import annotations

import os
from pathlib import Path

from shuntd.datapath.errors import (
    BtfMissingError,
    KernelHeadersMissingError,
    KernelTooOldError,
    NotPrivilegedError,
)

# bpf_link XDP attach 5.9, ring buffer 5.8, LOOKUP_AND_DELETE on hash maps 5.14.
MIN_KERNEL = (5, 14)

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_BPF = 39


def effective_caps(status_path: str = "/proc/self/status") -> int:
    for line in Path(status_path).read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges(caps: int | None = None) -> None:
    caps = effective_caps() if caps is None else caps
    has_bpf = bool(caps & (1 << CAP_BPF)) or bool(caps & (1 << CAP_SYS_ADMIN))
    has_net = bool(caps & (1 << CAP_NET_ADMIN))
    if not (has_bpf and has_net):
        raise NotPrivilegedError(
            "shuntd needs root, or CAP_BPF and CAP_NET_ADMIN (plus CAP_PERFMON): run it as root "
            "or grant them, e.g. `setcap cap_bpf,cap_net_admin,cap_perfmon+ep`"
        )


def parse_release(release: str) -> tuple[int, int]:
    """'6.1.0-18-amd64' -> (6, 1). Unparseable parts count as 0."""
    parts = release.split("-", 1)[0].split(".")
    nums = []
    for part in parts[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        nums.append(int(digits) if digits else 0)
    while len(nums) < 2:
        nums.append(0)
    return nums[0], nums[1]


def check_kernel_version(release: str | None = None) -> None:
    release = release or os.uname().release
    if parse_release(release) < MIN_KERNEL:
        want = ".".join(map(str, MIN_KERNEL))
        raise KernelTooOldError(
            f"kernel {release} is too old: shuntd needs Linux {want} or newer "
            "(bpf_link XDP attach, ring buffer, atomic lookup-and-delete)"
        )


def check_kernel_headers(release: str | None = None, modules: str = "/lib/modules") -> None:
    release = release or os.uname().release
    build = Path(modules) / release / "build"
    if not (build / "include").is_dir() and not (build / "Makefile").exists():
        raise KernelHeadersMissingError(
            f"kernel headers for {release} are missing ({build}): bcc compiles the XDP program "
            "at start; install them with `sudo make deps`"
        )


def check_btf(path: str = "/sys/kernel/btf/vmlinux") -> None:
    if not Path(path).exists():
        raise BtfMissingError(
            f"kernel BTF is missing ({path}): boot a kernel built with CONFIG_DEBUG_INFO_BTF=y "
            "(every mainstream distribution kernel since 2021 has it)"
        )


def check_all() -> None:
    """Every check, cheapest first; raises the first PrerequisiteError."""
    check_privileges()
    check_kernel_version()
    check_btf()
    check_kernel_headers()
