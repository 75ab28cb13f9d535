"""Live mode, `shuntd --iface IFACE`: datapath + capture ring + engine + policies.

With `--workers 1` (the default) one process runs one loop: read what XDP passed from the
capture ring, decode it into the ConnTracker, apply FIN/RST ring events to shunted connections,
renew leases, and advance network time with the wall clock when the link is quiet (Zeek does so
after 100 ms idle) so connections time out. Signals only set flags; the loop acts on them. With
more workers the same `_Engine` runs in each worker process (workers.py says how they share the
interface, the maps and the logs).

Interface events (`_LinkGuard`): down -> logged, keep running (XDP stays attached, connections
time out as on a quiet link); up again -> logged, and XDP is re-attached if it was lost; deleted
-> logged, every open connection is logged, exit 1 so systemd restarts shuntd when it is back.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from shuntd.gcpace import GcPacer

log = logging.getLogger("shuntd")

IDLE_ADVANCE = 0.1   # seconds without packets before network time follows the wall clock
CALIBRATE_EVERY = 60.0
MAX_BATCH = 4096     # frames per loop turn, so ring events and timers are not starved
MAX_WORKERS = 64
ATTACH_CHECK_EVERY = 10.0  # seconds between checks that our XDP program is still attached
EXIT_FAILED = 1      # the interface went away, capture failed, a worker died: systemd restarts
LOG_CLOSE_RETRY = 5.0  # seconds a stop waits for a full disk before giving up on held records
# The kernel hands a partly filled ring block over after this many ms. Every packet of a session
# that XDP passes while its handshake waits in an open block reaches Python: a shorter timeout
# lands shunts sooner, for one wake-up per block. A block closed by its timeout holds only what
# arrived meanwhile, so the ring is cut into small blocks (BLOCKS_PER_MIB per MiB of
# --ring-blocks): 64 MiB are 256 blocks, 1 s of a stalled daemon even on a quiet link. Under
# load (bench/shunt_gain.py, shunting on, ~800 Mbit/s at half a core) 4 per MiB leaked fewest
# packets to Python: 2 and 16 per MiB both let more through (more wake-ups, or later hand-over).
RING_BLOCK_TIMEOUT_MS = 4
BLOCKS_PER_MIB = 4


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
    g.add_argument("--xdp-mode", choices=("auto", "native", "generic"), default="auto",
                   help="native (driver) XDP, generic (SKB) XDP, or auto: native, falling "
                   "back to generic (auto)")
    g.add_argument("--ring-blocks", type=int, default=64, metavar="N",
                   help="capture ring size in MiB (64), per worker")
    g.add_argument("--ring-block-timeout-ms", type=_block_timeout,
                   default=RING_BLOCK_TIMEOUT_MS, metavar="MS",
                   help="hand a capture ring block to shuntd after this long even if not "
                   f"full: bounds how late a shunt decision lands ({RING_BLOCK_TIMEOUT_MS})")
    g.add_argument("--workers", type=_workers, default=1, metavar="N",
                   help="worker processes sharing the interface by flow hash (1)")
    g.add_argument("--flows-max", type=int, default=None, metavar="N",
                   help="entries of the flow shunt map; a full map refuses new shunts "
                   "(131072)")
    g.add_argument("--early-port", type=_port, default=443, metavar="PORT",
                   help="TCP port on which XDP follows TLS handshakes and shunts each session "
                   "itself on the packet that completes it, when a loaded policy declares "
                   "EARLY_SHUNT (tls does); 0 turns early shunts off (443)")
    g.add_argument("--metrics-addr", type=_metrics_addr, default="127.0.0.1:9450",
                   metavar="HOST:PORT", help="serve Prometheus metrics here; `none` turns "
                   "them off (127.0.0.1:9450)")


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= n <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_WORKERS}: {text!r}")
    return n


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0..65535: {text!r}")
    return n


def _block_timeout(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= n <= 1000:
        raise argparse.ArgumentTypeError(f"must be 1..1000 (ms): {text!r}")
    return n


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

    def install(self) -> None:
        def on_stop(_sig: int, _frame: Any) -> None:
            self.stop = True

        def on_hup(_sig: int, _frame: Any) -> None:
            self.reload = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)


class _PolicySet:
    """The loaded policies' handlers, registered on the dispatcher; swapped on SIGHUP."""

    def __init__(self, dispatcher: Any, specs: list[str], options: Any) -> None:
        self.dispatcher = dispatcher
        self.specs = specs
        self.options = options
        self.registered: list[tuple[str, Any]] = []
        self.early: str | None = None  # their EARLY_SHUNT trigger (policyfile.early_trigger)
        self.on_early: Callable[[str | None], None] | None = None  # told it at each load

    def load(self) -> None:
        """Raises PolicyLoadError; the current set stays as it was then."""
        from shuntd.events import EVENTS, HOOKS
        from shuntd.policyfile import early_trigger, load_all

        policies = load_all(self.specs, EVENTS + HOOKS, self.options)
        self.early = early_trigger(policies)
        if self.on_early is not None:
            self.on_early(self.early)
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


