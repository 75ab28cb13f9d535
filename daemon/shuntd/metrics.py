"""Prometheus metrics of shuntd.

Two kinds of numbers, kept apart on purpose:
* values that already exist somewhere (the BPF `stats` array, map occupancy, capture socket
  counters, the program's run time) are READ AT SCRAPE TIME by `ShuntdCollector` through the
  callables of `MetricSources`: no polling thread, nothing added to the packet path;
* events only the daemon sees (shunt inserts, removals, ring events received, connections
  logged) are plain integers held by `Metrics` (`EventCounts`), which the daemon increments (a
  dict update per event on the shunt path, not a prometheus-client call with its label
  lookup and lock) and a scrape reads, as prometheus-client's Counters would show them.

Every metric lives in the `Metrics` object's own CollectorRegistry (no global default registry,
so two daemons or tests in one process never collide). Names: prefix `shuntd_`, base units,
`_total` on counters, labels only of bounded sets (table, reason, result, trigger, worker).

Which BPF stat becomes which metric is decided in one table, `STAT_METRICS`, keyed by the names of
enum shunt_stat as parsed from bpf/shuntd.h (datapath/program.py); a stat the table does not know
yet is still exported, as `shuntd_xdp_stat_total{stat="..."}`.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest, start_http_server

from shuntd import __version__

log = logging.getLogger(__name__)

DEFAULT_METRICS_ADDR = "127.0.0.1:9450"
BPF_STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")

TABLES = ("flows", "ip_pairs")
# adopted, adopted_late: an early shunt XDP made, taken over (shunting.ShuntManager.on_insert)
INSERT_RESULTS = ("ok", "exists", "full", "error", "adopted", "adopted_late")
REMOVAL_REASONS = ("fin", "rst", "timeout", "lease", "manual", "shutdown", "orphaned",
                   "unconfirmed")
RING_EVENT_TYPES = ("fin", "rst", "lease_expired", "early", "unknown")


class MetricsAddrError(ValueError):
    """--metrics-addr could not be understood; the message says why and what is expected."""


# ---------------------------------------------------------------------------------------------
# --metrics-addr


def parse_metrics_addr(text: str) -> tuple[str, int] | None:
    """`HOST:PORT` (IPv6 as `[addr]:PORT`) -> (host, port); `none` -> None (metrics off).

    Port 0 asks the kernel for a free port (tests). Nothing is refused for being public: the
    server logs a warning when it binds a non-loopback address (see `MetricsServer`)."""
    raw = text.strip()
    if not raw:
        raise MetricsAddrError("--metrics-addr is empty: expected HOST:PORT or 'none'")
    if raw.lower() == "none":
        return None
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise MetricsAddrError(
                f"--metrics-addr {text!r}: expected [IPv6]:PORT, e.g. [::1]:9450")
        port_text = rest[1:]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise MetricsAddrError(
                f"--metrics-addr {text!r}: {host!r} in brackets is not an IPv6 address") from None
    else:
        host, sep, port_text = raw.rpartition(":")
        if not sep:
            raise MetricsAddrError(
                f"--metrics-addr {text!r}: no port; expected HOST:PORT, e.g. 127.0.0.1:9450")
        if ":" in host:
            raise MetricsAddrError(
                f"--metrics-addr {text!r}: put an IPv6 address in brackets, e.g. [::1]:9450")
        if not host:
            raise MetricsAddrError(
                f"--metrics-addr {text!r}: no host; use 0.0.0.0:PORT to listen everywhere")
        if not _is_hostname(host):
            raise MetricsAddrError(f"--metrics-addr {text!r}: {host!r} is not a valid host")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise MetricsAddrError(f"--metrics-addr {text!r}: port must be a number 0..65535")
    return host, int(port_text)


def _is_hostname(host: str) -> bool:
    if len(host) > 253:
        return False
    labels = host.rstrip(".").split(".")
    return all(
        label and len(label) <= 63 and label[0] != "-" and label[-1] != "-"
        and all(c.isascii() and (c.isalnum() or c == "-") for c in label)
        for label in labels
    )


def metrics_addr_arg(text: str) -> tuple[str, int] | None:
    """argparse `type=` for --metrics-addr: the parse error becomes a usage error, not a
    traceback."""
    import argparse

    try:
        return parse_metrics_addr(text)
    except MetricsAddrError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def is_loopback_host(host: str) -> bool:
    """True only if every address `host` resolves to is a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    addrs = {info[4][0].split("%")[0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a).is_loopback for a in addrs)


