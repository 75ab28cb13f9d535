"""Engine hooks: the points where higher layers (events.py, E3) see connections.

Interface notes for E3 (changes to engine-iface.md are listed here first):
- `udp_payload(conn, is_orig, payload)` is called for every checksum-valid UDP packet BEFORE
  ConnSize counts it, like Zeek's port-registered analyzers; a DNS/NTP flip done there
  (`conn.flip_roles()`) reproduces Zeek's attribution (spec §3.4). `packet(...)` follows,
  after the accounting, for every protocol.
- `tcp_deliver` gets the in-order stream of one direction; `content_gap` the holes.
- `connection_timing_out` returning True vetoes removal (the check re-arms `timeout` later).
- Flips: `conn.flip_roles()` swaps orig/resp; `connection_flipped` is called for every flip,
  including first-packet flips (which happen before `new_connection`, as in Zeek).
- `conn.ext` is yours (dict or None); the engine never reads it.
- The tracker exposes `tracker.timers` (`schedule(when, cb, at_termination=False, arg=None)`:
  cb(now), or cb(arg, now) when arg is given) and `tracker.set_inactivity_timeout(conn, secs)`.
- `tick`, `packet` and `tcp_deliver` are only called when a subclass overrides them (the
  tracker skips no-op calls and the payload copy on the hot path).
- Overriding `connection_reset` / `connection_partial_close` arms Zeek's ResetTimer /
  PartialCloseTimer, which Zeek schedules only when a script handles those events; they
  change when such connections are removed (`tcp_reset_delay`, `tcp_partial_close_delay`).

All methods are no-ops here; subclass and override what you need. The tracker calls them
synchronously from the packet path, so they must be cheap and must not raise (the tracker
does not catch exceptions on the hot path).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shuntd.conn.connection import Connection
    from shuntd.packet import Packet


class EngineHooks:
    """No-op base; the tracker calls these in Zeek's event order."""

    def new_connection(self, conn: Connection) -> None:
        """A connection was created by `conn`'s first packet (after any first-packet flip)."""

    def connection_flipped(self, conn: Connection) -> None:
        """orig and resp were swapped."""

    def connection_established(self, conn: Connection) -> None:
        """TCP: the responder answered with a SYN(-ACK) (Zeek's connection_established)."""

    def packet(self, conn: Connection, pkt: Packet, is_orig: bool) -> None:
        """A valid packet was accounted (all protocols)."""

    def udp_payload(self, conn: Connection, is_orig: bool, payload: memoryview) -> None:
        """A checksum-valid UDP datagram, before ConnSize counts it (app-layer flips here)."""

    def tcp_deliver(self, conn: Connection, is_orig: bool, data: bytes) -> None:
        """TCP payload in sequence order, as Zeek's reassembler delivers it."""

    def content_gap(self, conn: Connection, is_orig: bool, nbytes: int) -> None:
        """The reassembler skipped `nbytes` never seen in this direction."""

    def connection_reset(self, conn: Connection) -> None:
        """TCP: an endpoint reset the connection (Zeek's connection_reset). Overriding it
        also arms Zeek's ResetTimer (`tcp_reset_delay`), as a Zeek handler would."""

    def connection_partial_close(self, conn: Connection) -> None:
        """TCP: one side closed first thing and the other never closed within
        `tcp_partial_close_delay`. Overriding it arms Zeek's PartialCloseTimer."""

    def connection_timing_out(self, conn: Connection) -> bool:
        """Inactivity expired; return True to keep the connection (veto)."""
        return False

    def connection_state_remove(self, conn: Connection) -> None:
        """The connection is being removed; the record is computed right after this."""

    def connection_logged(self, conn: Connection, row: tuple) -> None:
        """The conn.log row (CONN_FIELDS order) was produced."""

    def tick(self, now: float) -> None:
        """Network time advanced to `now` (called once per packet, before it is processed)."""
