"""Interface facts over netlink (pyroute2): index, MTU, admin state, attached XDP program."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from shuntd.datapath.errors import InterfaceDownError, InterfaceMissingError

IFF_UP = 0x1


class XdpMode(enum.Enum):
    """Where the program runs. Mirrors the kernel's XDP_ATTACHED_* values."""

    NONE = 0
    NATIVE = 1  # XDP_ATTACHED_DRV: in the driver, before any skb exists
    GENERIC = 2  # XDP_ATTACHED_SKB: after skb allocation; same semantics, less gain
    OFFLOAD = 3  # XDP_ATTACHED_HW
    MULTI = 4  # several modes at once


_PYROUTE2_XDP_WORDS = {"xdp": 1, "xdpgeneric": 2, "xdpoffload": 3, "xdpmulti": 4}


@dataclass(frozen=True, slots=True)
class XdpState:
    mode: XdpMode
    prog_id: int  # 0 when nothing is attached


@dataclass(frozen=True, slots=True)
class InterfaceInfo:
    name: str
    index: int
    mtu: int
    up: bool
    kind: str  # "veth", "" for physical NICs, ...
    xdp: XdpState


def _xdp_state(link: object) -> XdpState:
    nla = link.get_attr("IFLA_XDP")  # type: ignore[attr-defined]
    if not nla:
        return XdpState(XdpMode.NONE, 0)
    attached = nla.get_attr("IFLA_XDP_ATTACHED") or 0
    if isinstance(attached, str):  # pyroute2 maps the number to iproute2's word
        attached = _PYROUTE2_XDP_WORDS.get(attached, XdpMode.MULTI.value)
    prog_id = 0
    for name in ("IFLA_XDP_PROG_ID", "IFLA_XDP_DRV_PROG_ID", "IFLA_XDP_SKB_PROG_ID",
                 "IFLA_XDP_HW_PROG_ID"):
        prog_id = prog_id or (nla.get_attr(name) or 0)
    return XdpState(XdpMode(attached), prog_id)


def interface_info(ifname: str) -> InterfaceInfo:
    """Look the interface up; raise InterfaceMissingError if there is none of that name."""
    with IPRoute() as ipr:
        try:
            links = ipr.link("get", ifname=ifname)
        except NetlinkError as exc:
            raise InterfaceMissingError(
                f"interface {ifname!r} does not exist: check the name with `ip link` "
                f"(netlink: {exc.args[-1] if exc.args else exc})"
            ) from None
    if not links:
        raise InterfaceMissingError(f"interface {ifname!r} does not exist: check `ip link`")
    link = links[0]
    linkinfo = link.get_attr("IFLA_LINKINFO")
    kind = (linkinfo.get_attr("IFLA_INFO_KIND") or "") if linkinfo else ""
    return InterfaceInfo(
        name=ifname,
        index=int(link["index"]),
        mtu=int(link.get_attr("IFLA_MTU") or 0),
        up=bool(link["flags"] & IFF_UP),
        kind=kind,
        xdp=_xdp_state(link),
    )


def require_up(info: InterfaceInfo) -> None:
    if not info.up:
        raise InterfaceDownError(
            f"interface {info.name!r} is down: bring it up first (`ip link set {info.name} up`)"
        )


def xdp_state(ifname: str) -> XdpState:
    return interface_info(ifname).xdp