# ---------------------------------------------------------------------------------------------
# Program run time (kernel.bpf_stats_enabled), without bpftool


class ProgRunStats(NamedTuple):
    """bpf_prog_info.run_time_ns / run_cnt: kernel-measured cost of the XDP program."""

    run_time_ns: int
    run_cnt: int


class _BpfProgInfo(ctypes.Structure):
    """Prefix of `struct bpf_prog_info` (uapi/linux/bpf.h) up to run_cnt; the kernel fills at
    most `info_len` bytes. Pointer fields stay 0 so the kernel copies no arrays."""

    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32), ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64), ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32), ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64), ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32), ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32), ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64), ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32), ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64), ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
    ]


def bpf_stats_enabled() -> bool:
    """kernel.bpf_stats_enabled (False if unreadable)."""
    try:
        return BPF_STATS_SYSCTL.read_text().strip() not in ("", "0")
    except OSError:
        return False


def read_prog_run_stats(prog_fd: int, require_sysctl: bool = True) -> ProgRunStats | None:
    """run_time_ns/run_cnt of a loaded program via bpf_obj_get_info_by_fd.

    None when the kernel does not measure (sysctl off, unless require_sysctl=False: stats can
    also be switched on per fd with BPF_ENABLE_STATS) or when the fd cannot be queried."""
    if require_sysctl and not bpf_stats_enabled():
        return None
    from shuntd.datapath import libbpf  # loads libbpf.so only when actually used

    info = _BpfProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    ret = libbpf.lib().bpf_obj_get_info_by_fd(prog_fd, ctypes.byref(info), ctypes.byref(size))
    if ret < 0:
        err = -ret if ret != -1 else (ctypes.get_errno() or errno.EINVAL)
        log.debug("bpf_obj_get_info_by_fd(%d): %s", prog_fd, os.strerror(err))
        return None
    if size.value < _BpfProgInfo.run_cnt.offset + 8:
        return None  # kernel older than run_time_ns (5.1)
    return ProgRunStats(int(info.run_time_ns), int(info.run_cnt))


# ---------------------------------------------------------------------------------------------
# BPF stats -> metric names: the one table


class StatMetric(NamedTuple):
    name: str  # without the shuntd_ prefix and _total suffix
    labels: tuple[tuple[str, str], ...] = ()


STAT_METRICS: Mapping[str, StatMetric] = {
    "seen": StatMetric("xdp_seen_packets"),
    "passed": StatMetric("xdp_passed_packets"),
    "bytes_passed": StatMetric("xdp_passed_bytes"),
    "dropped_flow": StatMetric("xdp_shunted_packets", (("table", "flows"),)),
    "dropped_pair": StatMetric("xdp_shunted_packets", (("table", "ip_pairs"),)),
    "bytes_dropped_flow": StatMetric("xdp_shunted_bytes", (("table", "flows"),)),
    "bytes_dropped_pair": StatMetric("xdp_shunted_bytes", (("table", "ip_pairs"),)),
    "not_ip": StatMetric("xdp_not_ip_packets"),
    "unparseable": StatMetric("xdp_unparseable_packets"),
    "l4_unparseable": StatMetric("xdp_l4_unparseable_packets"),
    "frag_nonfirst": StatMetric("xdp_nonfirst_fragment_packets"),
    "lease_expired_pass": StatMetric("xdp_lease_expired_passed_packets"),
    "pass_all": StatMetric("xdp_pass_all_packets"),
    "pair_filter_false": StatMetric("xdp_pair_filter_false_positives"),
    "events": StatMetric("ring_events_submitted"),
    "ringbuf_reserve_fail": StatMetric("ring_events_lost"),
    "early_armed": StatMetric("xdp_early_handshakes", (("outcome", "armed"),)),
    "early_fired": StatMetric("xdp_early_handshakes", (("outcome", "shunted"),)),
    "early_gave_up": StatMetric("xdp_early_handshakes", (("outcome", "gave_up"),)),
    "early_full": StatMetric("xdp_early_handshakes", (("outcome", "full"),)),
}

