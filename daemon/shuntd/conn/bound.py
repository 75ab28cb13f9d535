"""A bound on tracked connections (`--max-connections`): evict the longest-inactive ones.

Zeek tracks connections without a limit; a sensor facing a scan or a SYN flood needs one, or its
memory grows until the kernel kills it. When a new connection would go past the bound, the
connections that have been inactive longest are removed exactly as an inactivity timeout
removes them (state_remove hooks, which end a shunt and merge its counters, then the conn.log
record), so an eviction loses no record. Evictions come in batches of 1% of the bound: one
scan of the table per batch instead of one per new connection.
"""

from __future__ import annotations

import heapq
import logging
from operator import attrgetter
from typing import Any

log = logging.getLogger("shuntd.conn.bound")

DEFAULT_MAX_CONNECTIONS = 1_000_000
EPISODE_GAP = 60.0  # seconds of network time without an eviction that end an episode
_last_time = attrgetter("last_time")


class ConnBound:
    """Eviction state of one tracker: the limit, and how many connections were evicted."""

    __slots__ = ("limit", "batch", "evicted", "episodes", "_episode_evicted", "_last_eviction")

    def __init__(self, limit: int = DEFAULT_MAX_CONNECTIONS) -> None:
        if limit < 1:
            raise ValueError(f"max connections must be >= 1, not {limit}")
        self.limit = limit
        self.batch = max(1, limit // 100)
        self.evicted = 0           # total, for the metric
        self.episodes = 0
        self._episode_evicted = 0
        self._last_eviction: float | None = None

    def make_room(self, tracker: Any) -> int:
        """Remove the longest-inactive connections so the table is one batch below the bound.
        Called by the tracker before it adds a connection to a full table."""
        conns = tracker.conns
        excess = len(conns) - self.limit + self.batch
        if excess <= 0:
            return 0
        now = tracker.network_time
        if self._last_eviction is None or now - self._last_eviction > EPISODE_GAP:
            if self._episode_evicted:
                log.info("connection bound: previous episode evicted %d connections",
                         self._episode_evicted)
            self.episodes += 1
            self._episode_evicted = 0
            log.warning("connection bound hit (%d tracked): evicting the longest-inactive "
                        "connections to conn.log as on timeout; further evictions are "
                        "counted (shuntd_connections_evicted_total), not logged", self.limit)
        self._last_eviction = now
        victims = heapq.nsmallest(excess, conns.values(), key=_last_time)
        for conn in victims:
            tracker.remove(conn)
        self.evicted += len(victims)
        self._episode_evicted += len(victims)
        return len(victims)
