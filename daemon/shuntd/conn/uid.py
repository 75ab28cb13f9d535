"""Zeek-format connection uids: 'C' + base62 of 96 random bits (spec §1.3)."""

from __future__ import annotations

import os
import random

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


# Two base62 digits at a time (least significant first): 3844 precomputed pairs.
_PAIRS = [_ALPHABET[i % 62] + _ALPHABET[i // 62] for i in range(62 * 62)]


def _base62_lsd_first(n: int) -> str:
    """Zeek writes each number least-significant digit first, without padding."""
    if n == 0:
        return "0"
    out = []
    while n >= 3844:
        n, r = divmod(n, 3844)
        out.append(_PAIRS[r])
    out.append(_ALPHABET[n] if n < 62 else _PAIRS[n])
    return "".join(out)


class UidGenerator:
    """Produces uids; one per tracker so no module-level random state is shared."""

    __slots__ = ("_rng",)

    def __init__(self, seed: int | None = None) -> None:
        # Seeded once from the OS (no syscall per uid); uids need uniqueness, not secrecy.
        self._rng = random.Random(seed if seed is not None else os.urandom(16))

    def next(self) -> str:
        """'C' + the top 32 and the low 64 of 96 random bits, each base62 least significant
        digit first (one uid per connection: the digits are made inline, two at a time)."""
        bits = self._rng.getrandbits(96)
        pairs = _PAIRS
        out = ["C"]
        n = bits >> 64
        while n >= 3844:
            out.append(pairs[n % 3844])
            n //= 3844
        out.append(_ALPHABET[n] if n < 62 else pairs[n])
        n = bits & 0xFFFFFFFFFFFFFFFF
        while n >= 3844:
            out.append(pairs[n % 3844])
            n //= 3844
        out.append(_ALPHABET[n] if n < 62 else pairs[n])
        return "".join(out)