STAT_HELP: Mapping[str, str] = {
    "xdp_seen_packets": "Packets the XDP program saw.",
    "xdp_passed_packets": "Packets XDP passed up to the capture (not shunted).",
    "xdp_passed_bytes": "IP bytes of packets XDP passed (non-IP frames count 0).",
    "xdp_shunted_packets": "Packets XDP dropped because their flow or IP pair is shunted.",
    "xdp_shunted_bytes": "IP bytes of packets XDP dropped as shunted.",
    "xdp_not_ip_packets": "Passed: ethertype neither IPv4 nor IPv6.",
    "xdp_unparseable_packets": "Passed: bad or truncated L2/L3 header.",
    "xdp_l4_unparseable_packets": "L4 header truncated or bad (matched against ip_pairs only).",
    "xdp_nonfirst_fragment_packets": "Non-first IP fragments (matched against ip_pairs only).",
    "xdp_lease_expired_passed_packets": "Passed: entry found but its lease had run out.",
    "xdp_pass_all_packets": "Passed by the pass-all emergency switch.",
    "xdp_pair_filter_false_positives": "IP-pair prefilter said maybe, ip_pairs said no.",
    "ring_events_submitted": "FIN/RST/lease events XDP put in the ring buffer.",
    "ring_events_lost": "Events XDP could not put in the ring buffer (ring full).",
    "xdp_early_handshakes": "TLS handshakes XDP followed for early shunts: armed (ClientHello "
                            "seen), shunted, gave_up (left to the daemon), full (map or ring "
                            "full at the end).",
    "xdp_stat": "A BPF stats counter this shuntd version has no metric name for.",
}

_SEEN_BYTES_FROM = ("bytes_passed", "bytes_dropped_flow", "bytes_dropped_pair")


# ---------------------------------------------------------------------------------------------
# Sources read at scrape time


@dataclass(frozen=True, slots=True)
class MetricSources:
    """Callables the collector calls on every scrape (from the HTTP server's thread); None =
    not available, the metrics are left out. They must be cheap and must not block.

    bpf_stats:          {stat name of enum shunt_stat, lower case without STAT_: value}
                        (datapath.stats.read_stats)
    table_occupancy:    {"flows"|"ip_pairs": (active entries, capacity)}
    capture_stats:      {worker name: (packets received, kernel drops, ring resyncs)}
    connections_active: number of connections the tracker holds (summed over the workers)
    workers:            {worker name: (connections it holds, messages to it dropped)}, only
                        with --workers > 1
    connections_evicted: connections evicted by the connection bound (conn/bound.py)
    capture_lag:        seconds the newest packet analysed had waited since its capture, at
                        the end of the last batch (--workers 1)
    log_state:          {log name: (records held while the disk is full, disk-full errors)}
    prog_run_stats:     ProgRunStats or None (read_prog_run_stats)
    """

    bpf_stats: Callable[[], Mapping[str, int]] | None = None
    table_occupancy: Callable[[], Mapping[str, tuple[int, int]]] | None = None
    capture_stats: Callable[[], Mapping[str, tuple[int, int, int]]] | None = None
    connections_active: Callable[[], int] | None = None
    workers: Callable[[], Mapping[str, tuple[int, int]]] | None = None
    connections_evicted: Callable[[], int] | None = None
    capture_lag: Callable[[], float] | None = None
    log_state: Callable[[], Mapping[str, tuple[int, int]]] | None = None
    prog_run_stats: Callable[[], ProgRunStats | None] | None = None


def datapath_sources(prog: Any, table: Any,
                     prog_fd: int | None = None) -> dict[str, Callable[[], Any]]:
    """Sources of an XdpProgram and its ShuntTable, as keyword arguments for MetricSources.

    prog_fd: the fd actually attached (e.g. prog.prog_fd(frags=True)); default prog.prog_fd().
    Run-time stats are per program, so they must come from the copy that runs."""
    from shuntd.datapath.stats import read_stats

    fd = prog.prog_fd() if prog_fd is None else prog_fd

    def occupancy() -> dict[str, tuple[int, int]]:
        return {"flows": (table.occupancy, table.capacity),
                "ip_pairs": (table.pair_occupancy, table.pair_capacity)}

    return {"bpf_stats": lambda: read_stats(prog), "table_occupancy": occupancy,
            "prog_run_stats": lambda: read_prog_run_stats(fd)}


