"""Pinned maps under /sys/fs/bpf/shuntd/<iface>/: counters that outlive the process.

How reuse works (chosen because it needs no second loader): the program declares its maps with
bcc's ``BPF_TABLE_PINNED(..., "<pin dir>/<map>")``. At compile time bcc opens the pin if it
exists (the map and its counters are adopted) and otherwise creates the map and pins it. This
module prepares the directory (root-only, 0700), checks a stale pin's layout before bcc sees it,
and removes the pins on a clean, final shutdown. The program attachment itself is never pinned:
it must die with the daemon (see attach.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from shuntd.datapath import libbpf
from shuntd.datapath.errors import BpffsError, PinError

BPFFS_ROOT = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS_ROOT / "shuntd"


def bpffs_mounted(mountpoint: Path = BPFFS_ROOT, mounts: str = "/proc/self/mounts") -> bool:
    target = str(mountpoint)
    for line in Path(mounts).read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == target and fields[2] == "bpf":
            return True
    return False


def ensure_bpffs(mountpoint: Path = BPFFS_ROOT) -> None:
    """Mount bpffs if absent (as `mount -t bpf bpf /sys/fs/bpf` would)."""
    if bpffs_mounted(mountpoint):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    if libc.mount(b"bpf", os.fsencode(str(mountpoint)), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise BpffsError(
            f"bpffs is not mounted at {mountpoint} and mounting it failed "
            f"({os.strerror(err)}): run `mount -t bpf bpf {mountpoint}` as root"
        )


def pin_dir(ifname: str, root: Path = PIN_ROOT) -> Path:
    if not ifname or "/" in ifname or ifname in (".", ".."):
        raise ValueError(f"not an interface name: {ifname!r}")
    return root / ifname


def prepare_pin_dir(ifname: str, root: Path = PIN_ROOT) -> Path:
    """Create <root>/<ifname> with mode 0700 (and <root> too); mount bpffs first if needed."""
    ensure_bpffs(root.parent)
    path = pin_dir(ifname, root)
    for d in (root, path):
        d.mkdir(mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)  # mkdir's mode is filtered by umask, and old dirs keep theirs
    return path


@dataclass(frozen=True, slots=True)
class MapLayout:
    key_size: int
    value_size: int
    max_entries: int


def pinned_layout(path: Path) -> MapLayout:
    """Open a pin just long enough to read its layout."""
    try:
        fd = libbpf.obj_get(str(path))
    except OSError as exc:
        raise PinError(f"cannot open pinned map {path}: {exc.strerror}") from None
    try:
        info = libbpf.map_info(fd)
    finally:
        os.close(fd)
    return MapLayout(info.key_size, info.value_size, info.max_entries)


def check_pin(path: Path, want: MapLayout) -> bool:
    """True if a compatible pin exists (it will be adopted), False if none.

    Raises PinError for a pin of another layout: a silent re-create would throw away counters of
    live shunts; the operator decides (``shuntd --drop-pins`` / delete the directory).
    """
    if not path.exists():
        return False
    have = pinned_layout(path)
    if have != want:
        raise PinError(
            f"pinned map {path} has layout {have} but this build expects {want} (map size or "
            f"struct changed): stop shuntd and remove {path.parent} to start with empty maps"
        )
    return True


def pinned_files(ifname: str, root: Path = PIN_ROOT) -> list[Path]:
    path = pin_dir(ifname, root)
    return sorted(path.iterdir()) if path.is_dir() else []


def unpin_all(ifname: str, root: Path = PIN_ROOT) -> None:
    """Remove every pin of ``ifname`` (clean final shutdown). The maps themselves go away once
    the last fd (ours) closes. Idempotent."""
    path = pin_dir(ifname, root)
    if path.is_dir():
        shutil.rmtree(path)
