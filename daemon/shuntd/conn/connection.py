"""`Connection`: one tracked flow, endpoint-neutral underneath.

The two endpoints live in `sides[0]` / `sides[1]` in the order of the flow key; which side is
the originator is the single attribute `orig_side`. A packet's direction is computed from its
side and `orig_side` once, before any accounting, so a flip (`flip_roles`) can never leave a
stale direction in a per-side counter. `orig`, `resp`, `orig_h`, ... are views over that.
"""

from __future__ import annotations

from sys import intern
from typing import Any

PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp"}
_INTERN_MAX = 16  # longer histories are rare and mostly unique: not worth a table entry

# One shared int object per common once-only-letter mask (S, F, R, D, A of either side):
# masks with resp bits are above the small-int cache, 32 B per connection otherwise.
_COMMON_BITS = (0x1, 0x2, 0x4, 0x10, 0x20, 0x10000, 0x20000, 0x40000, 0x100000, 0x200000)
_SEEN_MASKS: dict[int, int] = {}
for _i in range(1 << len(_COMMON_BITS)):
    _m = sum(b for n, b in enumerate(_COMMON_BITS) if _i >> n & 1)
    _SEEN_MASKS[_m] = _m
del _i, _m


def history_plus(history: str, code: str) -> str:
    """`history + code`, interned while short: a million connections with the same few
    histories ("ShAD", "ShADadFf", ...) then share a handful of string objects."""
    h = history + code
    return intern(h) if len(h) <= _INTERN_MAX else h


