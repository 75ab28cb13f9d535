"""`shuntd`: live, `shuntd --iface IFACE` (root); offline, `shuntd -r TRACE` (like `zeek -r`).

All engine options are parsed here, in one place (`add_engine_arguments` /
`settings_from_args`), so a TOML config can later fill the same `EngineSettings`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from shuntd.conn.settings import EngineSettings, bare_server_ports
from shuntd.logs.zeek import DEFAULT_HOLD_BYTES

_TIMEOUT_OPTIONS = (
    # (option, EngineSettings field, help)
    ("--tcp-inactivity-timeout", "tcp_inactivity_timeout", "TCP inactivity timeout (300)"),
    ("--udp-inactivity-timeout", "udp_inactivity_timeout",
     "UDP inactivity timeout, also TCP's before the handshake ends (60)"),
    ("--icmp-inactivity-timeout", "icmp_inactivity_timeout", "ICMP inactivity timeout (60)"),
    ("--unknown-ip-inactivity-timeout", "unknown_ip_inactivity_timeout",
     "inactivity timeout of other IP protocols (60)"),
    ("--tcp-syn-timeout", "tcp_SYN_timeout", "first TCP expire check after creation (5)"),
    ("--tcp-session-timer", "tcp_session_timer", "period of TCP expire checks (6)"),
    ("--tcp-connection-linger", "tcp_connection_linger", "idle time before TCP expiry (5)"),
    ("--tcp-attempt-delay", "tcp_attempt_delay", "unanswered SYN lifetime (5)"),
    ("--tcp-close-delay", "tcp_close_delay", "removal delay after a complete close (5)"),
    ("--tcp-reset-delay", "tcp_reset_delay", "reset timer delay (5)"),
    ("--tcp-partial-close-delay", "tcp_partial_close_delay", "partial close delay (3)"),
)


OFFLINE_CLOSE_RETRY = 3.0  # seconds `-r` waits at the end for a full disk to get space


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds: {text!r}")
    return value


def _port_timeouts(text: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        port, sep, secs = item.partition("=")
        try:
            out[int(port)] = _seconds(secs) if sep else 3600.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad PORT=SECS item: {item!r}") from None
    return out


def _ports(text: str) -> frozenset[int]:
    try:
        ports = frozenset(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port list: {text!r}") from None
    if any(not 0 <= p <= 65535 for p in ports):
        raise argparse.ArgumentTypeError(f"port out of range in {text!r}")
    return ports


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Every EngineSettings option as a flag."""
    g = parser.add_argument_group("connection engine")
    g.add_argument("-C", "--ignore-checksums", action="store_true",
                   help="do not verify IP/TCP/UDP/ICMP checksums (zeek -C)")
    g.add_argument("--local-nets", default="", metavar="CIDR,...",
                   help="Site::local_nets (added to the private address space)")
    g.add_argument("--no-private-local", action="store_true",
                   help="do not count the private address space as local")
    g.add_argument("--bare", nargs="?", const="", default=None, metavar="PROTO,...",
                   help="bare mode like `zeek -b`: no protocol analysers (service detection "
                        "off, TCP payload not copied; faster) and likely_server_ports of no "
                        "protocol; with PROTO,... only those protocols are loaded (e.g. "
                        "'http,ssl'); default: all base protocols")
    g.add_argument("--likely-tcp-ports", type=_ports, default=None, metavar="PORT,...",
                   help="likely_server_ports for TCP: decides which side is the originator "
                   "when the handshake was missed (default: those of the protocol analysers)")
    g.add_argument("--likely-udp-ports", type=_ports, default=None, metavar="PORT,...",
                   help="likely_server_ports for UDP (default: those of the protocol analysers)")
    g.add_argument("--port-inactivity-timeouts", type=_port_timeouts, default=None,
                   metavar="PORT=SECS,...", help="Conn::port_inactivity_timeouts "
                   "(default 21,22,23,513=3600)")
    for option, field, text in _TIMEOUT_OPTIONS:
        g.add_argument(option, dest=field, type=_seconds, default=None, metavar="SECS",
                       help=text)
    g.add_argument("--report-gaps-for-partial", action="store_true",
                   help="count missed_bytes (and raise content_gap) also for connections "
                   "whose handshake was not seen (Zeek's report_gaps_for_partial)")
    g.add_argument("--max-connections", type=int, default=1_000_000, metavar="N",
                   help="bound on tracked connections; past it the longest-inactive are "
                        "evicted and logged as on timeout (1000000)")


