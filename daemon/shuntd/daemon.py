"""Live mode, `shuntd --iface IFACE`: datapath + capture ring + engine + policies, one loop.

One process, one loop: read what XDP passed from the capture ring, decode it into the
ConnTracker, apply FIN/RST ring events to shunted connections, renew leases, and advance
network time with the wall clock when the link is quiet (Zeek does so after 100 ms idle) so
connections time out. Signals only set flags; the loop acts on them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

log = logging.getLogger("shuntd")

IDLE_ADVANCE = 0.1   # seconds without packets before network time follows the wall clock
CALIBRATE_EVERY = 60.0
MAX_BATCH = 4096     # frames per loop turn, so ring events and timers are not starved
LOG_CLOSE_RETRY = 5.0  # seconds a stop waits for a full disk before giving up on held records


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return v


def add_live_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("live mode")
    g.add_argument("-i", "--iface", default=None, metavar="IFACE",
                   help="capture and shunt on this interface (live mode, needs root)")
    g.add_argument("--policy", action="append", default=[], metavar="PATH",
                   help="policy file or shipped policy name (repeatable; default: tls, bulk)")
    g.add_argument("--lease", type=_positive, default=30.0, metavar="SECS",
                   help="lease of a shunt entry; renewed every lease/3 (30)")
    g.add_argument("--shunted-inactivity-timeout", type=_positive, default=60.0,
                   metavar="SECS", help="keep a shunted connection while XDP sees traffic "
                   "for it within this time (60)")
    g.add_argument("--xdp-mode", choices=("auto", "native", "generic"), default="auto")
    g.add_argument("--ring-blocks", type=int, default=64, metavar="N",
                   help="capture ring blocks of 1 MiB (64)")
    g.add_argument("--flows-max", type=int, default=None, metavar="N",
                   help="size of the flow shunt map (compile-time default)")
    g.add_argument("--metrics-addr", type=_metrics_addr, default="127.0.0.1:9450",
                   metavar="HOST:PORT", help="serve Prometheus metrics here; `none` turns "
                   "them off (127.0.0.1:9450)")


def _metrics_addr(text: str) -> str:
    from shuntd.metrics import MetricsAddrError, parse_metrics_addr

    try:
        parse_metrics_addr(text)
    except MetricsAddrError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), addr)
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", state, exc)


class _Flags:
    __slots__ = ("stop", "reload")

    def __init__(self) -> None:
        self.stop = False
        self.reload = False


class _PolicySet:
    """The loaded policies' handlers, registered on the dispatcher; swapped on SIGHUP."""

    def __init__(self, dispatcher: Any, specs: list[str], options: Any) -> None:
        self.dispatcher = dispatcher
        self.specs = specs
        self.options = options
        self.registered: list[tuple[str, Any]] = []

    def load(self) -> None:
        """Raises PolicyLoadError; the current set stays as it was then."""
        from shuntd.events import EVENTS, HOOKS
        from shuntd.policyfile import load_all

        policies = load_all(self.specs, EVENTS + HOOKS, self.options)
        for ev, fn in self.registered:
            self.dispatcher.remove_handler(ev, fn)
        self.registered = []
        for p in policies:
            for ev, fn in sorted(p.handlers.items()):
                self.dispatcher.add_handler(ev, fn)
                self.registered.append((ev, fn))
        log.info("policies loaded: %s", ", ".join(p.name for p in policies))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="shuntd: %(levelname)s %(message)s")
    from shuntd.cli import settings_from_args
    from shuntd.policyfile import PolicyLoadError

    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"shuntd: {exc}", file=sys.stderr)
        return 2
    from shuntd.logs.zeek import LogSpaceError

    try:
        return _run(args, settings)
    except LogSpaceError as exc:  # disk full past --log-hold-max: stop loudly (logs/zeek.py)
        print(f"shuntd: {exc}", file=sys.stderr)
        return 1
    except PolicyLoadError as exc:
        print(f"shuntd: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"shuntd: {exc.strerror or exc}: {getattr(exc, 'filename', '') or ''}",
              file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, settings: Any) -> int:
    from pathlib import Path

    from shuntd import policy
    from shuntd.capture.ring import CaptureError, CaptureRing, RingConfig
    from shuntd.conn.record import CONN_FIELDS, SHUNT_CONN_FIELDS
    from shuntd.conn.tracker import ConnTracker
    from shuntd.datapath.errors import DatapathError
    from shuntd.datapath.loader import open_datapath
    from shuntd.defrag import Defragmenter
    from shuntd.eventopts import dispatcher_from_args
    from shuntd.logs.zeek import LogSchema, LogSpaceError, open_log
    from shuntd.metrics import (
        Metrics,
        MetricSources,
        MetricsServer,
        capture_sources,
        datapath_sources,
        serve_metrics,
    )
    from shuntd.packet import decode
    from shuntd.policyfile import PolicyLoadError
    from shuntd.shunting import SHUNT_LOG_FIELDS, ShuntManager, shunt_conn_values

    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    conn_log = open_log(str(log_dir), LogSchema("conn", CONN_FIELDS + SHUNT_CONN_FIELDS),
                        fmt=args.log_format, hold_max=args.log_hold_max)
    shunt_log = open_log(str(log_dir), LogSchema("shunt", SHUNT_LOG_FIELDS),
                         fmt=args.log_format, hold_max=args.log_hold_max)
    events = dispatcher_from_args(args, str(log_dir), args.log_format)
    dispatcher = events.dispatcher
    policies = _PolicySet(dispatcher, list(args.policy),
                          getattr(args, "policy_options", None))
    policies.load()  # before touching the interface: a bad policy fails early

    try:
        dp = open_datapath(args.iface, mode=args.xdp_mode, flows_max=args.flows_max,
                           lease_seconds=args.lease)
    except DatapathError as exc:
        print(f"shuntd: {exc}", file=sys.stderr)
        return 1
    ring: CaptureRing | None = None
    server: MetricsServer | None = None
    keep_pins = False
    try:
        try:
            ring = CaptureRing(args.iface, RingConfig(block_count=args.ring_blocks))
        except CaptureError as exc:
            print(f"shuntd: {exc}", file=sys.stderr)
            return 1

        tracker: Any = None
        metrics = Metrics(
            MetricSources(**datapath_sources(dp.prog, dp.table,
                                             prog_fd=dp.prog.prog_fd(frags=dp.frags)),
                          capture_stats=capture_sources({"0": ring}),
                          connections_active=lambda: len(tracker.conns) if tracker else 0,
                          connections_evicted=lambda: tracker.bound.evicted if tracker else 0,
                          log_state=lambda: {w.schema.path: (w.held_records, w.write_errors)
                                             for w in (conn_log, shunt_log)}),
            interface=args.iface, xdp_mode=dp.mode.name.lower())

        def sink(conn: Any, row: tuple) -> None:
            conn_log.write(row + shunt_conn_values(conn))
            metrics.connection_logged()

        def shunt_row(row: tuple) -> None:
            shunt_log.write(row)
            metrics.shunt_removed(row[11], "ip_pairs" if row[7] == "ip_pair" else "flows")

        tracker = ConnTracker(settings, hooks=dispatcher, sink=sink)
        shunts = ShuntManager(dp.table, tracker, dispatcher, shunt_row,
                              args.shunted_inactivity_timeout)
        shunts.on_insert = metrics.shunt_insert
        server = serve_metrics(metrics, args.metrics_addr)
        if server is not None:
            log.info("metrics on %s", server.url)
        dispatcher.handler_context = lambda: policy.acting(shunts)
        dispatcher.add_handler("connection_timing_out", shunts.timing_out)
        if dp.adopted:
            n = shunts.clear_orphans()
            log.info("adopted pinned maps of an earlier run: %d orphaned entries logged", n)

        flags = _Flags()

        def on_stop(_sig: int, _frame: Any) -> None:
            flags.stop = True

        def on_hup(_sig: int, _frame: Any) -> None:
            flags.reload = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        log.info("running on %s (XDP %s)", args.iface, dp.mode.name.lower())
        _sd_notify("READY=1")

        ignore = settings.ignore_checksums
        defrag = Defragmenter(ignore_checksums=ignore)
        process = tracker.process
        renew_every = args.lease / 3
        now = time.monotonic()
        next_renew, next_cal, last_packet = now + renew_every, now + CALIBRATE_EVERY, now
        while not flags.stop:
            n = 0
            for ts, frame, wire_len, linktype in ring.poll(0.02):
                n += 1
                pkt = decode(frame, linktype, ts, wire_len, ignore)
                if pkt is not None and pkt.frag:
                    tracker.advance(ts)
                    pkt = defrag.add(pkt)
                if pkt is not None:
                    process(pkt)
                if n >= MAX_BATCH:
                    break
            for ev in dp.ring.poll(0):
                metrics.ring_event(_event_kind(ev))
                shunts.apply(ev)
            conn_log.tick()   # disk full: retry held records once a second
            shunt_log.tick()
            now = time.monotonic()
            if n:
                last_packet = now
            elif now - last_packet >= IDLE_ADVANCE:
                tracker.advance(time.time())
            if now >= next_renew:
                shunts.renew()
                next_renew = now + renew_every
            if now >= next_cal:
                dp.prog.calibrate_clock()
                next_cal = now + CALIBRATE_EVERY
            if flags.reload:
                flags.reload = False
                try:
                    policies.load()
                except PolicyLoadError as exc:
                    log.error("reload failed, keeping the current policies: %s", exc)

        _sd_notify("STOPPING=1")
        log.info("stopping: logging %d open connections", len(tracker.conns))
        for ev in dp.ring.poll(0):
            shunts.apply(ev)
        shunts.shutting_down = True
        tracker.advance(time.time())
        tracker.finish()
        shunts.shutdown_pairs()
        if shunts.refused_full:
            log.info("%d shunts refused: map full", shunts.refused_full)
        for w in (conn_log, shunt_log):  # disk full: a few more seconds, then fail loudly
            w.close(retry_seconds=LOG_CLOSE_RETRY)
        return 1 if conn_log.unwritten or shunt_log.unwritten else 0
    except LogSpaceError:
        # Disk full: keep the pinned maps, so the next start logs what is still shunted as
        # `orphaned` (as after a crash) instead of those counters being deleted here.
        keep_pins = True
        raise
    finally:
        if server is not None:
            server.close()
        if ring is not None:
            ring.close()
        dp.close(unpin=not keep_pins)
        conn_log.close()
        shunt_log.close()
        events.close()


def _event_kind(ev: Any) -> str:
    """The metrics' name of a ring event's type."""
    rst = getattr(ev, "rst", None)
    if rst is None:
        return "lease_expired"
    return "rst" if rst else "fin"
