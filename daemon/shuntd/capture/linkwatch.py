"""Watch one interface's link state over rtnetlink: down, up again, deleted.

Why netlink and not the capture socket alone: the packet socket reports ENETDOWN for both a
downed and an unregistered device, and only when the consumer polls; a link that goes down and
up between two polls leaves no trace there. RTM_NEWLINK/RTM_DELLINK messages of the RTMGRP_LINK
group tell each change with the interface index, so a renamed or re-created interface of the
same name is never mistaken for ours.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

NETLINK_ROUTE = 0
RTMGRP_LINK = 0x1
RTM_NEWLINK = 16
RTM_DELLINK = 17
IFF_UP = 0x1
IFF_RUNNING = 0x40  # operationally up (carrier, RFC 2863 oper state)
_NLMSG = struct.Struct("=IHHII")
_IFINFO = struct.Struct("=BxHiII")


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """`kind`: "down" (admin down or no carrier; `why` says which), "up", or "deleted"."""

    kind: str
    why: str = ""


def _state(flags: int) -> tuple[bool, str]:
    if not flags & IFF_UP:
        return False, "set administratively down"
    if not flags & IFF_RUNNING:
        return False, "no carrier"
    return True, ""


class LinkWatch:
    """Non-blocking rtnetlink listener for the interface `ifindex`; `poll()` returns the state
    changes (not every RTM_NEWLINK: statistics and address updates repeat the same state)."""

    def __init__(self, ifindex: int, flags: int = IFF_UP | IFF_RUNNING) -> None:
        self.ifindex = ifindex
        self.usable, _ = _state(flags)
        self.deleted = False
        self.overruns = 0  # ENOBUFS: messages lost; the state is re-read by the caller
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                   NETLINK_ROUTE)
        self._sock.bind((0, RTMGRP_LINK))

    def fileno(self) -> int:
        return self._sock.fileno()

    def poll(self) -> list[LinkEvent]:
        out: list[LinkEvent] = []
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return out
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    continue
                raise
            if not data:
                return out
            out.extend(self._parse(data))

    def _parse(self, data: bytes) -> list[LinkEvent]:
        out: list[LinkEvent] = []
        off = 0
        while off + _NLMSG.size <= len(data):
            length, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
            if length < _NLMSG.size:
                break
            body = off + _NLMSG.size
            if mtype in (RTM_NEWLINK, RTM_DELLINK) and body + _IFINFO.size <= len(data):
                _family, _type, index, flags, _change = _IFINFO.unpack_from(data, body)
                if index == self.ifindex and not self.deleted:
                    ev = self._change(mtype, flags)
                    if ev is not None:
                        out.append(ev)
            off += (length + 3) & ~3
        return out

    def _change(self, mtype: int, flags: int) -> LinkEvent | None:
        if mtype == RTM_DELLINK:
            self.deleted = True
            return LinkEvent("deleted")
        usable, why = _state(flags)
        if usable == self.usable:
            return None
        self.usable = usable
        return LinkEvent("up") if usable else LinkEvent("down", why)

    def close(self) -> None:
        self._sock.close()
