"""Prometheus metrics: exposition lint (promtool), a real Prometheus scraping numbers produced by
the real XDP program under BPF_PROG_TEST_RUN, and --metrics-addr parsing.

Expected values come from the test itself: N packets sent, IP length computed by hand from the
frame built (IPv4 20 + TCP 20 + payload), capacities passed to compile().
"""

from __future__ import annotations

import ctypes
import logging
import time
import urllib.request

import pytest
from lab import is_root
from prom import PrometheusServer, have_prometheus, promtool_check_metrics
from shuntd.metrics import (
    DEFAULT_METRICS_ADDR,
    INSERT_RESULTS,
    REMOVAL_REASONS,
    STAT_METRICS,
    Metrics,
    MetricsAddrError,
    MetricSources,
    MetricsServer,
    ProgRunStats,
    datapath_sources,
    metrics_addr_arg,
    parse_metrics_addr,
    read_prog_run_stats,
    serve_metrics,
)

needs_root = pytest.mark.skipif(not is_root(), reason="needs root (BPF)")
needs_prometheus = pytest.mark.skipif(not have_prometheus(), reason="no /usr/bin/prometheus")

A, B = "10.77.0.1", "10.77.0.2"
PAYLOAD = b"m" * 100
IP_LEN = 20 + 20 + len(PAYLOAD)  # IPv4 header + TCP header (no options) + payload


def _all_stat_names() -> list[str]:
    from shuntd.datapath.stats import STAT_NAMES

    return list(STAT_NAMES)


def populated_metrics() -> Metrics:
    """A Metrics object with every metric family present and nonzero values."""
    stats = {name: 1000 + i for i, name in enumerate(_all_stat_names())}
    sources = MetricSources(
        bpf_stats=lambda: stats,
        table_occupancy=lambda: {"flows": (12, 131072), "ip_pairs": (1, 16384)},
        capture_stats=lambda: {"0": (5000, 3, 2), "1": (4000, 0, 0)},
        connections_active=lambda: 42,
        capture_lag=lambda: 0.25,
        prog_run_stats=lambda: ProgRunStats(run_time_ns=2_500_000_000, run_cnt=100_000_000),
    )
    m = Metrics(sources, interface="eth1", xdp_mode="native")
    for result in INSERT_RESULTS:
        m.shunt_insert("tls", result)
    m.shunt_insert("bulk", "ok")
    for reason in REMOVAL_REASONS:
        m.shunt_removed(reason)
    m.shunt_removed("lease", table="ip_pairs")
    m.ring_event("fin", 3)
    m.ring_event("rst")
    m.connection_logged(7)
    return m


# -- (1) exposition --------------------------------------------------------------------------

def test_every_bpf_stat_has_a_metric_name():
    assert set(_all_stat_names()) == set(STAT_METRICS)