class LiveSources:
    """What the metrics read that only the serving loop knows: the capture rings by worker,
    the connection count and (with workers) the shunt map occupancy."""

    def __init__(self, table: Any) -> None:
        self.rings: dict[str, Any] = {}
        self.connections: Any = lambda: 0
        self.evicted: Any = lambda: 0   # connections evicted by --max-connections
        self.lag: Any = lambda: 0.0     # capture lag of the analysing process (--workers 1)
        self.workers: Any = dict  # {worker: (connections, messages dropped)}, with workers
        # {worker: capture ring resyncs}: the reading process's count (with workers, reported)
        self.resyncs: Any = lambda: {w: r.resyncs for w, r in self.rings.items()}
        self.occupancy: Any = lambda: {
            "flows": (table.occupancy, table.capacity),
            "ip_pairs": (table.pair_occupancy, table.pair_capacity)}


class LogOut:
    """Finished rows in the process that owns the logs: written whole, and counted."""

    def __init__(self, conn_log: Any, shunt_log: Any, long_log: Any, metrics: Any,
                 tunnel_log: Any = None) -> None:
        self.conn_log = conn_log
        self.shunt_log = shunt_log
        self.long_log = long_log
        self.tunnel_log = tunnel_log
        self.metrics = metrics

    def conn(self, row: tuple) -> None:
        self.conn_log.write(row)
        self.metrics.connection_logged()

    def shunt(self, row: tuple) -> None:
        self.shunt_log.write(row)
        self.metrics.shunt_removed(row[11], "ip_pairs" if row[7] == "ip_pair" else "flows")

    def long(self, row: tuple) -> None:
        if self.long_log is not None:
            self.long_log.write(row)

    def tunnel(self, row: tuple) -> None:
        if self.tunnel_log is not None:
            self.tunnel_log.write(row)

    def writers(self) -> list[Any]:
        return [w for w in (self.conn_log, self.shunt_log, self.long_log, self.tunnel_log)
                if w is not None]

    def tick(self) -> None:
        """Disk full: retry held records (once a second at most, logs/zeek.py)."""
        for w in self.writers():
            w.tick()

    def reopen(self) -> None:
        """SIGHUP: let logrotate's moved files go; the next record of each log opens it anew."""
        for w in self.writers():
            if not w.reopen():
                log.warning("%s: not reopened while the disk is full", w.path)

    def close(self) -> bool:
        """Close the logs, giving a full disk a few more seconds; False if records were lost."""
        ok = True
        for w in self.writers():
            w.close(retry_seconds=LOG_CLOSE_RETRY)
            ok = ok and not w.unwritten
        return ok

    def inserted(self, trigger: str, result: str) -> None:
        self.metrics.shunt_insert(trigger, result)


