"""The actions a policy may call: `shunt`, `shunt_ip_pair`, `unshunt` and thresholds.

A policy is a plain Python file with functions named after the engine's events; it imports
only this module. The actions act on whatever runs the engine (the live daemon's shunt table,
or the offline engine), which installs an `Actions` implementation for the duration of each
event dispatch (`EventDispatcher(actions=...)`, or `with acting(actions):`). Calling an action
outside an event handler raises `PolicyError` instead of silently doing nothing.
"""

from __future__ import annotations

import contextvars
from typing import Any, Protocol


class PolicyError(RuntimeError):
    """An action was called where no engine is listening (outside an event handler)."""


class Actions(Protocol):
    """What the engine behind a policy must offer. Results are strings such as `ok`, `exists`,
    `full`, `error`, so a policy can log them without importing anything else."""

    def shunt(self, conn: Any, trigger: str) -> str: ...

    def shunt_ip_pair(
        self, addr1: str, addr2: str, trigger: str, duration: float | None
    ) -> str: ...

    def unshunt(self, conn: Any) -> bool: ...

    def set_bytes_threshold(self, conn: Any, nbytes: int, is_orig: bool) -> bool: ...

    def set_packets_threshold(self, conn: Any, npackets: int) -> bool: ...


_ACTIONS: contextvars.ContextVar[Actions] = contextvars.ContextVar("shuntd_policy_actions")

# For the dispatcher, which installs its target around every dispatch inline (the bulk policy
# acts on every connection): `token = install_actions(actions)` ... `restore_actions(token)`,
# the context variable's own methods, no Python call in between.
install_actions = _ACTIONS.set
restore_actions = _ACTIONS.reset


class acting:  # noqa: N801 - used like the function it replaces: `with acting(actions):`
    """Make `actions` the target of the module-level functions below inside a `with` block.

    A plain context manager rather than a generator, and reusable and reentrant (a handler
    may cause another dispatch). The dispatcher does the same inline (its `actions`).
    """

    __slots__ = ("actions", "tokens")

    def __init__(self, actions: Actions) -> None:
        self.actions = actions
        self.tokens: list[contextvars.Token[Actions]] = []

    def __enter__(self) -> None:
        self.tokens.append(_ACTIONS.set(self.actions))

    def __exit__(self, *exc: object) -> None:
        _ACTIONS.reset(self.tokens.pop())


def _no_actions() -> PolicyError:
    return PolicyError("policy actions can only be called from an event handler")


# Each action looks its target up inline (`_get(None)`, no helper call): the bulk policy's
# set_packets_threshold runs for every connection.
_get = _ACTIONS.get


def shunt(conn: Any, trigger: str) -> str:
    """Stop analysing `conn`: XDP drops and counts its packets from now on."""
    actions = _get(None)
    if actions is None:
        raise _no_actions()
    return actions.shunt(conn, trigger)


def shunt_ip_pair(addr1: str, addr2: str, trigger: str, duration: float | None = None) -> str:
    """Shunt every packet between two addresses (any protocol, any port), for `duration`
    seconds or until removed."""
    actions = _get(None)
    if actions is None:
        raise _no_actions()
    return actions.shunt_ip_pair(addr1, addr2, trigger, duration)


def unshunt(conn: Any) -> bool:
    """Analyse `conn` again; its shunted counters so far stay with the connection."""
    actions = _get(None)
    if actions is None:
        raise _no_actions()
    return actions.unshunt(conn)


def set_bytes_threshold(conn: Any, nbytes: int, is_orig: bool) -> bool:
    """Raise `bytes_threshold_crossed(conn, threshold, is_orig)` once the direction's IP bytes
    reach `nbytes` (Zeek's ConnThreshold semantics)."""
    actions = _get(None)
    if actions is None:
        raise _no_actions()
    return actions.set_bytes_threshold(conn, nbytes, is_orig)


def set_packets_threshold(conn: Any, npackets: int) -> bool:
    """Raise `packets_threshold_crossed(conn, threshold, is_orig)` when a direction has sent
    `npackets` packets (both directions are watched; each fires once)."""
    actions = _get(None)
    if actions is None:
        raise _no_actions()
    return actions.set_packets_threshold(conn, npackets)