def test_promtool_check_metrics_is_clean():
    if not have_prometheus():
        pytest.skip("no promtool")
    text = populated_metrics().exposition()
    result = promtool_check_metrics(text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout


def test_exposition_names_and_values():
    text = populated_metrics().exposition().decode()
    stats = {name: 1000 + i for i, name in enumerate(_all_stat_names())}
    lines = set(text.splitlines())
    assert f'shuntd_xdp_shunted_packets_total{{table="flows"}} {stats["dropped_flow"]}.0' in lines
    assert f'shuntd_xdp_shunted_packets_total{{table="ip_pairs"}} {stats["dropped_pair"]}.0' \
        in lines
    seen_bytes = stats["bytes_passed"] + stats["bytes_dropped_flow"] + stats["bytes_dropped_pair"]
    assert f"shuntd_xdp_seen_bytes_total {seen_bytes}.0" in lines
    assert f'shuntd_ring_events_lost_total {stats["ringbuf_reserve_fail"]}.0' in lines
    assert 'shuntd_shunt_table_capacity{table="flows"} 131072.0' in lines
    assert 'shuntd_shunt_table_entries{table="ip_pairs"} 1.0' in lines
    assert 'shuntd_capture_kernel_drops_total{worker="0"} 3.0' in lines
    assert 'shuntd_capture_ring_resyncs_total{worker="0"} 2.0' in lines
    assert "shuntd_connections_active 42.0" in lines
    assert "shuntd_capture_lag_seconds 0.25" in lines
    assert "shuntd_connections_logged_total 7.0" in lines
    assert 'shuntd_shunt_inserts_total{result="full",trigger="tls"} 1.0' in lines
    assert 'shuntd_shunt_inserts_total{result="full",trigger="bulk"} 0.0' in lines
    assert 'shuntd_shunt_removals_total{reason="lease",table="ip_pairs"} 1.0' in lines
    assert 'shuntd_ring_events_received_total{type="fin"} 3.0' in lines
    assert "shuntd_xdp_run_seconds_total 2.5" in lines
    assert "shuntd_xdp_run_count_total 1e+08" in lines
    info = [ln for ln in lines if ln.startswith("shuntd_info{")]
    assert len(info) == 1 and 'interface="eth1"' in info[0] and 'xdp_mode="native"' in info[0]


def test_unknown_stat_and_failing_source_do_not_break_scrape(caplog):
    def broken() -> dict[str, tuple[int, int]]:
        raise OSError("map gone")

    m = Metrics(MetricSources(bpf_stats=lambda: {"seen": 5, "brand_new": 9},
                              table_occupancy=broken, prog_run_stats=lambda: None))
    with caplog.at_level(logging.WARNING, logger="shuntd.metrics"):
        text = m.exposition().decode()
    lines = set(text.splitlines())
    assert "shuntd_xdp_seen_packets_total 5.0" in lines
    assert 'shuntd_xdp_stat_total{stat="brand_new"} 9.0' in lines
    assert 'shuntd_metrics_source_errors_total{source="table_occupancy"} 1.0' in lines
    assert "shuntd_shunt_table_entries" not in text
    assert "shuntd_xdp_run_seconds" not in text  # run stats absent, not 0
    assert "map gone" in caplog.text


def test_repeated_events_add_up_and_every_series_has_its_creation_time():
    """The daemon's own counters are plain integers read at scrape time: repeats take the short
    path (a known trigger and result), a ShuntResult or an empty trigger the long one; each
    series still has its `_created` sample, as prometheus-client's Counter gives."""
    from shuntd.datapath.table import ShuntResult

    m = Metrics()
    for _ in range(3):
        m.shunt_insert("ssl", "ok")
    m.shunt_insert("ssl", ShuntResult.FULL)
    m.shunt_insert("", "error")
    m.shunt_insert("", "error")
    for _ in range(2):
        m.shunt_removed("fin")
    m.shunt_removed("orphaned", table="ip_pairs")
    m.ring_event("fin", 3)
    m.ring_event("fin")
    m.connection_logged()
    m.connection_logged(4)
    lines = m.exposition().decode().splitlines()
    values = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in lines
              if ln and not ln.startswith("#")}
    total = {k: v for k, v in values.items() if "_total" in k}
    assert total['shuntd_shunt_inserts_total{result="ok",trigger="ssl"}'] == 3
    assert total['shuntd_shunt_inserts_total{result="full",trigger="ssl"}'] == 1
    assert total['shuntd_shunt_inserts_total{result="exists",trigger="ssl"}'] == 0
    assert total['shuntd_shunt_inserts_total{result="error",trigger="unknown"}'] == 2
    assert len([k for k in total if k.startswith("shuntd_shunt_inserts_total")]) == 12  # 2 x 6
    assert total['shuntd_shunt_removals_total{reason="fin",table="flows"}'] == 2
    assert total['shuntd_shunt_removals_total{reason="orphaned",table="ip_pairs"}'] == 1
    assert sum(v for k, v in total.items() if k.startswith("shuntd_shunt_removals")) == 3
    assert total['shuntd_ring_events_received_total{type="fin"}'] == 4
    assert total['shuntd_ring_events_received_total{type="rst"}'] == 0
    assert total["shuntd_connections_logged_total"] == 5
    for k in total:
        if k.startswith(("shuntd_shunt_", "shuntd_ring_events_received", "shuntd_conn")):
            created = values[k.replace("_total", "_created")]
            assert 1e9 < created <= time.time(), k
    with pytest.raises(ValueError, match="non-negative"):
        m.ring_event("fin", -1)
    with pytest.raises(ValueError, match="non-negative"):
        m.connection_logged(-1)