class Engine:
    """What one process analyses: a tracker, its events and policies, and the shunts it made.

    `out` takes the finished rows (`conn`, `shunt`, `long`, `inserted`): LogOut in the single
    process, a channel to the parent in a worker."""

    def __init__(self, args: argparse.Namespace, settings: Any, dp: Any, out: Any) -> None:
        from shuntd.conn.tracker import ConnTracker
        from shuntd.defrag import Defragmenter
        from shuntd.eventopts import dispatcher_from_args
        from shuntd.shunting import ShuntManager, shunt_conn_values

        self._conn_values = shunt_conn_values
        self.out = out
        self.dp = dp
        self.events = dispatcher_from_args(args, str(args.log_dir), args.log_format,
                                           write_long_row=out.long)
        dispatcher = self.events.dispatcher
        self.policies = _PolicySet(dispatcher, list(args.policy),
                                   getattr(args, "policy_options", None))
        self.tracker = ConnTracker(settings, hooks=dispatcher, sink=self._sink)
        self.tracker.tunnels.write_log = out.tunnel  # tunnel.log, created with its first row
        self.shunts = ShuntManager(dp.table, self.tracker, dispatcher, out.shunt,
                                   args.shunted_inactivity_timeout)
        self.shunts.on_insert = out.inserted
        shunts = self.shunts

        def on_early(trigger: str | None) -> None:
            shunts.early_trigger = trigger

        self.policies.on_early = on_early
        dispatcher.actions = self.shunts  # the policies' actions, while handlers run
        self.ignore = settings.ignore_checksums
        self.defrag = Defragmenter(ignore_checksums=self.ignore)
        self.renew_every = args.lease / 3
        self.gc: GcPacer | None = None
        # Seconds the newest frame taken had waited since its capture, as of the last batch
        # (Zeek's stats.log pkt_lag, but measured only while frames come: an idle link is
        # not a lagging analyser). Near capacity it shows the backlog before any drop.
        self.capture_lag = 0.0
        now = time.monotonic()
        self.next_renew = now + self.renew_every
        self.last_packet = now

    def _sink(self, conn: Any, row: tuple) -> None:
        self.out.conn(row + self._conn_values(conn))
        if self.gc is not None:
            self.gc.removed()

    def pace_gc(self) -> None:
        """From now on full garbage collections run from `tick()` (gcpace.py says why); call
        once start-up is done, so what it made is frozen out of every collection."""
        tracker = self.tracker
        self.gc = GcPacer(lambda: len(tracker.conns))

    def capture(self, ring: Any, timeout: float = 0.02,
                read_events: Callable[[], list[Any]] | None = None) -> int:
        """Analyse what the ring holds now (up to MAX_BATCH frames analysed, and the late
        packets of shunted sessions among them); returns how many; raises CaptureError.

        `read_events` (the process that reads the BPF ring buffer) is called before the batch
        and again for any frame captured after the last read, so each FIN/RST/lease event is
        scheduled before the packets that followed it (each applies at its own time)."""
        from shuntd.packet import decode

        n = 0
        tracker, defrag, ignore = self.tracker, self.defrag, self.ignore
        process = tracker.process
        shunts = self.shunts
        pending = shunts.pending
        shunts.horizon = self._read_events(read_events)
        if read_events is not None:
            # A late packet captured after the events were read has them read again first.
            shunts.refresh = lambda: self._refresh(read_events)
        # Late packets of shunted sessions are taken in the ring (ShuntManager.late_frame),
        # most counted by the ring itself (its tallies).
        claim = (shunts.late, shunts.late_frame, shunts.late_due, shunts.late_clock)
        claimed = ring.claimed
        ts = 0.0
        try:
            for ts, frame, wire_len, linktype in ring.poll(timeout, claim):
                if ts > shunts.horizon:  # captured after the events were read: read again
                    shunts.horizon = self._read_events(read_events)
                n += 1
                pkt = decode(frame, linktype, ts, wire_len, ignore or ring.csum_unchecked)
                if pkt is not None:
                    if pending and pkt.proto == 6 and pkt.ip_version == 4 and (
                            pkt.ip_hdr_len != 20 or pkt.inner_vlan or pkt.frag):
                        # Maybe a shunted session's packet the ring could not match by its
                        # bytes 26-38: what its late packets did must come first.
                        shunts.flush_pending()
                    if pkt.frag:
                        tracker.advance(ts)
                        pkt = defrag.add(pkt)
                    if pkt is not None:
                        process(pkt)
                if n >= MAX_BATCH:
                    break
        finally:
            shunts.horizon = math.inf
            shunts.refresh = None
            if pending:
                shunts.flush_pending()
            if ts:
                self.capture_lag = max(0.0, time.time() - ts)
        return n + ring.claimed - claimed

    def apply(self, events: list[Any]) -> None:
        for ev in events:
            self.shunts.apply(ev)

    def _read_events(self, read_events: Callable[[], list[Any]] | None) -> float:
        """Apply the ring events that arrived; returns the time up to which they are known
        (infinity when events come from elsewhere, e.g. the parent of a worker)."""
        if read_events is None:
            return math.inf
        self.apply(read_events())
        return time.time()

    def _refresh(self, read_events: Callable[[], list[Any]]) -> float:
        """ShuntManager.refresh during a batch: the events that came since, and the new
        horizon."""
        self.shunts.horizon = horizon = self._read_events(read_events)
        return horizon

    def tick(self, packets: int) -> None:
        """Network time follows the wall clock on a quiet link; leases are renewed."""
        now = time.monotonic()
        if packets:
            self.last_packet = now
        elif now - self.last_packet >= IDLE_ADVANCE:
            self.tracker.advance(time.time())
        if now >= self.next_renew:
            self.shunts.renew()
            self.next_renew = now + self.renew_every
        if self.gc is not None:
            self.gc.tick()

    def reload(self) -> None:
        from shuntd.policyfile import PolicyLoadError

        try:
            self.policies.load()
        except PolicyLoadError as exc:
            log.error("reload failed, keeping the current policies: %s", exc)

    def finish(self) -> None:
        """Log every open connection with its merged counters; end IP-pair shunts."""
        self.shunts.shutting_down = True
        self.tracker.advance(time.time())
        self.tracker.finish()
        self.shunts.shutdown_pairs()
        if self.shunts.refused_full:
            log.info("%d shunts refused: map full", self.shunts.refused_full)

    def close(self) -> None:
        self.events.close()


