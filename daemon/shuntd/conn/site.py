"""Site::local_nets membership for local_orig/local_resp (spec §1.8)."""

from __future__ import annotations

import ipaddress

from shuntd.conn.settings import PRIVATE_ADDRESS_SPACE


class LocalNets:
    """Set of networks; `contains(packed_addr)` answers from packed 4/16-byte addresses."""

    __slots__ = ("_v4", "_v6", "empty", "_memo")

    _MEMO_MAX = 65536   # answers remembered per address (cleared when full)

    def __init__(self, cidrs: tuple[str, ...] | list[str], include_private: bool) -> None:
        nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        all_cidrs = list(cidrs) + (list(PRIVATE_ADDRESS_SPACE) if include_private else [])
        for text in all_cidrs:
            try:
                nets.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError as exc:
                raise ValueError(f"bad network {text!r} in local nets: {exc}") from None
        self._v4 = self._by_mask(nets, 4)
        self._v6 = self._by_mask(nets, 6)
        self.empty = not nets
        # Two lookups per logged connection, mostly of a few busy addresses: remember them.
        self._memo: dict[bytes, bool] = {}

    @staticmethod
    def _by_mask(nets: list, version: int) -> list[tuple[int, frozenset[int]]]:
        """[(netmask, {network addresses})]: one set lookup per distinct prefix length."""
        groups: dict[int, set[int]] = {}
        for n in nets:
            if n.version == version:
                groups.setdefault(int(n.netmask), set()).add(int(n.network_address))
        return [(mask, frozenset(addrs)) for mask, addrs in groups.items()]

    def contains(self, addr: bytes) -> bool:
        memo = self._memo
        found = memo.get(addr)
        if found is None:
            value = int.from_bytes(addr, "big")
            found = False
            for mask, networks in self._v4 if len(addr) == 4 else self._v6:
                if value & mask in networks:
                    found = True
                    break
            if len(memo) >= self._MEMO_MAX:
                memo.clear()
            memo[addr] = found
        return found