def settings_from_args(args: argparse.Namespace) -> EngineSettings:
    """Build EngineSettings from parsed flags (raises ValueError on bad combinations)."""
    s = EngineSettings()
    changes: dict[str, object] = {}
    for _option, field, _text in _TIMEOUT_OPTIONS:
        value = getattr(args, field)
        if value is not None:
            changes[field] = value
    changes["ignore_checksums"] = bool(args.ignore_checksums)
    changes["local_nets"] = tuple(c.strip() for c in args.local_nets.split(",") if c.strip())
    changes["private_address_space_is_local"] = not args.no_private_local
    changes["report_gaps_for_partial"] = bool(args.report_gaps_for_partial)
    for option in ("max_connections", "log_hold_max"):  # plain ints, so the config says so
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be >= 1, not "
                             f"{getattr(args, option)}")
    changes["max_connections"] = args.max_connections
    if args.bare is not None:
        tcp, udp = bare_server_ports([p.strip() for p in args.bare.split(",") if p.strip()])
        changes["likely_tcp_ports"] = tcp
        changes["likely_udp_ports"] = udp
    if args.likely_tcp_ports is not None:
        changes["likely_tcp_ports"] = args.likely_tcp_ports
    if args.likely_udp_ports is not None:
        changes["likely_udp_ports"] = args.likely_udp_ports
    if args.port_inactivity_timeouts is not None:
        changes["port_inactivity_timeouts"] = args.port_inactivity_timeouts
    return dataclasses.replace(s, **changes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shuntd", description=__doc__.splitlines()[0])
    p.add_argument("-r", "--read", metavar="TRACE", default=None,  # L1: or --iface
                   help="read packets from a pcap/pcapng file (offline mode)")
    p.add_argument("--log-dir", default=".", metavar="DIR", help="where conn.log goes (.)")
    p.add_argument("--log-format", choices=("tsv", "json"), default="tsv",
                   help="Zeek's tab-separated logs, or JSON lines with the same field names "
                   "(tsv)")
    p.add_argument("--log-hold-max", type=int, default=DEFAULT_HOLD_BYTES,
                   metavar="BYTES", help="disk full: bytes of records each log holds in "
                   "memory, retried every second; past it shuntd stops with an error "
                   f"({DEFAULT_HOLD_BYTES})")
    add_engine_arguments(p)
    # -- E3 (events): conn_long.log / contents extraction flags --
    from shuntd.eventopts import add_event_arguments
    add_event_arguments(p)
    # -- L1 (live daemon): --iface, --policy, --lease, ... --
    from shuntd.daemon import add_live_arguments
    add_live_arguments(p)
    # -- O1 (config): --config, --check-config, --print-default-config --
    from shuntd.config import add_config_arguments
    add_config_arguments(p)
    return p


def run_offline(args: argparse.Namespace) -> int:
    # Imported here so `shuntd --help` works even if a lower layer is broken.
    from shuntd.conn.record import CONN_FIELDS
    from shuntd.conn.tracker import ConnTracker
    from shuntd.logs.zeek import LogSchema, LogSpaceError, open_log
    from shuntd.offline import run_trace

    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"shuntd: {exc}", file=sys.stderr)
        return 2
    trace = Path(args.read)
    try:  # F1: a path we may not even stat (no search permission) is an error, not a traceback
        trace_is_file = trace.is_file()
    except OSError as exc:
        print(f"shuntd: cannot read trace {trace}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if not trace_is_file:
        print(f"shuntd: cannot read trace {trace}: no such file", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir)
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        writer = open_log(str(log_dir), LogSchema("conn", CONN_FIELDS), fmt=args.log_format,
                          buffered=True, hold_max=args.log_hold_max)
    except OSError as exc:
        print(f"shuntd: cannot write logs in {log_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2

    # -- E3 (events): the EventDispatcher (services, conn_long.log, contents) as hooks= --
    from shuntd.eventopts import dispatcher_from_args
    try:
        events = dispatcher_from_args(args, str(log_dir), args.log_format)
    except OSError as exc:
        writer.close()
        print(f"shuntd: cannot write logs in {log_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    hooks = events.dispatcher

    def sink(_conn: object, row: tuple) -> None:
        writer.write(row)

    try:  # F1: settings the engine rejects (e.g. --local-nets 10.0.0.0/33): one line, exit 2
        tracker = ConnTracker(settings, hooks=hooks, sink=sink)
    except ValueError as exc:
        writer.close()
        events.close()
        print(f"shuntd: {exc}", file=sys.stderr)
        return 2
    from shuntd.conn.tunnels import TUNNEL_FIELDS
    tunnel_log = open_log(str(log_dir), LogSchema("tunnel", TUNNEL_FIELDS), fmt=args.log_format)
    tracker.tunnels.write_log = tunnel_log.write   # tunnel.log, created with its first row
    try:
        result = run_trace(trace, tracker)
    except LogSpaceError as exc:  # disk full past --log-hold-max: stop loudly
        print(f"shuntd: {exc}", file=sys.stderr)
        return 1
    finally:
        writer.close(retry_seconds=OFFLINE_CLOSE_RETRY)
        tunnel_log.close()
        events.close()  # E3: conn_long.log
    if writer.unwritten:
        print(f"shuntd: disk full: {writer.unwritten} of {writer.records} records not written "
              f"to {writer.path}", file=sys.stderr)
        return 1
    lost = tracker.tunnels.log_errors + tunnel_log.unwritten
    if lost:
        print(f"shuntd: {lost} tunnel.log records not written (conn.log is complete)",
              file=sys.stderr)
        return 1
    if result.error:
        print(f"shuntd: {result.error}", file=sys.stderr)
        return 1
    return 0


def _start_problem(args: argparse.Namespace, policy_options: dict) -> str | None:
    """--check-config: what a start would refuse beyond the parser (settings, policy files)."""
    from shuntd.events import EVENTS, HOOKS
    from shuntd.policyfile import PolicyLoadError, load_all

    try:
        settings_from_args(args)
        load_all(list(args.policy), EVENTS + HOOKS, policy_options)
    except (ValueError, PolicyLoadError) as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    # -- O1 (config): the TOML file fills parser defaults; the command line overrides it --
    from shuntd import config
    parser = build_parser()
    try:
        effective = config.parse_with_config(parser, argv)
    except config.ConfigError as exc:
        print(f"shuntd: {exc}", file=sys.stderr)
        return 2
    args = effective.args
    if args.print_default_config:
        print(config.example_config(parser), end="")
        return 0
    if args.check_config:
        print(config.render_effective(parser, effective))
        problem = _start_problem(args, effective.config.policy_options)
        if problem:
            print(f"shuntd: {problem}", file=sys.stderr)
            return 2
        return 0
    args.policy_options = effective.config.policy_options  # -> policyfile.load_all(options=)
    # -- end O1 --
    try:
        # -- L1 (live daemon): `--iface` runs the daemon, `-r` the offline engine --
        if args.iface is not None and args.read is not None:
            print("shuntd: give either -r TRACE or --iface IFACE, not both", file=sys.stderr)
            return 2
        if args.iface is not None:
            from shuntd.daemon import run
            return run(args)
        if args.read is None:
            print("shuntd: give -r TRACE (offline) or --iface IFACE (live)", file=sys.stderr)
            return 2
        return run_offline(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
