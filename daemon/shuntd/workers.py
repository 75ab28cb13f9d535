"""`--workers N`: N worker processes share one interface, one XDP program and one set of logs.

How the work is split, and why so:
* The parent loads and attaches the one XDP program (adopting and logging pinned orphans), then
  opens N capture rings joined to one PACKET_FANOUT_HASH group and forks N workers. The kernel
  picks a ring by the skb's symmetric flow hash (`__skb_get_hash_symmetric`: addresses and ports
  sorted), so both directions of a connection reach the same worker. Each worker runs the
  single process's `Engine` on its ring: its own ConnTracker, policies and ShuntManager, so every
  connection and every shunt belongs to exactly one worker. The workers use the program's maps
  through the inherited fds; each only touches the keys it inserted. The maps all of them change,
  `config` and `pair_filter` (IP-pair counts, flags; the parent's clock calibration), change
  only through the kernel helper xdp_config_op, one atomic operation per field (program.py), so
  no process owns them and concurrent updates are never lost or overwritten.
* The BPF ring buffer has one consumer: the parent. It cannot tell which worker owns a flow (the
  kernel's hash is seeded at boot), so it sends every FIN/RST/lease event to every worker; a
  worker applies the events of its own shunts and connections and ignores the rest, as the
  single process ignores events of flows it does not know. Events are few (about one per
  shunted connection).
* Workers send finished rows (conn.log, shunt.log, conn_long.log) to the parent, which alone
  writes the logs: one file of each per interface, whole lines. Channels are SOCK_SEQPACKET
  socketpairs, one pickled message each. The parent never blocks on a send: a worker that does
  not read gets a bounded backlog, past it events are dropped and counted (like a full ring
  buffer: leases and inactivity timers still end those shunts).
* Signals go to the parent; workers ignore SIGTERM/SIGINT/SIGHUP (also when systemd or a
  terminal signals the whole group) and act on the parent's `reload` and `stop`. On stop the
  parent first hands out the ring events still pending, then every worker logs its open
  connections with merged counters and says `done`; the parent detaches, removes the pins and
  exits 0.
* Workers die with the parent (PR_SET_PDEATHSIG) and do not keep the bpf_link fd, so a killed
  parent still fails open. A worker that dies: the parent logs it, stops the others (they log
  their connections) and exits 1 with the pins kept; systemd restarts shuntd and the next start
  logs the dead worker's shunt entries as orphaned, with their counters. Restarting a single
  worker is not done: its connections are lost anyway, and a new fanout member would reshuffle
  every flow between the workers.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import ctypes.util
import dataclasses
import errno
import logging
import os
import pickle
import select
import signal
import socket
import sys
import time
from typing import Any

from shuntd.capture.dropwatch import DropWatch
from shuntd.daemon import (
    CALIBRATE_EVERY,
    EXIT_FAILED,
    Engine,
    LiveSources,
    LogOut,
    _early_off,
    _event_kind,
    _Flags,
    _LinkGuard,
    _sd_notify,
)

log = logging.getLogger("shuntd")

PR_SET_PDEATHSIG = 1
CHUNK = 64               # rows per message from a worker (a message must fit the socket buffer)
EVENT_CHUNK = 256        # ring events per message to a worker
BACKLOG_MAX = 4096       # messages queued for a worker that is not reading; then dropped
SOCKET_BUFFER = 4 << 20
RECV_BUFFER = 4 << 20
READS_PER_TURN = 256
STATUS_EVERY = 0.5       # seconds between a worker's connection-count reports
SILENT_WARN = 10.0       # a worker not heard of for this long is reported (once per episode)
STOP_TIMEOUT = 25.0      # systemd's TimeoutStopSec is 30 s


# ---------------------------------------------------------------------------------------------
# Channels


def _channel_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        for opt in (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
                break
            except OSError:
                continue
    return a, b


def _recv_ready(sock: socket.socket, buf: bytearray,
                limit: int = 1 << 30) -> tuple[list[Any], bool]:
    """The messages waiting on `sock` now (at most `limit`), and whether the peer closed it."""
    out: list[Any] = []
    view = memoryview(buf)
    while len(out) < limit:
        try:
            n = sock.recv_into(view, 0, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return out, False
        except ConnectionResetError:
            return out, True
        if n == 0:
            return out, True
        out.append(pickle.loads(view[:n]))
    return out, False


class _WorkerOut:
    """A worker's `out`: rows and insert results, sent to the parent in chunks."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rows: dict[str, list[Any]] = {"conn": [], "shunt": [], "long": [], "tunnel": [],
                                             "inserted": []}
        self.pending = 0

    def _add(self, kind: str, item: Any) -> None:
        self.rows[kind].append(item)
        self.pending += 1
        if self.pending >= CHUNK:
            self.flush()

    def conn(self, row: tuple) -> None:
        self._add("conn", row)

    def shunt(self, row: tuple) -> None:
        self._add("shunt", row)

    def long(self, row: tuple) -> None:
        self._add("long", row)

    def tunnel(self, row: tuple) -> None:
        self._add("tunnel", row)

    def inserted(self, trigger: str, result: str) -> None:
        self._add("inserted", (trigger, result))

    def flush(self) -> None:
        if self.pending:
            rows, self.rows = self.rows, {k: [] for k in self.rows}
            self.pending = 0
            self.send(("rows", rows))

    def send(self, msg: Any) -> None:
        """Blocking: the parent always reads. A message too big for one datagram is split."""
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.sock.sendall(data)
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE or msg[0] != "rows":
                raise
            for half in _halves(msg[1]):
                self.send(("rows", half))


