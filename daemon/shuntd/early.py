"""Early shunts' switch in XDP's config: on while a loaded policy declares EARLY_SHUNT.

With early shunts XDP follows the TLS handshakes on one port itself and shunts each session
on the packet that completes it (bpf/shuntd.h, "Early shunts"), so a daemon that lags behind
does not get every packet between that one and its own shunt. Only a policy that shunts every
TLS session at ssl_established with one trigger may ask for it (`EARLY_SHUNT = "ssl"`,
policyfile.py); the daemon adopts each such entry when its own analyser gets there
(shunting.py).

XDP does so only until `early_until_ns` (map time): the process that owns the config (the
single process, or the parent of --workers) pushes it forward every lease/3, so a dead daemon
stops new early shunts within one lease (the dead-man switch), and the entries XDP made lapse
like any other. It is turned off (port 0) at shutdown and when a reload drops the declaration.

The same process reads the ring buffer, so it also sees every EARLY event: an entry nobody
adopted and no packet came for after its lease would stay in the map with no LEASE_EXPIRED
event to tell of it, so each one is looked at again once its lease (and a margin) passed
(`sweep`), and taken as orphaned if its lease ran out unrenewed (ShuntManager.reap_early).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import Any

from shuntd.datapath.ring import EarlyEvent
from shuntd.shunting import EARLY_REAP_MARGIN, trigger_code

log = logging.getLogger("shuntd")


class EarlySwitch:
    """Sets, renews and clears the early-shunt fields of one program's config."""

    def __init__(self, prog: Any, port: int, lease_seconds: float) -> None:
        self.prog = prog
        self.port = port
        self.lease_ns = int(lease_seconds * 1e9)
        self.renew_every = lease_seconds / 3
        self.trigger: str | None = None  # the declared trigger while on
        self.next_renew = 0.0
        self.written = False  # the config was set by us at least once
        self.lease_seconds = lease_seconds
        # (monotonic time to look again, key bytes) of each early shunt XDP reported, in order
        self.made: collections.deque[tuple[float, bytes]] = collections.deque()
        self.told_port_off = False

    @property
    def on(self) -> bool:
        return self.trigger is not None

    def declare(self, trigger: str | None) -> None:
        """The loaded policies' EARLY_SHUNT trigger (None: no policy declares one). The first
        call always writes the config (a pinned config of an earlier run may still be on)."""
        if trigger is not None and not self.port:
            if not self.told_port_off:
                self.told_port_off = True
                log.info("early shunts off (--early-port 0), although a policy declares "
                         "EARLY_SHUNT = %r", trigger)
            trigger = None
        if trigger == self.trigger and self.written:
            return
        if trigger is None:
            was_on = self.trigger is not None
            self.off()
            if was_on:
                log.info("early shunts off: no loaded policy declares EARLY_SHUNT any more")
            return
        self.trigger = trigger
        self._push()
        log.info("early shunts on: XDP follows TLS handshakes on port %d and shunts them at "
                 "ssl_established (trigger %s)", self.port, trigger)

    def tick(self) -> None:
        """Push the deadline forward when due (call from the loop)."""
        if self.trigger is not None and time.monotonic() >= self.next_renew:
            self._push()

    def note(self, events: list[Any]) -> None:
        """Ring events just read: remember the early shunts among them."""
        again = time.monotonic() + self.lease_seconds + EARLY_REAP_MARGIN
        made = self.made
        for ev in events:
            if type(ev) is EarlyEvent:
                made.append((again, ev.key_bytes))

    def sweep(self, reap: Callable[[bytes], bool]) -> int:
        """Hand each early shunt whose lease has had time to run out to `reap` (which takes it
        only if nobody renewed it); returns how many it took."""
        made = self.made
        if not made:
            return 0
        now = time.monotonic()
        n = 0
        while made and made[0][0] <= now:
            n += reap(made.popleft()[1])
        return n

    def _push(self) -> None:
        assert self.trigger is not None
        until = self.prog.map_now_ns() + self.lease_ns
        self.prog.set_early(self.port, trigger_code(self.trigger), self.lease_ns, until)
        self.written = True
        self.next_renew = time.monotonic() + self.renew_every

    def off(self) -> None:
        """XDP makes no more early shunts (its entries stay until adopted or reaped)."""
        self.trigger = None
        self.prog.set_early(0)
        self.written = True