def capture_sources(rings: Mapping[str, Any],
                    resyncs: Callable[[], Mapping[str, int]] = dict,
                    ) -> Callable[[], dict[str, tuple[int, int, int]]]:
    """capture_stats source over {worker name: CaptureRing} (CaptureRing.stats()); `resyncs`
    gives each worker's count of ring resyncs (kept by the process that reads the ring)."""

    def read() -> dict[str, tuple[int, int, int]]:
        out = {}
        skipped = resyncs()
        for worker, ring in rings.items():
            s = ring.stats()
            out[worker] = (s.seen, s.dropped, skipped.get(worker, 0))
        return out

    return read


class ShuntdCollector:
    """Reads the sources at scrape time. A failing source costs its own metrics only (and
    counts in shuntd_metrics_source_errors_total), never the whole scrape."""

    def __init__(self, sources: MetricSources, info: Callable[[], Mapping[str, str]]):
        self._sources = sources
        self._info = info
        self._errors: dict[str, int] = {}
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked collector: names depend on which sources exist

    def collect(self) -> Iterable[Metric]:
        info = InfoMetricFamily("shuntd", "shuntd version and datapath.")
        info.add_metric([], dict(self._info()))
        yield info
        s = self._sources
        yield from self._guard("bpf_stats", s.bpf_stats, _bpf_families)
        yield from self._guard("table_occupancy", s.table_occupancy, _table_families)
        yield from self._guard("capture_stats", s.capture_stats, _capture_families)
        yield from self._guard("connections_active", s.connections_active, _conn_families)
        yield from self._guard("workers", s.workers, _worker_families)
        yield from self._guard("connections_evicted", s.connections_evicted, _evict_families)
        yield from self._guard("capture_lag", s.capture_lag, _lag_families)
        yield from self._guard("log_state", s.log_state, _log_families)
        yield from self._guard("prog_run_stats", s.prog_run_stats, _run_families)
        errors = CounterMetricFamily("shuntd_metrics_source_errors",
                                     "Scrapes where reading a metrics source failed.",
                                     labels=["source"])
        with self._lock:
            for source, n in sorted(self._errors.items()):
                errors.add_metric([source], n)
        yield errors

    def _guard(self, name: str, source: Callable[[], Any] | None,
               build: Callable[[Any], list[Metric]]) -> list[Metric]:
        if source is None:
            return []
        try:
            return build(source())
        except Exception as exc:  # a source must never break the scrape
            with self._lock:
                self._errors[name] = self._errors.get(name, 0) + 1
            log.warning("metrics source %s failed: %s", name, exc)
            return []


def _bpf_families(stats: Mapping[str, int]) -> list[Metric]:
    families: dict[str, CounterMetricFamily] = {}
    for stat, value in stats.items():
        m = STAT_METRICS.get(stat, StatMetric("xdp_stat", (("stat", stat),)))
        fam = families.get(m.name)
        if fam is None:
            fam = CounterMetricFamily(f"shuntd_{m.name}", STAT_HELP[m.name],
                                      labels=[k for k, _ in m.labels])
            families[m.name] = fam
        fam.add_metric([v for _, v in m.labels], int(value))
    if all(k in stats for k in _SEEN_BYTES_FROM):
        seen = CounterMetricFamily("shuntd_xdp_seen_bytes",
                                   "IP bytes the XDP program saw (passed + shunted).")
        seen.add_metric([], sum(int(stats[k]) for k in _SEEN_BYTES_FROM))
        families["xdp_seen_bytes"] = seen
    return list(families.values())


def _table_families(occ: Mapping[str, tuple[int, int]]) -> list[Metric]:
    active = GaugeMetricFamily("shuntd_shunt_table_entries", "Entries in a shunt map.",
                               labels=["table"])
    capacity = GaugeMetricFamily("shuntd_shunt_table_capacity",
                                 "Maximum entries of a shunt map.", labels=["table"])
    for table, (n, cap) in sorted(occ.items()):
        active.add_metric([table], n)
        capacity.add_metric([table], cap)
    return [active, capacity]


