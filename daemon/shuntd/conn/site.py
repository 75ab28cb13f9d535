"""Site::local_nets membership for local_orig/local_resp (spec §1.8)."""

from __future__ import annotations

import ipaddress

from shuntd.conn.settings import PRIVATE_ADDRESS_SPACE


class LocalNets:
    """Set of networks; `contains(packed_addr)` answers from packed 4/16-byte addresses."""

    __slots__ = ("_v4", "_v6", "empty")

    def __init__(self, cidrs: tuple[str, ...] | list[str], include_private: bool) -> None:
        nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        all_cidrs = list(cidrs) + (list(PRIVATE_ADDRESS_SPACE) if include_private else [])
        for text in all_cidrs:
            try:
                nets.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError as exc:
                raise ValueError(f"bad network {text!r} in local nets: {exc}") from None
        self._v4 = [(int(n.network_address), int(n.netmask)) for n in nets if n.version == 4]
        self._v6 = [(int(n.network_address), int(n.netmask)) for n in nets if n.version == 6]
        self.empty = not nets

    def contains(self, addr: bytes) -> bool:
        value = int.from_bytes(addr, "big")
        table = self._v4 if len(addr) == 4 else self._v6
        return any(value & mask == net for net, mask in table)
