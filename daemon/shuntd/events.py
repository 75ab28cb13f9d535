"""The engine's events and hooks, fanned out to the frameworks and to policy handlers.

`EventDispatcher` is the tracker's `EngineHooks`: it feeds service detection, thresholds,
polling, long connections and contents extraction, and calls the handlers registered per event
name (Zeek's event/hook names, spec §7). Policies are plain Python files whose functions are
named after events; `add_handlers(module_or_obj)` picks those up, so the policy layer is a thin
loader and the core never imports a policy. A handler that raises is logged once and disabled
for that event; the engine never dies of a handler.

Events (handler arguments):
  new_connection(conn)                      connection_flipped(conn)
  connection_established(conn)              ssl_established(conn)
  analyzer_confirmation(conn, name)         analyzer_violation(conn, name, reason)
  bytes_threshold_crossed(conn, threshold, is_orig)
  packets_threshold_crossed(conn, threshold, is_orig)
  duration_threshold_crossed(conn, threshold, is_orig)
  generic_packet_threshold_crossed(conn, threshold)
  content_gap(conn, is_orig, nbytes)        long_conn_found(conn)
  connection_state_remove(conn)             connection_logged(conn, row)
Hooks:
  connection_timing_out(conn) -> bool       True from any handler vetoes the removal (Zeek's
                                            `break`); the tracker re-arms the timer.
Removal hooks (`register_removal_hook`) run after the connection_state_remove handlers, i.e.
after the record's inputs are final and before conn.log is written. Timing-out hooks
(`register_timing_out_hook`) are connection_timing_out handlers of one connection, called
before the event's handlers: the shunt manager vetoes the removal of its own connections
without a call on every other connection's expiry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from shuntd.conn.contents import ContentsExtractor
from shuntd.conn.hooks import EngineHooks
from shuntd.conn.long import LongConnections, LongConnSettings
from shuntd.conn.polling import ConnPolling, PollCallback
from shuntd.conn.record import conn_record
from shuntd.conn.service import ServiceDetection, ServiceSettings
from shuntd.conn.thresholds import BYTES, DURATION, PACKETS, ThresholdManager
from shuntd.policy import Actions, get_target, new_target

log = logging.getLogger(__name__)

EVENTS: tuple[str, ...] = (
    "new_connection", "connection_flipped", "connection_established", "ssl_established",
    "analyzer_confirmation", "analyzer_violation",
    "bytes_threshold_crossed", "packets_threshold_crossed", "duration_threshold_crossed",
    "generic_packet_threshold_crossed", "content_gap", "long_conn_found",
    "connection_state_remove", "connection_logged",
)
HOOKS: tuple[str, ...] = ("connection_timing_out",)
NAMES: frozenset[str] = frozenset(EVENTS + HOOKS)

REMOVAL_HOOKS_KEY = "removal_hooks"
TIMING_OUT_HOOKS_KEY = "timing_out_hooks"
_THRESHOLD_EVENTS = {BYTES: "bytes_threshold_crossed", PACKETS: "packets_threshold_crossed",
                     DURATION: "duration_threshold_crossed"}

Handler = Callable[..., Any]
RemovalHook = Callable[[Any], Any]
TimingOutHook = Callable[[Any], bool]


def _live_record(conn: Any) -> tuple:
    """The conn.log record as of now (live conn_state, duration, sizes)."""
    return conn_record(conn, conn.tracker.local_nets)


class _ServiceSink:
    """Receives service-detection results for the dispatcher."""

    __slots__ = ("dispatcher",)

    def __init__(self, dispatcher: EventDispatcher) -> None:
        self.dispatcher = dispatcher

    def service_confirmed(self, conn: Any, name: str) -> None:
        # (notify, inline: most connections confirm a service, few policies listen)
        d = self.dispatcher
        handlers = d._handlers.get("analyzer_confirmation")
        if handlers:
            d._call("analyzer_confirmation", handlers, (conn, name))

    def service_violation(self, conn: Any, name: str, reason: str) -> None:
        self.dispatcher.notify("analyzer_violation", conn, name, reason)

    def ssl_established(self, conn: Any) -> None:
        d = self.dispatcher   # (notify_conn, inline: every TLS session's shunt starts here)
        handlers = d._handlers.get("ssl_established")
        if handlers:
            d._run1("ssl_established", handlers, conn)

    def flip_roles(self, conn: Any) -> None:
        conn.flip_roles()

    def set_inactivity_timeout(self, conn: Any, seconds: float) -> None:
        conn.tracker.set_inactivity_timeout(conn, seconds)


class EventDispatcher(EngineHooks):
    """Engine hooks -> frameworks -> handlers registered per event name.

    `long_connections` enables conn_long.log: `write_long_row(row)` writes one record and
    `record(conn)` builds it (default: conn.log's `conn_record` with the tracker's local
    nets). `contents` enables contents extraction.
    `actions` is the target of the policy actions (`shuntd.policy`) while handlers run: set
    around every dispatch, so an action called anywhere else raises `PolicyError`.
    """

    def __init__(
        self,
        *,
        service_settings: ServiceSettings | None = None,
        generic_packet_thresholds: Iterable[int] = (),
        long_connections: LongConnSettings | None = None,
        record: Callable[[Any], tuple] | None = None,
        write_long_row: Callable[[tuple], None] | None = None,
        contents: ContentsExtractor | None = None,
        actions: Actions | None = None,
    ) -> None:
        # Tuples, replaced on change: a dispatch iterates one without copying it.
        self._handlers: dict[str, tuple[Handler, ...]] = {}
        self._failed: set[tuple[str, int]] = set()
        self.services = ServiceDetection(_ServiceSink(self), service_settings)
        self.thresholds = ThresholdManager(self._threshold_crossed, self._generic_crossed,
                                           tuple(generic_packet_thresholds))
        self.contents = contents
        self.actions = actions
        self._polling: ConnPolling | None = None
        self._long_settings = long_connections
        self._long: LongConnections | None = None
        if long_connections is not None and write_long_row is None:
            raise ValueError("long connections need write_long_row=")
        self._record = record or _live_record
        self._write_long_row = write_long_row
        # The tracker calls `packet` for every packet: straight to the thresholds, without
        # the method below in between (it stays, so the tracker knows the hook is wanted);
        # `udp_payload` for every UDP datagram: straight to service detection.
        # Likewise the policies' threshold actions (the bulk policy sets one on every
        # connection).
        self.packet = self.thresholds.packet  # type: ignore[method-assign]
        self.udp_payload = self.services.udp_payload  # type: ignore[method-assign]
        self.set_bytes_threshold = (  # type: ignore[method-assign]
            self.thresholds.set_bytes_threshold)
        self.set_packets_threshold = (  # type: ignore[method-assign]
            self.thresholds.set_packets_threshold)
        self.set_packets_thresholds = (  # type: ignore[method-assign]
            self.thresholds.set_packets_thresholds)
        # The handlers of the events every connection raises, kept up to date by
        # _handlers_changed(): a connection's hooks test one attribute, not the dict.
        self._on_new_connection: tuple[Handler, ...] = ()
        self._on_timing_out: tuple[Handler, ...] = ()
        self._on_state_remove: tuple[Handler, ...] = ()
        self._on_logged: tuple[Handler, ...] = ()

    # -- handler registry ----------------------------------------------------------------

    def add_handler(self, event: str, handler: Handler) -> None:
        if event not in NAMES:
            raise ValueError(f"unknown event {event!r}; known: {', '.join(sorted(NAMES))}")
        self._handlers[event] = self._handlers.get(event, ()) + (handler,)
        self._handlers_changed()

    def add_handlers(self, source: Any) -> list[str]:
        """Register every callable of `source` (module, object or mapping) named after an
        event; returns the event names found."""
        found = []
        for name in sorted(NAMES):
            if isinstance(source, Mapping):
                fn = source.get(name)
            else:
                fn = getattr(source, name, None)
            if callable(fn):
                self.add_handler(name, fn)
                found.append(name)
        return found

    def remove_handler(self, event: str, handler: Handler) -> None:
        handlers = self._handlers.get(event)
        if handlers and handler in handlers:
            i = handlers.index(handler)
            self._handlers[event] = handlers[:i] + handlers[i + 1:]
            self._handlers_changed()

    def _handlers_changed(self) -> None:
        get = self._handlers.get
        self._on_new_connection = get("new_connection", ())
        self._on_timing_out = get("connection_timing_out", ())
        self._on_state_remove = get("connection_state_remove", ())
        self._on_logged = get("connection_logged", ())

    def dispatch(self, event: str, *args: Any) -> list[Any]:
        """Call the handlers of `event` in registration order; returns their results."""
        handlers = self._handlers.get(event)
        if not handlers:
            return []
        return self._call(event, handlers, args)

    def notify(self, event: str, *args: Any) -> None:
        """dispatch, for the engine's events: their results are not wanted."""
        handlers = self._handlers.get(event)
        if handlers:
            self._call(event, handlers, args)

    def notify_conn(self, event: str, conn: Any) -> None:
        """notify, for the events whose one argument is the connection."""
        handlers = self._handlers.get(event)
        if handlers:
            self._run1(event, handlers, conn)

    # The two dispatch loops below make `self.actions` the policy actions' target for the
    # whole dispatch (not per handler), inline: `shuntd.policy.Target`.

    def _call(self, event: str, handlers: tuple[Handler, ...], args: tuple) -> list[Any]:
        results: list[Any] = []
        target = get_target(None) or new_target()
        prev = target.actions
        target.actions = self.actions
        try:
            for handler in handlers:
                try:
                    results.append(handler(*args))
                except Exception:
                    self._disable(event, handler)
        finally:
            target.actions = prev
        return results

    def _run1(self, event: str, handlers: tuple[Handler, ...], conn: Any) -> None:
        """_call of the events every connection raises, with their one argument: a plain
        call is cheaper than `handler(*args)`."""
        target = get_target(None) or new_target()
        prev = target.actions
        target.actions = self.actions
        try:
            for handler in handlers:
                try:
                    handler(conn)
                except Exception:
                    self._disable(event, handler)
        finally:
            target.actions = prev

    def _disable(self, event: str, handler: Handler) -> None:
        """A handler raised (the exception is being handled): log it once, drop it."""
        log.exception("handler %s for event %s raised; it is disabled for this "
                      "event", getattr(handler, "__qualname__", handler), event)
        self.remove_handler(event, handler)

    # -- framework API for policies ------------------------------------------------------

    def set_bytes_threshold(self, conn: Any, threshold: int, is_orig: bool) -> bool:
        return self.thresholds.set_bytes_threshold(conn, threshold, is_orig)

    def set_packets_threshold(self, conn: Any, threshold: int, is_orig: bool) -> bool:
        return self.thresholds.set_packets_threshold(conn, threshold, is_orig)

    def set_packets_thresholds(self, conn: Any, threshold: int) -> bool:
        """set_packets_threshold for both directions."""
        return self.thresholds.set_packets_thresholds(conn, threshold)

    def set_duration_threshold(self, conn: Any, seconds: float) -> bool:
        return self.thresholds.set_duration_threshold(conn, seconds,
                                                      self._polling_for(conn).timers.now)

    def watch(self, conn: Any, callback: PollCallback, cnt: int, interval: float) -> None:
        """ConnPolling::watch in network time."""
        self._polling_for(conn).watch(conn, callback, cnt, interval)

    def extract_contents(self, conn: Any, orig: bool = True, resp: bool = True) -> list[str]:
        if self.contents is None:
            return []
        return self.contents.extract(conn, orig, resp)

    @staticmethod
    def register_removal_hook(conn: Any, hook: RemovalHook) -> bool:
        """False if `hook` was registered already (Conn::register_removal_hook)."""
        return _add_conn_hook(conn, REMOVAL_HOOKS_KEY, hook)

    @staticmethod
    def register_timing_out_hook(conn: Any, hook: TimingOutHook) -> bool:
        """A connection_timing_out handler for `conn` alone; False if registered already."""
        return _add_conn_hook(conn, TIMING_OUT_HOOKS_KEY, hook)

    @staticmethod
    def unregister_removal_hook(conn: Any, hook: RemovalHook) -> bool:
        hooks = conn.ext.get(REMOVAL_HOOKS_KEY) if conn.ext else None
        if not hooks or hook not in hooks:
            return False
        hooks.remove(hook)
        return True

    # -- EngineHooks -----------------------------------------------------------------------

    def new_connection(self, conn: Any) -> None:
        self.services.new_connection(conn)
        long = self._long
        if long is None and self._long_settings is not None:
            long = self._long_for(conn)
        if long is not None:
            long.new_connection(conn)
        handlers = self._on_new_connection
        if handlers:
            self._run1("new_connection", handlers, conn)

    def connection_flipped(self, conn: Any) -> None:
        self.notify_conn("connection_flipped", conn)

    def connection_established(self, conn: Any) -> None:
        handlers = self._handlers.get("connection_established")   # (notify_conn, inline)
        if handlers:
            self._run1("connection_established", handlers, conn)
        if self.contents is not None:          # contents.zeek runs at priority -5
            self.contents.connection_established(conn)

    def packet(self, conn: Any, pkt: Any, is_orig: bool) -> None:
        self.thresholds.packet(conn, pkt, is_orig)

    @property
    def wants_stream(self) -> bool:
        """Whether anybody reads TCP payload (the tracker skips copying it otherwise)."""
        return not self.services.off or self.contents is not None

    def udp_payload(self, conn: Any, is_orig: bool, payload: memoryview) -> None:
        self.services.udp_payload(conn, is_orig, payload)

    def tcp_deliver(self, conn: Any, is_orig: bool, data: bytes) -> None:
        self.services.tcp_deliver(conn, is_orig, data)
        if self.contents is not None:
            self.contents.deliver(conn, is_orig, data)

    def content_gap(self, conn: Any, is_orig: bool, nbytes: int) -> None:
        self.services.content_gap(conn, is_orig, nbytes)
        if self.contents is not None:
            self.contents.gap(conn, is_orig, nbytes)
        self.notify("content_gap", conn, is_orig, nbytes)

    def connection_timing_out(self, conn: Any) -> bool:
        vetoed = False
        hooks = conn.ext.get(TIMING_OUT_HOOKS_KEY) if conn.ext else None
        if hooks:
            for hook in tuple(hooks):
                try:
                    vetoed = bool(hook(conn)) or vetoed
                except Exception:
                    log.exception("timing-out hook %s raised",
                                  getattr(hook, "__qualname__", hook))
        handlers = self._on_timing_out
        if handlers:
            return any(self._call("connection_timing_out", handlers, (conn,))) or vetoed
        return vetoed

    def connection_state_remove(self, conn: Any) -> None:
        handlers = self._on_state_remove
        if handlers:
            self._run1("connection_state_remove", handlers, conn)
        ext = conn.ext
        hooks = ext.get(REMOVAL_HOOKS_KEY) if ext else None
        if hooks:
            for hook in list(hooks):
                try:
                    hook(conn)
                except Exception:
                    log.exception("removal hook %s raised", getattr(hook, "__qualname__", hook))
        if self.contents is not None:
            self.contents.close(conn)
        if self._polling is not None:  # pending polls would keep the connection in memory
            self._polling.forget(conn)
        if self._long is not None:
            self._long.forget(conn)

    def connection_logged(self, conn: Any, row: tuple) -> None:
        handlers = self._on_logged
        if handlers:
            self._call("connection_logged", handlers, (conn, row))

    # -- internals -----------------------------------------------------------------------

    def _threshold_crossed(self, kind: str, conn: Any, threshold: float, is_orig: bool) -> None:
        event = _THRESHOLD_EVENTS[kind]
        handlers = self._handlers.get(event)
        if handlers:
            self._call(event, handlers, (conn, threshold, is_orig))

    def _generic_crossed(self, conn: Any, threshold: int) -> None:
        self.notify("generic_packet_threshold_crossed", conn, threshold)

    def _polling_for(self, conn: Any) -> ConnPolling:
        """Polling runs on the tracker's timers (known from the first connection)."""
        if self._polling is None:
            self._polling = ConnPolling(conn.tracker.timers)
        return self._polling

    def _long_for(self, conn: Any) -> LongConnections:
        if self._long is None:
            assert self._long_settings is not None and self._write_long_row is not None
            self._long = LongConnections(self._long_settings, self._polling_for(conn),
                                         self._record, self._write_long_row,
                                         lambda c: self.notify_conn("long_conn_found", c))
        return self._long


def _add_conn_hook(conn: Any, key: str, hook: Callable[..., Any]) -> bool:
    """Add `hook` to the list `key` of `conn.ext`; False if it is there already."""
    ext = conn.ext
    if ext is None:
        conn.ext = ext = {}
    hooks = ext.setdefault(key, [])
    if hook in hooks:
        return False
    hooks.append(hook)
    return True