def test_bad_label_values_are_refused_with_a_message():
    m = Metrics()
    with pytest.raises(ValueError, match="not one of"):
        m.shunt_insert("tls", "maybe")
    with pytest.raises(ValueError, match="removal reason"):
        m.shunt_removed("bored")
    with pytest.raises(ValueError, match="table"):
        m.shunt_removed("fin", table="routes")
    with pytest.raises(ValueError, match="ring event"):
        m.ring_event("syn")


# -- (3) --metrics-addr ------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9450", ("127.0.0.1", 9450)),
    ("0.0.0.0:9100", ("0.0.0.0", 9100)),
    ("localhost:1", ("localhost", 1)),
    ("[::1]:9450", ("::1", 9450)),
    ("[fe80::1]:0", ("fe80::1", 0)),
    ("  sensor-1.example.org:65535 ", ("sensor-1.example.org", 65535)),
    ("none", None),
    ("NONE", None),
])
def test_parse_metrics_addr(text, expected):
    assert parse_metrics_addr(text) == expected


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("127.0.0.1", "no port"),
    ("127.0.0.1:", "port must be"),
    ("127.0.0.1:65536", "port must be"),
    ("127.0.0.1:-1", "port must be"),
    ("127.0.0.1:http", "port must be"),
    (":9450", "no host"),
    ("::1:9450", "brackets"),
    ("[::1]9450", r"\[IPv6\]:PORT"),
    ("[10.0.0.1]:9450", "not an IPv6"),
    ("bad host:9450", "not a valid host"),
    ("-x.org:9450", "not a valid host"),
])
def test_parse_metrics_addr_errors(text, message):
    with pytest.raises(MetricsAddrError, match=message):
        parse_metrics_addr(text)


def test_metrics_addr_argparse_usage_error(capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="shuntd")
    parser.add_argument("--metrics-addr", type=metrics_addr_arg,
                        default=metrics_addr_arg(DEFAULT_METRICS_ADDR))
    assert parser.parse_args([]).metrics_addr == ("127.0.0.1", 9450)
    assert parser.parse_args(["--metrics-addr", "none"]).metrics_addr is None
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--metrics-addr", "127.0.0.1"])
    assert exc.value.code == 2
    assert "no port" in capsys.readouterr().err


def test_serve_none_is_off_and_server_stops():
    assert serve_metrics(Metrics(), "none") is None
    server = serve_metrics(Metrics(MetricSources(connections_active=lambda: 9)), "127.0.0.1:0")
    assert server is not None
    with server:
        with urllib.request.urlopen(server.url, timeout=5) as r:
            assert b"shuntd_connections_active 9.0" in r.read()
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=2)


def test_non_loopback_bind_warns(caplog):
    # 192.0.2.1 (TEST-NET-1) is on no interface here: the warning comes first, then the bind
    # fails with a message naming the address (and no port is ever opened beyond loopback).
    with caplog.at_level(logging.WARNING, logger="shuntd.metrics"):
        with pytest.raises(OSError, match=r"cannot listen on 192\.0\.2\.1:0"):
            MetricsServer(Metrics(), "192.0.2.1", 0)
    assert "non-loopback" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shuntd.metrics"):
        MetricsServer(Metrics(), "127.0.0.1", 0).close()
    assert "non-loopback" not in caplog.text


# -- (2) real program, real Prometheus -----------------------------------------------------------

@pytest.fixture(scope="module")
def prog():
    if not is_root():
        pytest.skip("needs root (BPF)")
    from shuntd.datapath.program import XdpProgram

    p = XdpProgram.compile(flows_max=64, pairs_max=8)
    yield p
    p.close()