def _capture_families(workers: Mapping[str, tuple[int, int, int]]) -> list[Metric]:
    pkts = CounterMetricFamily("shuntd_capture_packets",
                               "Packets the capture socket received (after XDP).",
                               labels=["worker"])
    drops = CounterMetricFamily("shuntd_capture_kernel_drops",
                                "Packets the kernel dropped because the capture ring was full.",
                                labels=["worker"])
    resyncs = CounterMetricFamily(
        "shuntd_capture_ring_resyncs",
        "Times the kernel went on past the ring block the reader waited for, and the reader "
        "skipped ahead to the next ready block (seen on overload).", labels=["worker"])
    for worker, (n, dropped, skipped) in sorted(workers.items()):
        pkts.add_metric([str(worker)], n)
        drops.add_metric([str(worker)], dropped)
        resyncs.add_metric([str(worker)], skipped)
    return [pkts, drops, resyncs]


def _conn_families(active: int) -> list[Metric]:
    return [GaugeMetricFamily("shuntd_connections_active",
                              "Connections the tracker currently holds.", value=int(active))]


def _worker_families(workers: Mapping[str, tuple[int, int]]) -> list[Metric]:
    conns = GaugeMetricFamily("shuntd_worker_connections_active",
                              "Connections a worker process holds (as it last reported).",
                              labels=["worker"])
    dropped = CounterMetricFamily("shuntd_worker_messages_dropped",
                                  "Messages (ring events, reload, stop) the parent could not "
                                  "queue for a worker that stopped reading.", labels=["worker"])
    for worker, (n, lost) in sorted(workers.items()):
        conns.add_metric([str(worker)], n)
        dropped.add_metric([str(worker)], lost)
    return [conns, dropped]


def _evict_families(evicted: int) -> list[Metric]:
    return [CounterMetricFamily("shuntd_connections_evicted",
                                "Connections evicted by the bound on tracked connections "
                                "(logged as on timeout).", value=int(evicted))]


def _lag_families(lag: float) -> list[Metric]:
    return [GaugeMetricFamily("shuntd_capture_lag_seconds",
                              "How long the newest packet analysed had waited since its capture, "
                              "at the end of the last batch.", value=float(lag))]


def _log_families(logs: Mapping[str, tuple[int, int]]) -> list[Metric]:
    held = GaugeMetricFamily("shuntd_log_records_held",
                             "Records held in memory because the disk is full.", labels=["log"])
    errors = CounterMetricFamily("shuntd_log_disk_full_errors",
                                 "Log writes that failed because the disk was full.",
                                 labels=["log"])
    for name, (n, e) in sorted(logs.items()):
        held.add_metric([name], n)
        errors.add_metric([name], e)
    return [held, errors]


def _run_families(run: ProgRunStats | None) -> list[Metric]:
    if run is None:
        return []  # kernel.bpf_stats_enabled is off: absent rather than a misleading 0
    return [
        CounterMetricFamily("shuntd_xdp_run_seconds",
                            "Kernel-measured time spent in the XDP program "
                            "(needs kernel.bpf_stats_enabled=1).",
                            value=run.run_time_ns / 1e9),
        CounterMetricFamily("shuntd_xdp_run_count",
                            "Runs of the XDP program counted while bpf stats were on.",
                            value=run.run_cnt),
    ]


# ---------------------------------------------------------------------------------------------
# What the daemon holds


class EventCounts:
    """The counters of events only the daemon sees, as plain integers: incremented by its loop
    (one thread; a scrape only reads, from copies), exposed as prometheus-client Counters are
    (`_total`, and `_created`: when each series was made)."""

    def __init__(self) -> None:
        now = time.time()
        self.inserts: dict[tuple[str, str], int] = {}  # (trigger, result): a trigger's all
        self.inserts_created: dict[tuple[str, str], float] = {}  # all results: first insert
        self.removals = dict.fromkeys(((t, r) for t in TABLES for r in REMOVAL_REASONS), 0)
        self.removals_created = dict.fromkeys(self.removals, now)
        self.ring = dict.fromkeys(RING_EVENT_TYPES, 0)
        self.ring_created = dict.fromkeys(self.ring, now)
        self.logged = 0
        self.logged_created = now

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        inserts = CounterMetricFamily("shuntd_shunt_inserts",
                                      "Attempts to shunt, by trigger and result.",
                                      labels=["trigger", "result"])
        created = self.inserts_created.copy()
        for key, n in self.inserts.copy().items():
            inserts.add_metric(key, n, created=created.get(key))
        yield inserts
        removals = CounterMetricFamily("shuntd_shunt_removals",
                                       "Shunt entries removed, by table and reason.",
                                       labels=["table", "reason"])
        for key, n in self.removals.copy().items():
            removals.add_metric(key, n, created=self.removals_created[key])
        yield removals
        ring = CounterMetricFamily("shuntd_ring_events_received",
                                   "Ring buffer events the daemon read, by type.",
                                   labels=["type"])
        for kind, n in self.ring.copy().items():
            ring.add_metric([kind], n, created=self.ring_created[kind])
        yield ring
        logged = CounterMetricFamily("shuntd_connections_logged",
                                     "Connections written to conn.log.")
        logged.add_metric([], self.logged, created=self.logged_created)
        yield logged