class Connection:
    """Per-connection state shared by every protocol (Zeek's Connection/Session)."""

    # Memory matters (1M connections must fit in 1 GiB): no slot holds what can be derived
    # (proto from key), and empty containers are shared tuples until something is added.
    __slots__ = (
        "_uid", "key", "start_time", "last_time", "orig_side", "side0", "side1",
        "history", "hist_seen", "service", "services", "ext", "thresholds", "rare", "analyzer",
        "removed",
        "inactivity_timeout", "inact_from", "timer_at", "tracker",
    )

    def __init__(self, uid: str | None, key: tuple, start_time: float, orig_side: int,
                 sides: tuple, analyzer: Any, tracker: Any) -> None:
        self._uid = uid               # None: made from tracker.uids on first use
        self.key = key
        self.start_time = start_time
        self.last_time = start_time
        self.orig_side = orig_side
        # The endpoints by side in the flow key (two slots, not a tuple: 48 B less).
        self.side0, self.side1 = sides
        self.history = ""
        self.hist_seen = 0            # once-only letter mask (orig bits, resp bits << 16)
        # Confirmed services in confirmation order; a tuple until service detection adds one.
        self.service: list[str] | tuple[str, ...] = ()
        # Service detection's state (conn/service.py; None when there is none or no more):
        # every connection has one at first, and a slot is cheaper than an `ext` dict.
        self.services: Any = None
        self.ext: dict | None = None  # storage for higher layers; the engine never reads it
        # Pending thresholds (conn/thresholds.py; None until one is set): the bulk policy
        # sets one on every connection, and a slot is cheaper than an `ext` dict entry.
        self.thresholds: Any = None
        # missed_bytes, failed_services, tunnel_parents (properties below): most
        # connections have none, so they share one lazily made object (16 B each).
        self.rare: ConnRare | None = None
        self.analyzer = analyzer      # protocol state (TCP/UDP/ICMP/unknown)
        self.removed = False
        self.inactivity_timeout = 0.0
        # The inactivity check is due at inact_from + inactivity_timeout (None = none): the
        # base is kept, not the sum, because it is a float the connection holds anyway
        # (last_time; 24 B less per connection). The connection has ONE deadline in the
        # timer manager (`timer_at`), no later than its earliest pending check (inactivity
        # or the TCP analyzer's); see ConnTracker.arm().
        self.inact_from: float | None = None
        self.timer_at: float | None = None
        self.tracker = tracker

    def _rare(self) -> ConnRare:
        rare = self.rare
        if rare is None:
            rare = self.rare = ConnRare()
        return rare

    @property
    def missed_bytes(self) -> int:
        return 0 if self.rare is None else self.rare.missed_bytes

    @missed_bytes.setter
    def missed_bytes(self, v: int) -> None:
        if v or self.rare is not None:
            self._rare().missed_bytes = v

    @property
    def failed_services(self) -> list[str] | tuple[str, ...]:
        return () if self.rare is None else self.rare.failed_services

    @failed_services.setter
    def failed_services(self, v: list[str] | tuple[str, ...]) -> None:
        if v or self.rare is not None:
            self._rare().failed_services = v

    @property
    def tunnel_parents(self) -> set[str] | None:
        return None if self.rare is None else self.rare.tunnel_parents

    @tunnel_parents.setter
    def tunnel_parents(self, v: set[str] | None) -> None:
        if v is not None or self.rare is not None:
            self._rare().tunnel_parents = v

    @property
    def uid(self) -> str:
        """Zeek's uid, drawn on first use (most connections need it only when logged; an
        idle table of a million connections does not hold a million strings)."""
        uid = self._uid
        if uid is None:
            uid = self._uid = self.tracker.uids.next()
        return uid

    @property
    def ip_proto(self) -> int:
        return self.key[0]

    @property
    def proto(self) -> str:
        return PROTO_NAMES.get(self.key[0], "unknown_transport")

    # --- orig/resp views -------------------------------------------------------------------
    @property
    def sides(self) -> tuple[Any, Any]:
        """(endpoint, endpoint), index = side in the flow key."""
        return (self.side0, self.side1)

    def endpoint(self, side: int) -> Any:
        return self.side1 if side else self.side0

    @property
    def orig(self) -> Any:
        return self.side1 if self.orig_side else self.side0

    @property
    def resp(self) -> Any:
        return self.side0 if self.orig_side else self.side1

    @property
    def orig_h(self) -> bytes:
        return self.key[1 + 2 * self.orig_side]

    @property
    def orig_p(self) -> int:
        return self.key[2 + 2 * self.orig_side]

    @property
    def resp_h(self) -> bytes:
        return self.key[3 - 2 * self.orig_side]

    @property
    def resp_p(self) -> int:
        return self.key[4 - 2 * self.orig_side]

    # -- L1 (live daemon): Zeek's `c$id` as text, for policies ---------------------------
    @property
    def id(self) -> ConnId:
        return ConnId(self)

    def is_orig(self, src: bytes, sport: int) -> bool:
        return src == self.orig_h and sport == self.orig_p

    @property
    def duration(self) -> float | None:
        """Zeek sets duration only when strictly positive."""
        d = self.last_time - self.start_time
        return d if d > 0 else None

    @property
    def conn_state(self) -> str:
        return self.analyzer.conn_state(self)

    # --- history ---------------------------------------------------------------------------
    def check_history(self, mask: int, code: str) -> bool:
        """Add `code` once per mask bit; True if it had been seen already (Zeek's semantics)."""
        if self.hist_seen & mask:
            return True
        seen = self.hist_seen | mask
        self.hist_seen = _SEEN_MASKS.get(seen, seen)
        self.history = history_plus(self.history, code)
        return False

    def add_history(self, code: str) -> None:
        self.history = history_plus(self.history, code)

    def mark_limit_reached(self) -> None:
        """Zeek's CheckHistory(0x400, 'X'): an analyzer hit a limit (always upper case)."""
        self.check_history(0x400, "X")

    # --- flipping --------------------------------------------------------------------------
    def flip_roles(self, add_caret: bool = True) -> None:
        """Swap orig and resp (Zeek's Connection::FlipRoles); history gets '^'."""
        self.orig_side ^= 1
        self.analyzer.flipped(self)
        if add_caret:
            self.history = history_plus(self.history, "^")
        self.tracker.hooks.connection_flipped(self)

    def __repr__(self) -> str:
        return f"<Connection {self._uid} {self.proto} {self.history!r}>"


class ConnRare:
    """Connection fields few connections ever set (content gaps, failed service analyzers,
    enclosing tunnels)."""

    __slots__ = ("missed_bytes", "failed_services", "tunnel_parents")

    def __init__(self) -> None:
        self.missed_bytes = 0
        self.failed_services: list[str] | tuple[str, ...] = ()
        self.tunnel_parents: set[str] | None = None


class ConnId:
    """`conn.id` view (L1): orig_h/resp_h as text addresses, ports as ints, like Zeek's conn_id."""

    __slots__ = ("orig_h", "orig_p", "resp_h", "resp_p")

    def __init__(self, conn: Connection) -> None:
        from shuntd.conn.record import addr_text

        self.orig_h = addr_text(conn.orig_h)
        self.orig_p = conn.orig_p
        self.resp_h = addr_text(conn.resp_h)
        self.resp_p = conn.resp_p