class _LinkGuard:
    """Interface down / up / deleted while running, and a lost XDP attachment.

    `check()` logs each change and returns why the daemon must stop (None: keep running)."""

    def __init__(self, dp: Any, xdp_mode: str) -> None:
        from shuntd.capture.linkwatch import LinkWatch
        from shuntd.datapath.iface import interface_info

        self.dp = dp
        self.xdp_mode = xdp_mode
        self.ifname = dp.ifname
        info = interface_info(self.ifname)
        self.ifindex = info.index
        self.watch = LinkWatch(info.index)
        self.overruns = 0
        self.next_check = time.monotonic() + ATTACH_CHECK_EVERY

    def fileno(self) -> int:
        return self.watch.fileno()

    def check(self) -> str | None:
        for ev in self.watch.poll():
            if ev.kind == "deleted":
                return self._deleted()
            if ev.kind == "down":
                log.warning("interface %s is down (%s): nothing to capture until it is back; "
                            "XDP stays attached, connections time out as on a quiet link",
                            self.ifname, ev.why)
            else:
                log.info("interface %s is up again", self.ifname)
                reason = self._ensure_attached()
                if reason:
                    return reason
        now = time.monotonic()
        if self.watch.overruns != self.overruns:
            self.overruns = self.watch.overruns
            log.warning("link events of %s were lost (netlink buffer full): checking the "
                        "interface and the XDP attachment now", self.ifname)
            self.next_check = now
        if now >= self.next_check:
            self.next_check = now + ATTACH_CHECK_EVERY
            return self._ensure_attached()
        return None

    def gone(self) -> bool:
        """The interface no longer exists (or its name is now another interface's)."""
        try:
            return socket.if_nametoindex(self.ifname) != self.ifindex
        except OSError:
            return True

    def capture_failed(self, error: str) -> str:
        """The reason to stop after a capture error: most often the interface was deleted."""
        if self.gone():
            return self._deleted()
        log.error("capture on %s failed: %s; stopping (exit status %d)", self.ifname, error,
                  EXIT_FAILED)
        return "capture failed"

    def _deleted(self) -> str:
        log.error("interface %s was deleted: logging open connections and exiting with "
                  "status %d (systemd restarts shuntd when the interface is back)",
                  self.ifname, EXIT_FAILED)
        return "interface deleted"

    def _ensure_attached(self) -> str | None:
        from shuntd.datapath.attach import attach_xdp
        from shuntd.datapath.errors import DatapathError, InterfaceMissingError
        from shuntd.datapath.iface import interface_info

        try:
            info = interface_info(self.ifname)
        except InterfaceMissingError:
            return self._deleted()
        if info.index != self.ifindex:
            return self._deleted()  # a new interface of the same name
        ours = self.dp.attachment
        if info.xdp.prog_id == ours.prog_id:
            return None
        if info.xdp.prog_id:
            log.error("another XDP program (id %d) replaced shuntd's on %s: stopping "
                      "(exit status %d)", info.xdp.prog_id, self.ifname, EXIT_FAILED)
            return "xdp replaced"
        try:
            new = attach_xdp(self.dp.prog.prog_fd(frags=self.dp.frags), self.ifname,
                             self.xdp_mode)
        except DatapathError as exc:
            log.error("shuntd's XDP program is no longer attached to %s and re-attaching "
                      "failed: %s; stopping (exit status %d)", self.ifname, exc, EXIT_FAILED)
            return "xdp lost"
        ours.detach()
        self.dp.attachment = new
        log.warning("shuntd's XDP program was no longer attached to %s: re-attached (%s mode)",
                    self.ifname, new.mode.name.lower())
        return None

    def close(self) -> None:
        self.watch.close()


