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


class Target:
    """Where the actions of one context (thread) go: `actions` while a handler runs, None
    otherwise. Made once per context and then only changed in place: a dispatch sets and
    restores one attribute instead of setting and resetting a context variable (whose
    set/reset pair costs more than the rest of a dispatch: the bulk policy acts on every
    connection)."""

    __slots__ = ("actions",)

    def __init__(self) -> None:
        self.actions: Actions | None = None


_TARGET: contextvars.ContextVar[Target] = contextvars.ContextVar("shuntd_policy_target")
_NO_TARGET = Target()  # what a context without a Target reads (never changed)

# For the dispatcher, inline around every dispatch:
#     target = get_target(None) or new_target()
#     prev, target.actions = target.actions, actions ... finally: target.actions = prev
get_target = _TARGET.get


def new_target() -> Target:
    """The current context's Target (made the first time)."""
    target = _TARGET.get(None)
    if target is None:
        target = Target()
        _TARGET.set(target)
    return target


class acting:  # noqa: N801 - used like the function it replaces: `with acting(actions):`
    """Make `actions` the target of the module-level functions below inside a `with` block.

    A plain context manager rather than a generator, and reusable and reentrant (a handler
    may cause another dispatch). The dispatcher does the same inline (its `actions`).
    """

    __slots__ = ("actions", "saved")

    def __init__(self, actions: Actions) -> None:
        self.actions = actions
        self.saved: list[tuple[Target, Actions | None]] = []

    def __enter__(self) -> None:
        target = new_target()
        self.saved.append((target, target.actions))
        target.actions = self.actions

    def __exit__(self, *exc: object) -> None:
        target, prev = self.saved.pop()
        target.actions = prev


def _no_actions() -> PolicyError:
    return PolicyError("policy actions can only be called from an event handler")


# Each action looks its target up inline (no helper call): the bulk policy's
# set_packets_threshold runs for every connection.
_get = _TARGET.get


def shunt(conn: Any, trigger: str) -> str:
    """Stop analysing `conn`: XDP drops and counts its packets from now on."""
    actions = _get(_NO_TARGET).actions
    if actions is None:
        raise _no_actions()
    return actions.shunt(conn, trigger)


def shunt_ip_pair(addr1: str, addr2: str, trigger: str, duration: float | None = None) -> str:
    """Shunt every packet between two addresses (any protocol, any port), for `duration`
    seconds or until removed."""
    actions = _get(_NO_TARGET).actions
    if actions is None:
        raise _no_actions()
    return actions.shunt_ip_pair(addr1, addr2, trigger, duration)


def unshunt(conn: Any) -> bool:
    """Analyse `conn` again; its shunted counters so far stay with the connection."""
    actions = _get(_NO_TARGET).actions
    if actions is None:
        raise _no_actions()
    return actions.unshunt(conn)


def set_bytes_threshold(conn: Any, nbytes: int, is_orig: bool) -> bool:
    """Raise `bytes_threshold_crossed(conn, threshold, is_orig)` once the direction's IP bytes
    reach `nbytes` (Zeek's ConnThreshold semantics)."""
    actions = _get(_NO_TARGET).actions
    if actions is None:
        raise _no_actions()
    return actions.set_bytes_threshold(conn, nbytes, is_orig)


def set_packets_threshold(conn: Any, npackets: int) -> bool:
    """Raise `packets_threshold_crossed(conn, threshold, is_orig)` when a direction has sent
    `npackets` packets (both directions are watched; each fires once)."""
    actions = _get(_NO_TARGET).actions
    if actions is None:
        raise _no_actions()
    return actions.set_packets_threshold(conn, npackets)