class Metrics:
    """The daemon's metrics: its own registry, the counters it increments, the collector."""

    def __init__(self, sources: MetricSources | None = None, *, interface: str = "",
                 xdp_mode: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._info = {"version": __version__, "interface": interface, "xdp_mode": xdp_mode}
        # Every removal and ring event series exists from the start (rate() needs the zero).
        self.counts = EventCounts()
        self._inserts = self.counts.inserts
        self._removals = self.counts.removals
        self._ring = self.counts.ring
        self.registry.register(self.counts)
        self.collector = ShuntdCollector(sources or MetricSources(), lambda: dict(self._info))
        self.registry.register(self.collector)

    def set_datapath(self, interface: str, xdp_mode: str) -> None:
        """Update the info metric once XDP is attached (mode e.g. "native", "generic")."""
        self._info = {**self._info, "interface": interface, "xdp_mode": xdp_mode}

    def shunt_insert(self, trigger: str, result: Any) -> None:
        """Count one insert attempt; result is a ShuntResult or its value string."""
        key = (trigger, result)
        counts = self._inserts
        if key in counts:  # (only known triggers and result strings are keys)
            counts[key] += 1
            return
        value = str(getattr(result, "value", result))
        if value not in INSERT_RESULTS:
            raise ValueError(f"shunt insert result {value!r} not one of {INSERT_RESULTS}")
        trigger = trigger or "unknown"
        if (trigger, value) not in counts:  # a new trigger: all its series from now on
            now = time.time()
            for r in INSERT_RESULTS:
                counts[(trigger, r)] = 0
                self.counts.inserts_created[(trigger, r)] = now
        counts[(trigger, value)] += 1

    def shunt_removed(self, reason: str, table: str = "flows") -> None:
        key = (table, reason)
        counts = self._removals
        if key in counts:
            counts[key] += 1
            return
        if reason not in REMOVAL_REASONS:
            raise ValueError(f"removal reason {reason!r} not one of {REMOVAL_REASONS}")
        raise ValueError(f"table {table!r} not one of {TABLES}")

    def ring_event(self, kind: str, count: int = 1) -> None:
        counts = self._ring
        if kind not in counts:
            raise ValueError(f"ring event type {kind!r} not one of {RING_EVENT_TYPES}")
        if count < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        counts[kind] += count

    def connection_logged(self, count: int = 1) -> None:
        if count < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.counts.logged += count

    def exposition(self) -> bytes:
        """The text format a scrape returns (for tests and `shuntctl metrics`)."""
        return generate_latest(self.registry)


class MetricsServer:
    """prometheus-client's HTTP server on one address, in a daemon thread; `close()` stops it."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        if not is_loopback_host(host):
            log.warning("metrics: listening on non-loopback address %s:%d; anyone who can "
                        "reach it can read shuntd's metrics", host, port)
        try:
            self._server, self._thread = start_http_server(port, host, metrics.registry)
        except OSError as exc:
            raise OSError(exc.errno, f"metrics: cannot listen on {host}:{port}: "
                                     f"{exc.strerror}") from None
        self.host = host
        self.port = int(self._server.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_metrics(metrics: Metrics, addr_text: str) -> MetricsServer | None:
    """Start the server for a --metrics-addr value; None when it is `none`."""
    addr = parse_metrics_addr(addr_text)
    if addr is None:
        return None
    return MetricsServer(metrics, *addr)