def _run(args: argparse.Namespace, settings: Any) -> int:
    from pathlib import Path

    from shuntd.capture.ring import CaptureError, RingConfig
    from shuntd.conn.record import CONN_FIELDS, SHUNT_CONN_FIELDS
    from shuntd.conn.tunnels import TUNNEL_FIELDS
    from shuntd.datapath.errors import DatapathError
    from shuntd.datapath.loader import open_datapath
    from shuntd.events import EVENTS, HOOKS
    from shuntd.logs.zeek import LogSchema, open_log, set_aside
    from shuntd.metrics import Metrics, MetricSources, capture_sources, datapath_sources
    from shuntd.policyfile import load_all
    from shuntd.shunting import SHUNT_LOG_FIELDS, ShuntManager

    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    for kept in set_aside(log_dir, ("conn", "shunt", "conn_long", "tunnel")):
        log.info("kept the previous run's log as %s", kept)
    # A bad policy fails before the interface is touched (each process loads its own copy).
    load_all(list(args.policy), EVENTS + HOOKS, getattr(args, "policy_options", None))
    # conn.log is buffered: the rows of one pass of the main loop reach the file in one
    # write, at the pass's `out.tick()` (a write per row was a system call per connection).
    # The others are written row by row (few rows; shunt.log's orphans are there at start).
    conn_log = open_log(str(log_dir), LogSchema("conn", CONN_FIELDS + SHUNT_CONN_FIELDS),
                        fmt=args.log_format, buffered=True, hold_max=args.log_hold_max)
    shunt_log = open_log(str(log_dir), LogSchema("shunt", SHUNT_LOG_FIELDS),
                         fmt=args.log_format, hold_max=args.log_hold_max)
    long_log = None if args.no_conn_long else open_log(
        str(log_dir), LogSchema("conn_long", CONN_FIELDS), fmt=args.log_format,
        hold_max=args.log_hold_max)
    tunnel_log = open_log(str(log_dir), LogSchema("tunnel", TUNNEL_FIELDS), fmt=args.log_format,
                          hold_max=args.log_hold_max)
    workers = getattr(args, "workers", 1) or 1
    try:
        try:
            dp = open_datapath(args.iface, mode=args.xdp_mode, flows_max=args.flows_max,
                               lease_seconds=args.lease)
        except DatapathError as exc:
            print(f"shuntd: {exc}", file=sys.stderr)
            return 1
        keep_pins = False
        try:
            live = LiveSources(dp.table)
            sources = datapath_sources(dp.prog, dp.table,
                                       prog_fd=dp.prog.prog_fd(frags=dp.frags))
            sources.update(table_occupancy=lambda: live.occupancy(),
                           capture_stats=capture_sources(live.rings, lambda: live.resyncs()),
                           connections_active=lambda: live.connections(),
                           connections_evicted=lambda: live.evicted(),
                           capture_lag=(lambda: live.lag()) if workers == 1 else None,
                           log_state=lambda: {w.schema.path: (w.held_records, w.write_errors)
                                              for w in out.writers()},
                           workers=(lambda: live.workers()) if workers > 1 else None)
            metrics = Metrics(MetricSources(**sources), interface=args.iface,
                              xdp_mode=dp.mode.name.lower())
            out = LogOut(conn_log, shunt_log, long_log, metrics, tunnel_log)
            if dp.adopted:
                n = ShuntManager(dp.table, None, None, out.shunt).clear_orphans()
                log.info("adopted pinned maps of an earlier run: %d orphaned entries logged", n)
            ring_config = RingConfig(block_size=(1 << 20) // BLOCKS_PER_MIB,
                                     block_count=args.ring_blocks * BLOCKS_PER_MIB,
                                     retire_timeout_ms=args.ring_block_timeout_ms)
            flags = _Flags()
            flags.install()
            try:
                if workers == 1:
                    rc = _serve_single(args, settings, dp, out, metrics, live, ring_config,
                                       flags)
                else:
                    from shuntd.workers import serve_workers

                    rc, keep_pins = serve_workers(args, settings, dp, out, metrics, live,
                                                  ring_config, flags, workers)
            except CaptureError as exc:
                print(f"shuntd: {exc}", file=sys.stderr)
                return 1
            if not out.close() and rc == 0:
                rc = EXIT_FAILED  # disk full: records were not written (named in the log)
            return rc
        except BaseException:
            # Disk full past the bound, or anything unforeseen: the open connections were not
            # logged, so keep the pinned maps; the next start logs what is still shunted as
            # `orphaned` (as after a crash) instead of those counters being deleted here.
            keep_pins = True
            raise
        finally:
            # Every entry we made was ended and logged: remove the pins. Unless a worker died:
            # its entries stay pinned, and the next start logs them as orphaned.
            dp.close(unpin=not keep_pins)
    finally:
        conn_log.close()
        shunt_log.close()
        if long_log is not None:
            long_log.close()
        tunnel_log.close()