def _halves(rows: dict[str, list[Any]]) -> list[dict[str, list[Any]]]:
    a = {k: v[: len(v) // 2] for k, v in rows.items()}
    b = {k: v[len(v) // 2:] for k, v in rows.items()}
    if sum(map(len, b.values())) == sum(map(len, rows.values())):
        raise OSError(errno.EMSGSIZE, "a single row does not fit a message")
    return [a, b]


# ---------------------------------------------------------------------------------------------
# A worker


def _worker_setup(index: int, parent_pid: int) -> None:
    """Ignore the signals the parent handles; die with the parent; label the log lines."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(EXIT_FAILED)  # the parent died before we could ask to die with it
    fmt = logging.Formatter(f"shuntd[{index}]: %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(fmt)


def _worker_main(index: int, args: argparse.Namespace, settings: Any, dp: Any, ring: Any,
                 sock: socket.socket) -> int:
    from shuntd.capture.ring import CaptureError
    from shuntd.policyfile import PolicyLoadError

    out = _WorkerOut(sock)
    engine = Engine(args, settings, dp, out)
    try:
        engine.policies.load()
    except PolicyLoadError as exc:
        log.error("%s", exc)
        return 2
    engine.pace_gc()
    out.send(("ready", os.getpid()))
    buf = bytearray(RECV_BUFFER)
    key_type = dp.prog.FlowKey
    next_status = 0.0
    stopping = False
    closed = False
    control: list[Any] = []   # reload/stop messages met while reading events

    def read_events() -> list[Any]:
        """Drain the parent's messages now: ring events are returned (the engine schedules
        them before packets captured after them), the rest kept for the loop."""
        nonlocal closed
        msgs, gone = _recv_ready(sock, buf)
        closed = closed or gone
        evs: list[Any] = []
        for msg in msgs:
            if msg[0] == "events":
                evs += [dataclasses.replace(ev, key=key_type.from_buffer_copy(ev.key_bytes))
                        for ev in msg[1]]
            else:
                control.append(msg)
        return evs

    while not stopping:
        n = 0
        if ring is not None:
            try:
                n = engine.capture(ring, read_events=read_events)
            except CaptureError as exc:
                log.info("capture stopped: %s", exc)
                out.send(("failed", str(exc)))
                ring = None
        else:
            select.select([sock], [], [], 0.02)
        engine.apply(read_events())
        if closed:
            return EXIT_FAILED  # the parent is gone: nobody to log to
        for msg in control:
            if msg[0] == "reload":
                engine.reload()
            elif msg[0] == "stop":
                stopping = True
        control.clear()
        engine.tick(n)
        now = time.monotonic()
        if now >= next_status:
            next_status = now + STATUS_EVERY
            out.flush()
            out.send(("status", _status(engine, ring)))
        elif out.pending:
            out.flush()
    log.info("stopping: logging %d open connections", len(engine.tracker.conns))
    engine.finish()
    out.flush()
    out.send(("done", _status(engine, ring)))
    engine.close()
    return 0


def _status(engine: Engine, ring: Any) -> tuple[int, int, int, int, int]:
    table = engine.dp.table
    tracker = engine.tracker
    resyncs = ring.resyncs if ring is not None else 0
    return len(tracker.conns), table.occupancy, table.pair_occupancy, tracker.bound.evicted, resyncs


# ---------------------------------------------------------------------------------------------
# The parent


class _Worker:
    """The parent's view of one worker."""

    def __init__(self, index: int, pid: int, sock: socket.socket, ring: Any) -> None:
        self.index = index
        self.pid = pid
        self.sock = sock
        self.ring = ring
        self.backlog: collections.deque[bytes] = collections.deque()
        self.ready = False
        self.done = False
        self.closed = False          # channel closed by the worker
        self.exit_status: int | None = None
        self.failed: str | None = None
        # connections, flow entries, pair entries, evictions, capture ring resyncs
        self.status = (0, 0, 0, 0, 0)
        self.dropped = 0             # messages not delivered: backlog full
        self.heard = time.monotonic()  # last message from it
        self.silent = False

    @property
    def alive(self) -> bool:
        return self.exit_status is None

    def post(self, msg: Any) -> None:
        if self.closed:
            return
        if len(self.backlog) >= BACKLOG_MAX:
            if not self.dropped:
                log.warning("worker %d does not read its channel: dropping ring events for it "
                            "(leases and timers still end its shunts)", self.index)
            self.dropped += 1
            return
        self.backlog.append(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
        self.flush()

    def flush(self) -> None:
        while self.backlog and not self.closed:
            try:
                self.sock.send(self.backlog[0], socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.closed = True
                self.backlog.clear()
                return
            self.backlog.popleft()

    def reap(self) -> None:
        if self.exit_status is not None:
            return
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 0
        if pid:
            self.exit_status = os.waitstatus_to_exitcode(status)


def _spawn(args: argparse.Namespace, settings: Any, dp: Any, rings: list[Any]) -> list[_Worker]:
    workers: list[_Worker] = []
    parent_pid = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    for index, ring in enumerate(rings):
        ours, theirs = _channel_pair()
        pid = os.fork()
        if pid == 0:
            rc = EXIT_FAILED
            try:
                _worker_setup(index, parent_pid)
                ours.close()
                for w in workers:
                    w.sock.close()
                for other in rings:
                    if other is not ring:
                        other.close()
                _forget_link(dp.attachment)
                rc = _worker_main(index, args, settings, dp, ring, theirs)
            except BaseException:
                log.exception("worker %d crashed", index)
            finally:
                logging.shutdown()
                os._exit(rc)
        theirs.close()
        workers.append(_Worker(index, pid, ours, ring))
    return workers


def _forget_link(attachment: Any) -> None:
    """Close this process's copy of the bpf_link fd without detaching: only the parent keeps
    the program attached, so the kernel detaches it when the parent dies (fail open)."""
    fd = attachment._link_fd  # noqa: SLF001 - the attachment belongs to the parent
    if fd >= 0:
        os.close(fd)
        attachment._link_fd = -1  # noqa: SLF001


def serve_workers(args: argparse.Namespace, settings: Any, dp: Any, out: LogOut, metrics: Any,
                  live: LiveSources, ring_config: Any, flags: _Flags,
                  count: int) -> tuple[int, bool]:
    """Run `count` workers until stopped. Returns (exit status, keep the pins)."""
    from shuntd.capture.fanout import open_fanout_rings
    from shuntd.early import EarlySwitch
    from shuntd.metrics import MetricsServer, serve_metrics

    rings = open_fanout_rings(args.iface, count, config=ring_config)
    workers: list[_Worker] = []
    server: MetricsServer | None = None
    guard: _LinkGuard | None = None
    # The parent owns the config (it calibrates the clock): it keeps early shunts on while the
    # policies declare them, reading the same files as the workers.
    early = EarlySwitch(dp.prog, args.early_port, args.lease)
    try:
        workers = _spawn(args, settings, dp, rings)  # before any thread exists (fork)
        for w in workers:
            live.rings[str(w.index)] = w.ring
        live.connections = lambda: sum(w.status[0] for w in workers)
        live.evicted = lambda: sum(w.status[3] for w in workers)
        live.workers = lambda: {str(w.index): (w.status[0], w.dropped) for w in workers}
        live.resyncs = lambda: {str(w.index): w.status[4] for w in workers}
        table = dp.table
        live.occupancy = lambda: {
            "flows": (min(table.capacity, sum(w.status[1] for w in workers)), table.capacity),
            "ip_pairs": (min(table.pair_capacity, sum(w.status[2] for w in workers)),
                         table.pair_capacity)}
        guard = _LinkGuard(dp, args.xdp_mode)
        server = serve_metrics(metrics, args.metrics_addr)
        if server is not None:
            log.info("metrics on %s", server.url)
        drops = DropWatch({str(w.index): w.ring for w in workers}, args.iface)
        early.declare(_early_declared(args))
        return _supervise(dp, out, metrics, flags, workers, guard, drops, early, args)
    finally:
        _early_off(early)
        for w in workers:
            if w.alive:
                w.reap()
            if w.alive:
                os.kill(w.pid, signal.SIGKILL)
                os.waitpid(w.pid, 0)
            w.sock.close()
        if server is not None:
            server.close()
        if guard is not None:
            guard.close()
        for ring in rings:
            ring.close()


def _early_declared(args: argparse.Namespace) -> str | None:
    """The policy files' EARLY_SHUNT trigger, as the workers load them (raises
    PolicyLoadError)."""
    from shuntd.events import EVENTS, HOOKS
    from shuntd.policyfile import early_trigger, load_all

    return early_trigger(load_all(list(args.policy), EVENTS + HOOKS,
                                  getattr(args, "policy_options", None)))


def _supervise(dp: Any, out: LogOut, metrics: Any, flags: _Flags, workers: list[_Worker],
               guard: _LinkGuard, drops: DropWatch, early: Any,
               args: argparse.Namespace) -> tuple[int, bool]:
    from shuntd.policyfile import PolicyLoadError
    from shuntd.shunting import ShuntManager

    buf = bytearray(RECV_BUFFER)
    # Only for the early shunts nobody adopted (no connection of its own: an adopted entry is
    # renewed by its worker, so never taken here).
    reaper = ShuntManager(dp.table, None, None, out.shunt)
    failed: str | None = None
    worker_died = False
    announced = False
    stop_deadline: float | None = None
    next_cal = time.monotonic() + CALIBRATE_EVERY
    while True:
        if stop_deadline is None and (flags.stop or failed is not None):
            _sd_notify("STOPPING=1")
            early.off()  # XDP makes no more: each one it made is adopted or logged at the end
            _broadcast_events(dp, metrics, workers, early)  # what XDP reported before the stop
            for w in workers:
                w.post(("stop",))
            stop_deadline = time.monotonic() + STOP_TIMEOUT
        readers = [w.sock for w in workers if not w.closed]
        writers = [w.sock for w in workers if w.backlog and not w.closed]
        try:
            select.select(readers + [guard], writers, [], 0.02)
        except InterruptedError:
            pass
        for w in workers:
            if w.closed:
                continue
            msgs, closed = _recv_ready(w.sock, buf, READS_PER_TURN)  # no worker starves others
            if msgs:
                w.heard = time.monotonic()
                if w.silent:
                    w.silent = False
                    log.info("worker %d reports again", w.index)
            elif not w.silent and time.monotonic() - w.heard > SILENT_WARN:
                w.silent = True
                log.warning("worker %d (pid %d) has not reported for %.0f s: hung? its shunts "
                            "fail open when their leases run out", w.index, w.pid, SILENT_WARN)
            for msg in msgs:
                failure = _handle(w, msg, out)
                if failure and failed is None:
                    failed = guard.capture_failed(failure)
            if closed:
                w.closed = True
            w.flush()
        _broadcast_events(dp, metrics, workers, early)
        out.tick()  # disk full: retry held records
        drops.poll()
        for w in workers:
            if w.closed:
                w.reap()
            if not w.alive and not w.done and not worker_died:
                worker_died = True
                log.error("worker %d (pid %d) died (%s) with %d open connections: they are "
                          "lost, its shunt entries stay pinned for the next start; stopping "
                          "(exit status %d)", w.index, w.pid, _describe(w.exit_status),
                          w.status[0], EXIT_FAILED)
                failed = failed or "worker died"
        if not announced and all(w.ready for w in workers):
            announced = True
            log.info("running on %s (XDP %s, %d workers)", dp.ifname, dp.mode.name.lower(),
                     len(workers))
            _sd_notify("READY=1")
        if failed is None:
            failed = guard.check()
        now = time.monotonic()
        if now >= next_cal:
            dp.prog.calibrate_clock()
            next_cal = now + CALIBRATE_EVERY
        if stop_deadline is None:
            early.tick()
            early.sweep(reaper.reap_early)
        if flags.reload:
            flags.reload = False
            log.info("reloading the policies of %d workers", len(workers))
            for w in workers:
                w.post(("reload",))
            if stop_deadline is None:
                try:
                    early.declare(_early_declared(args))
                except PolicyLoadError as exc:
                    log.error("reload failed, early shunts stay as they were: %s", exc)
            out.reopen()  # the parent writes the logs: logrotate's moved files go
        if stop_deadline is not None:
            if all(w.done or not w.alive for w in workers):
                for w in workers:
                    w.reap()
                if all(not w.alive for w in workers):
                    break
            if now > stop_deadline:
                late = [w.index for w in workers if w.alive]
                log.error("workers %s did not finish within %.0f s: killed", late, STOP_TIMEOUT)
                return EXIT_FAILED, True
    # Every worker logged its connections (their adopted early shunts with them): the early
    # shunts still in the map were nobody's.
    n = reaper.reap_all_early()
    if n:
        log.info("%d early shunts nobody adopted logged as orphaned", n)
    dropped = sum(w.dropped for w in workers)
    if dropped:
        log.warning("%d messages to workers were dropped (backlog full)", dropped)
    if failed is not None:
        return EXIT_FAILED, worker_died
    return 0, False


def _handle(w: _Worker, msg: Any, out: LogOut) -> str | None:
    kind = msg[0]
    if kind == "rows":
        rows = msg[1]
        for row in rows["conn"]:
            out.conn(row)
        for row in rows["shunt"]:
            out.shunt(row)
        for row in rows["long"]:
            out.long(row)
        for row in rows["tunnel"]:
            out.tunnel(row)
        for trigger, result in rows["inserted"]:
            out.inserted(trigger, result)
    elif kind == "status":
        w.status = msg[1]
    elif kind == "ready":
        w.ready = True
        log.info("worker %d running (pid %d)", w.index, msg[1])
    elif kind == "done":
        w.status = msg[1]
        w.done = True
    elif kind == "failed":
        w.failed = msg[1]
        return f"worker {w.index}: {msg[1]}"
    return None


def _broadcast_events(dp: Any, metrics: Any, workers: list[_Worker], early: Any) -> None:
    evs = dp.ring.poll(0)
    if not evs:
        return
    for ev in evs:
        metrics.ring_event(_event_kind(ev))
    early.note(evs)
    plain = [dataclasses.replace(ev, key=None) for ev in evs]  # ctypes keys do not pickle
    for i in range(0, len(plain), EVENT_CHUNK):
        msg = ("events", plain[i:i + EVENT_CHUNK])
        for w in workers:
            if w.alive and not w.done:
                w.post(msg)


def _describe(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