@pytest.fixture
def table(prog):
    from shuntd.datapath.table import ShuntTable

    t = ShuntTable(prog, lease_seconds=60)
    yield t
    for key, _ in list(t.entries()):
        t.unshunt_key(key)
    t.close()


def _frame(sport: int) -> bytes:
    from xdp_frames import ip_len, tcp

    frame = tcp(A, sport, B, 443, payload=PAYLOAD)
    assert ip_len(frame) == IP_LEN
    return frame


@needs_root
@needs_prometheus
def test_prometheus_scrapes_shunted_packets_of_real_program(prog, table):
    from shuntd.datapath.program import XDP_DROP, XDP_PASS
    from shuntd.datapath.table import ShuntResult

    n_shunted, n_passed = 37, 5  # chosen here
    before = prog.stats()
    assert all(v == 0 for v in before.values()), before  # fresh program: counters start at 0

    metrics = Metrics(MetricSources(**datapath_sources(prog, table)),
                      interface="test", xdp_mode="test_run")
    result = table.shunt_flow(A, 40001, B, 443, 6, trigger=1)
    assert result is ShuntResult.OK
    metrics.shunt_insert("test", result)

    shunted, passed = _frame(40001), _frame(40002)
    assert prog.test_run(shunted, repeat=n_shunted - 7).retval == XDP_DROP
    for _ in range(7):
        assert prog.test_run(shunted).retval == XDP_DROP
    assert prog.test_run(passed, repeat=n_passed).retval == XDP_PASS

    with MetricsServer(metrics, "127.0.0.1", 0) as server, \
            PrometheusServer([f"127.0.0.1:{server.port}"], scrape_interval="1s") as prom:
        prom.wait_for_target_up(timeout=15)
        q = prom.wait_for_value
        q('shuntd_xdp_shunted_packets_total{table="flows"}', n_shunted)
        q('shuntd_xdp_shunted_bytes_total{table="flows"}', n_shunted * IP_LEN)
        q('shuntd_xdp_shunted_packets_total{table="ip_pairs"}', 0)
        q("shuntd_xdp_passed_packets_total", n_passed)
        q("shuntd_xdp_passed_bytes_total", n_passed * IP_LEN)
        q("shuntd_xdp_seen_packets_total", n_shunted + n_passed)
        q("shuntd_xdp_seen_bytes_total", (n_shunted + n_passed) * IP_LEN)
        q('shuntd_shunt_table_entries{table="flows"}', 1)
        q('shuntd_shunt_table_capacity{table="flows"}', 64)
        q('shuntd_shunt_table_capacity{table="ip_pairs"}', 8)
        q('shuntd_shunt_inserts_total{trigger="test",result="ok"}', 1)
        q('count(shuntd_info{interface="test",xdp_mode="test_run"})', 1)


def _enable_bpf_run_stats() -> int:
    """BPF_ENABLE_STATS: run-time stats on for as long as the returned fd is open (does not
    touch the sysctl, and ends with the fd even if the test dies)."""
    from shuntd.datapath import libbpf

    so = libbpf.lib()
    so.bpf_enable_stats.argtypes = [ctypes.c_int]
    fd = so.bpf_enable_stats(0)  # BPF_STATS_RUN_TIME
    if fd < 0:
        pytest.skip(f"BPF_ENABLE_STATS refused ({fd})")
    return fd


@needs_root
def test_prog_run_stats_count_test_runs(prog):
    import os

    from shuntd.metrics import bpf_stats_enabled

    fd = prog.prog_fd()
    if not bpf_stats_enabled():
        assert read_prog_run_stats(fd) is None  # sysctl off: metric absent
    k = 250  # chosen here
    stats_fd = _enable_bpf_run_stats()
    try:
        first = read_prog_run_stats(fd, require_sysctl=False)
        assert first is not None
        prog.test_run(_frame(40003), repeat=k)
        second = read_prog_run_stats(fd, require_sysctl=False)
    finally:
        os.close(stats_fd)
    assert second is not None
    assert second.run_cnt - first.run_cnt == k
    assert second.run_time_ns > first.run_time_ns
