"""ctypes bindings to the few libbpf.so.1 calls bcc does not expose the way we need.

Why not bcc: its ``attach_xdp`` is the legacy netlink attach that outlives a crashed daemon, and
its table setters hide errno (we must tell "map full" from "already shunted"). libbpf >= 1.0
returns ``-errno`` directly, which is what every wrapper here turns into ``OSError``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from functools import lru_cache

BPF_XDP = 37  # enum bpf_attach_type

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2


class BpfLinkCreateOpts(ctypes.Structure):
    """Prefix of ``struct bpf_link_create_opts``; libbpf accepts a shorter ``sz`` by design."""

    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


class BpfMapInfo(ctypes.Structure):
    """Prefix of ``struct bpf_map_info``; the kernel fills at most ``info_len`` bytes."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class ProgLoadOpts(ctypes.Structure):
    """struct bpf_prog_load_opts of libbpf 1.1 (sz tells libbpf which fields we know)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("attempts", ctypes.c_int),
        ("expected_attach_type", ctypes.c_uint),
        ("prog_btf_fd", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_ifindex", ctypes.c_uint32),
        ("kern_version", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32),
        ("attach_btf_obj_fd", ctypes.c_uint32),
        ("fd_array", ctypes.c_void_p),
        ("func_info", ctypes.c_void_p),
        ("func_info_cnt", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_void_p),
        ("line_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_char_p),
    ]


class TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts of libbpf 1.1."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
    ]


@lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    """Load libbpf once; the CDLL handle is immutable, so caching it is not mutable state."""
    path = ctypes.util.find_library("bpf") or "libbpf.so.1"
    so = ctypes.CDLL(path, use_errno=True)
    vp, i, u32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32
    so.bpf_link_create.argtypes = [i, i, ctypes.c_int, ctypes.POINTER(BpfLinkCreateOpts)]
    so.bpf_link_create.restype = i
    so.bpf_link_detach.argtypes = [i]
    so.bpf_obj_get.argtypes = [ctypes.c_char_p]
    so.bpf_obj_pin.argtypes = [i, ctypes.c_char_p]
    so.bpf_obj_get_info_by_fd.argtypes = [i, vp, ctypes.POINTER(u32)]
    so.bpf_map_update_elem.argtypes = [i, vp, vp, ctypes.c_uint64]
    so.bpf_map_lookup_elem.argtypes = [i, vp, vp]
    so.bpf_map_delete_elem.argtypes = [i, vp]
    so.bpf_map_lookup_and_delete_elem.argtypes = [i, vp, vp]
    so.bpf_map_get_next_key.argtypes = [i, vp, vp]
    so.bpf_prog_load.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, vp,
                                 ctypes.c_size_t, ctypes.POINTER(ProgLoadOpts)]
    so.bpf_prog_load.restype = i
    so.bpf_prog_test_run_opts.argtypes = [i, ctypes.POINTER(TestRunOpts)]
    so.bpf_prog_test_run_opts.restype = i
    so.bpf_link_get_next_id.argtypes = [u32, ctypes.POINTER(u32)]
    so.bpf_link_get_fd_by_id.argtypes = [u32]
    return so


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = -ret if ret != -1 else (ctypes.get_errno() or errno.EINVAL)
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def link_create_xdp(prog_fd: int, ifindex: int, xdp_flags: int) -> int:
    """Create an XDP bpf_link; closing the returned fd (or process death) detaches it."""
    opts = BpfLinkCreateOpts(sz=ctypes.sizeof(BpfLinkCreateOpts), flags=xdp_flags)
    ret = lib().bpf_link_create(prog_fd, ifindex, BPF_XDP, ctypes.byref(opts))
    return _check(ret, "bpf_link_create")


def link_detach(link_fd: int) -> None:
    _check(lib().bpf_link_detach(link_fd), "bpf_link_detach")


def obj_get(path: str) -> int:
    return _check(lib().bpf_obj_get(os.fsencode(path)), f"bpf_obj_get({path})")


def obj_pin(fd: int, path: str) -> None:
    _check(lib().bpf_obj_pin(fd, os.fsencode(path)), f"bpf_obj_pin({path})")


def map_info(fd: int) -> BpfMapInfo:
    info = BpfMapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
           "bpf_obj_get_info_by_fd")
    return info


def map_update(fd: int, key: ctypes._CData, value: ctypes._CData, flags: int) -> int:
    """Return 0 or a positive errno (EEXIST, E2BIG, ...) instead of raising: callers branch."""
    ret = lib().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), flags)
    if ret < 0:
        return -ret if ret != -1 else ctypes.get_errno()
    return 0


def map_lookup(fd: int, key: ctypes._CData, value: ctypes._CData) -> bool:
    """Fill ``value``; False when the key is absent."""
    ret = lib().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
    if ret == -errno.ENOENT:
        return False
    _check(ret, "bpf_map_lookup_elem")
    return True


def map_delete(fd: int, key: ctypes._CData) -> bool:
    ret = lib().bpf_map_delete_elem(fd, ctypes.byref(key))
    if ret == -errno.ENOENT:
        return False
    _check(ret, "bpf_map_delete_elem")
    return True


def map_lookup_and_delete(fd: int, key: ctypes._CData, value: ctypes._CData) -> bool:
    """Atomic final read + delete (hash maps, Linux >= 5.14); False when absent."""
    ret = lib().bpf_map_lookup_and_delete_elem(fd, ctypes.byref(key), ctypes.byref(value))
    if ret == -errno.ENOENT:
        return False
    _check(ret, "bpf_map_lookup_and_delete_elem")
    return True


def prog_load(prog_type: int, name: bytes, insns: bytes) -> int:
    """Load raw bytecode (map fds already in its ld_imm64 instructions); returns the fd."""
    buf = ctypes.create_string_buffer(insns, len(insns))
    return _check(lib().bpf_prog_load(prog_type, name, b"GPL", buf, len(insns) // 8, None),
                  f"bpf_prog_load({name.decode()})")