def _serve_single(args: argparse.Namespace, settings: Any, dp: Any, out: LogOut, metrics: Any,
                  live: LiveSources, ring_config: Any, flags: _Flags) -> int:
    """--workers 1: capture, engine, ring events and timers in one loop."""
    from shuntd.capture.dropwatch import DropWatch
    from shuntd.capture.ring import CaptureError, CaptureRing
    from shuntd.early import EarlySwitch
    from shuntd.metrics import MetricsServer, serve_metrics

    ring = CaptureRing(args.iface, ring_config)
    drops = DropWatch({"0": ring}, args.iface)
    server: MetricsServer | None = None
    engine: Engine | None = None
    guard: _LinkGuard | None = None
    early = EarlySwitch(dp.prog, args.early_port, args.lease)
    try:
        engine = Engine(args, settings, dp, out)
        engine.policies.load()
        early.declare(engine.policies.early)
        engine.pace_gc()
        tracker = engine.tracker
        live.rings["0"] = ring
        live.connections = lambda: len(tracker.conns)
        live.evicted = lambda: tracker.bound.evicted
        live.lag = lambda: engine.capture_lag  # type: ignore[union-attr]
        guard = _LinkGuard(dp, args.xdp_mode)
        server = serve_metrics(metrics, args.metrics_addr)
        if server is not None:
            log.info("metrics on %s", server.url)
        log.info("running on %s (XDP %s)", args.iface, dp.mode.name.lower())
        _sd_notify("READY=1")

        def ring_events() -> list[Any]:
            evs = dp.ring.poll(0)
            if evs:
                for ev in evs:
                    metrics.ring_event(_event_kind(ev))
                early.note(evs)
            return evs

        failed: str | None = None
        now = time.monotonic()
        next_cal = now + CALIBRATE_EVERY
        while not flags.stop and failed is None:
            try:
                n = engine.capture(ring, read_events=ring_events)
            except CaptureError as exc:
                failed = guard.capture_failed(str(exc))
                break
            if not n:
                # Idle: what came while the ring was waited for applies in this tick (busy,
                # the next pass reads the events first thing).
                engine.apply(ring_events())
            engine.tick(n)
            early.tick()
            early.sweep(engine.shunts.reap_early)
            out.tick()
            drops.poll()
            failed = guard.check()
            now = time.monotonic()
            if now >= next_cal:
                dp.prog.calibrate_clock()
                next_cal = now + CALIBRATE_EVERY
            if flags.reload:
                flags.reload = False
                engine.reload()
                early.declare(engine.policies.early)
                out.reopen()

        _sd_notify("STOPPING=1")
        log.info("stopping: logging %d open connections; %d frames analysed, %d taken as "
                 "late packets of shunted sessions", len(tracker.conns),
                 ring.stats().delivered, ring.claimed)
        early.off()  # XDP makes no more: each one it made is adopted or logged below
        engine.apply(ring_events())
        engine.finish()
        n = engine.shunts.reap_all_early()
        if n:
            log.info("%d early shunts nobody adopted logged as orphaned", n)
        return 0 if failed is None else EXIT_FAILED
    finally:
        _early_off(early)
        if server is not None:
            server.close()
        if guard is not None:
            guard.close()
        ring.close()
        if engine is not None:
            engine.close()


def _early_off(early: Any) -> None:
    """However the loop ended: no early shunts without a daemon (the dead-man switch would
    end them within a lease anyway)."""
    from shuntd.datapath.errors import DatapathError

    if early.trigger is not None:
        try:
            early.off()
        except (DatapathError, OSError) as exc:
            log.warning("could not turn early shunts off: %s (they stop within one lease)",
                        exc)


def _event_kind(ev: Any) -> str:
    """The metrics' name of a ring event's type."""
    rst = getattr(ev, "rst", None)
    if rst is None:
        return "lease_expired" if hasattr(ev, "is_pair") else "early"
    return "rst" if rst else "fin"
