"""Attach an XDP program through a bpf_link owned by this process.

Why a link and not bcc's ``attach_xdp``: a link lives exactly as long as its fd. If the daemon
dies, however uncleanly, the kernel closes the fd and the program leaves the interface, so
shunted traffic becomes visible again (fail open) instead of staying blind until someone notices.
"""

from __future__ import annotations

import errno
import os

from shuntd.datapath import libbpf
from shuntd.datapath.errors import AttachError, MtuTooLargeError, XdpAlreadyAttachedError
from shuntd.datapath.iface import InterfaceInfo, XdpMode, interface_info, require_up

# Largest MTU a non-multi-buffer program accepts in native mode on veth (4 KiB page minus
# XDP headroom, Ethernet header and skb_shared_info; kernel veth_xdp_set). NIC drivers differ
# but sit in the same ~3.5 KB range; the kernel answers ERANGE above it.
VETH_NATIVE_MAX_MTU = 3506

_NATIVE_UNSUPPORTED = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTSUP)


class XdpAttachment:
    """One program on one interface. ``detach()`` (or process exit) removes it."""

    __slots__ = ("ifname", "ifindex", "mode", "prog_id", "_link_fd")

    def __init__(self, ifname: str, ifindex: int, mode: XdpMode, prog_id: int, link_fd: int):
        self.ifname = ifname
        self.ifindex = ifindex
        self.mode = mode
        self.prog_id = prog_id
        self._link_fd = link_fd

    @property
    def attached(self) -> bool:
        return self._link_fd >= 0

    def detach(self) -> None:
        """Idempotent. Detach explicitly first: a forked child may still hold a copy of the fd."""
        fd, self._link_fd = self._link_fd, -1
        if fd < 0:
            return
        try:
            libbpf.link_detach(fd)
        except OSError:
            pass  # closing the last fd detaches anyway
        finally:
            os.close(fd)

    def __enter__(self) -> XdpAttachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        return f"XdpAttachment({self.ifname!r}, mode={self.mode.name}, prog_id={self.prog_id})"


def refuse_if_occupied(info: InterfaceInfo) -> None:
    if info.xdp.prog_id:
        raise XdpAlreadyAttachedError(
            f"interface {info.name!r} already has an XDP program (id {info.xdp.prog_id}, "
            f"{info.xdp.mode.name.lower()} mode): stop the shuntd or tool that owns it, or "
            f"inspect it with `bpftool net show dev {info.name}` and remove a stale legacy "
            f"attach with `ip link set dev {info.name} xdp off`"
        )


def _mtu_message(info: InterfaceInfo) -> str:
    return (
        f"interface {info.name!r} MTU {info.mtu} (or its veth peer's) is too large for native "
        f"XDP without multi-buffer support (limit about {VETH_NATIVE_MAX_MTU} on veth): load "
        f"the frags-aware program, or lower the MTU (`ip link set dev {info.name} mtu 1500`), "
        f"or use generic mode"
    )


def _try(prog_fd: int, info: InterfaceInfo, flags: int) -> int:
    return libbpf.link_create_xdp(prog_fd, info.index, flags)


def attach_xdp(prog_fd: int, ifname: str, mode: str = "auto") -> XdpAttachment:
    """Attach ``prog_fd`` to ``ifname``.

    ``mode`` is "native", "generic" or "auto" (native, else generic when the driver has no
    native XDP). The returned attachment reports the mode the kernel actually used.
    Raises InterfaceMissingError, InterfaceDownError, XdpAlreadyAttachedError,
    MtuTooLargeError or AttachError.
    """
    if mode not in ("auto", "native", "generic"):
        raise ValueError(f"XDP mode must be auto, native or generic, not {mode!r}")
    info = interface_info(ifname)
    require_up(info)
    refuse_if_occupied(info)
    link_fd = -1
    if mode in ("auto", "native"):
        try:
            link_fd = _try(prog_fd, info, libbpf.XDP_FLAGS_DRV_MODE)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                raise MtuTooLargeError(_mtu_message(info)) from None
            if exc.errno in (errno.EBUSY, errno.EEXIST):
                raise XdpAlreadyAttachedError(
                    f"interface {ifname!r} already has an XDP program: "
                    f"see `bpftool net show dev {ifname}`"
                ) from None
            if mode == "native" or exc.errno not in _NATIVE_UNSUPPORTED:
                raise AttachError(f"native XDP attach on {ifname!r} failed: {exc}") from None
    if link_fd < 0:
        try:
            link_fd = _try(prog_fd, info, libbpf.XDP_FLAGS_SKB_MODE)
        except OSError as exc:
            if exc.errno in (errno.EBUSY, errno.EEXIST):
                raise XdpAlreadyAttachedError(
                    f"interface {ifname!r} already has an XDP program: "
                    f"see `bpftool net show dev {ifname}`"
                ) from None
            raise AttachError(f"generic XDP attach on {ifname!r} failed: {exc}") from None
    state = interface_info(ifname).xdp
    return XdpAttachment(ifname, info.index, state.mode, state.prog_id, link_fd)
