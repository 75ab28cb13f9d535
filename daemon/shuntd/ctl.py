"""`shuntctl`: inspect and steer the pinned shunt maps of one interface, with or without a
running shuntd (/sys/fs/bpf/shuntd/<iface>/).

The maps are opened by compiling the program against the pin directory (bcc adopts existing
pins, ~1 s) with the map sizes read from the pins, so keys and values use exactly the layouts
of program.py; nothing is attached and no pin is created. Exit codes: 0 ok, 1 operation failed,
2 usage error, 3 nothing pinned for that interface.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import ipaddress
import json
import os
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_PINNED = 0, 1, 2, 3
PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "icmp6": 58, "ipv6-icmp": 58}
BPF_LINK_TYPE_XDP = 6


class CtlError(Exception):
    """A failed operation: message for the operator, exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------
# Opening the pins


class PinnedMaps:
    """The program compiled against an interface's pins, and a ShuntTable on it."""

    def __init__(self, ifname: str, pin_root: Path):
        from shuntd.datapath import pins
        from shuntd.datapath.errors import DatapathError
        from shuntd.datapath.program import XdpProgram
        from shuntd.datapath.table import ShuntTable

        try:
            self.pin_dir = pins.pin_dir(ifname, pin_root)
        except ValueError as exc:
            raise CtlError(str(exc), EXIT_USAGE) from None
        needed = ("flows", "ip_pairs", "config", "stats", "pair_filter")
        missing = [n for n in needed if not (self.pin_dir / n).exists()]
        if missing:
            raise CtlError(f"nothing pinned for {ifname!r}: {self.pin_dir} lacks "
                           f"{', '.join(missing)} (is shuntd running on it?)", EXIT_NOT_PINNED)
        try:
            flows = pins.pinned_layout(self.pin_dir / "flows")
            pairs = pins.pinned_layout(self.pin_dir / "ip_pairs")
            self.prog = XdpProgram.compile(flows_max=flows.max_entries,
                                           pairs_max=pairs.max_entries,
                                           pin_dir=str(self.pin_dir), calibrate=False)
        except DatapathError as exc:
            raise CtlError(f"cannot open the pinned maps in {self.pin_dir}: {exc}") from None
        self.table = ShuntTable(self.prog)

    def close(self) -> None:
        self.table.close()
        self.prog.close()

    def __enter__(self) -> PinnedMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# bpf_link lookup (what `bpftool link` does), for detach


class _LinkInfo(ctypes.Structure):
    """Prefix of struct bpf_link_info: the union starts 8-aligned at 16; xdp.ifindex first."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                ("ifindex", ctypes.c_uint32), ("_rest", ctypes.c_uint8 * 44)]


def xdp_links(ifindex: int) -> list[tuple[int, int]]:
    """(link id, prog id) of every XDP bpf_link on `ifindex`."""
    from shuntd.datapath import libbpf

    so = libbpf.lib()
    out: list[tuple[int, int]] = []
    link_id = ctypes.c_uint32(0)
    while so.bpf_link_get_next_id(link_id.value, ctypes.byref(link_id)) == 0:
        fd = so.bpf_link_get_fd_by_id(link_id.value)
        if fd < 0:
            continue
        try:
            info = _LinkInfo()
            size = ctypes.c_uint32(ctypes.sizeof(info))
            if so.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)) == 0 \
                    and info.type == BPF_LINK_TYPE_XDP and info.ifindex == ifindex:
                out.append((int(info.id), int(info.prog_id)))
        finally:
            os.close(fd)
    return out


def detach_links(ifindex: int) -> list[int]:
    """bpf_link_detach every XDP link on the interface (the owner keeps a dead link fd)."""
    from shuntd.datapath import libbpf

    so = libbpf.lib()
    done = []
    for link_id, _prog in xdp_links(ifindex):
        fd = so.bpf_link_get_fd_by_id(link_id)
        if fd < 0:
            continue
        try:
            libbpf.link_detach(fd)
            done.append(link_id)
        finally:
            os.close(fd)
    return done


# ---------------------------------------------------------------------------------------------
# Formatting


def _addr(a: Any) -> str:
    return f"[{a}]" if isinstance(a, ipaddress.IPv6Address) else str(a)


def _proto_name(num: int) -> str:
    names = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp6"}
    return names.get(num, str(num))


def _entry_row(kind: str, key: Any, c: Any) -> dict[str, Any]:
    from shuntd.datapath.program import key_endpoints, monotonic_ns

    a1, p1, a2, p2 = key_endpoints(key)
    row: dict[str, Any] = {"kind": kind, "addr1": str(a1), "addr2": str(a2)}
    if kind == "flow":
        row.update(port1=p1, port2=p2, proto=_proto_name(int(key.proto)))
    row.update(vlan=int(key.vlan_outer), inner_vlan=int(key.vlan_inner),
               pkts1=c.pkts1, bytes1=c.bytes1, pkts2=c.pkts2, bytes2=c.bytes2,
               pkts=c.pkts1 + c.pkts2, bytes=c.bytes1 + c.bytes2,
               last_seen=c.last_seen, lease_left_s=round((c.lease_expiry_ns - monotonic_ns())
                                                        / 1e9, 3), trigger=c.trigger)
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    import time

    head = ("KIND", "ENDPOINT 1", "ENDPOINT 2", "PROTO", "PKTS", "BYTES", "LAST SEEN", "LEASE")
    lines = [head]
    for r in rows:
        if r["kind"] == "flow":
            e1 = f"{_addr(ipaddress.ip_address(r['addr1']))}:{r['port1']}"
            e2 = f"{_addr(ipaddress.ip_address(r['addr2']))}:{r['port2']}"
        else:
            e1, e2 = r["addr1"], r["addr2"]
        seen = (time.strftime("%H:%M:%S", time.localtime(r["last_seen"]))
                if r["last_seen"] else "-")
        lines.append((r["kind"], e1, e2, r.get("proto", "any"), str(r["pkts"]),
                      str(r["bytes"]), seen, f"{r['lease_left_s']:.0f}s"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(col.ljust(w) for col, w in zip(line, widths, strict=True))
                     .rstrip() for line in lines)


# ---------------------------------------------------------------------------------------------
# Commands


def _endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise CtlError(f"endpoint {text!r} is not ADDR:PORT", EXIT_USAGE)
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        value = int(port)
    except ValueError:
        raise CtlError(f"endpoint {text!r} is not ADDR:PORT", EXIT_USAGE) from None
    if not 0 <= value <= 65535:
        raise CtlError(f"port out of range in {text!r}", EXIT_USAGE)
    return host, value


def _proto(text: str) -> int:
    if text.lower() in PROTOS:
        return PROTOS[text.lower()]
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 255:
        raise CtlError(f"unknown protocol {text!r}: tcp, udp, icmp, icmp6 or 0-255",
                       EXIT_USAGE)
    return value


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise CtlError(f"not an IP address: {text!r}", EXIT_USAGE) from None


def _target(args: argparse.Namespace) -> tuple[str, tuple[Any, ...]]:
    if args.flow:
        (s, sp), (d, dp) = _endpoint(args.flow[0]), _endpoint(args.flow[1])
        return "flow", (s, sp, d, dp, _proto(args.proto))
    if args.pair:
        return "pair", (_ip(args.pair[0]), _ip(args.pair[1]))
    raise CtlError("give --flow SRC:PORT DST:PORT [--proto P] or --pair A B", EXIT_USAGE)


def cmd_status(args: argparse.Namespace, maps: PinnedMaps) -> int:
    from shuntd.datapath.errors import InterfaceError
    from shuntd.datapath.iface import interface_info
    from shuntd.datapath.program import CFG_PASS_ALL
    from shuntd.datapath.stats import read_stats
    from shuntd.shunting import trigger_name

    t = maps.table
    cfg = maps.prog.read_config()
    status: dict[str, Any] = {"interface": args.iface, "pin_dir": str(maps.pin_dir)}
    try:
        info = interface_info(args.iface)
        status.update(ifindex=info.index, mode=info.xdp.mode.name.lower(),
                      prog_id=info.xdp.prog_id or None,
                      links=[{"id": i, "prog_id": p} for i, p in xdp_links(info.index)])
    except InterfaceError:
        status.update(ifindex=None, mode="interface missing", prog_id=None, links=[])
    # Early shunts (docs/operations.md): on while the port is set and shuntd's deadline runs.
    left = (int(cfg.early_until_ns) - maps.prog.map_now_ns()) / 1e9 if cfg.early_port else 0.0
    status["early"] = {"port": int(cfg.early_port) if left > 0 else 0,
                       "trigger": trigger_name(int(cfg.early_trigger)) if left > 0 else None,
                       "seconds_left": round(max(left, 0.0), 1)}
    status.update(pass_all=bool(cfg.flags & CFG_PASS_ALL), flows=t.occupancy,
                  flows_max=t.capacity, pairs=t.pair_occupancy, pairs_max=t.pair_capacity,
                  stats=read_stats(maps.prog))
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    print(f"interface  {status['interface']} (ifindex {status['ifindex']})")
    links = ", ".join(f"link {x['id']}" for x in status["links"]) or "no bpf_link"
    print(f"xdp        {status['mode']}, program id {status['prog_id']} ({links})")
    print(f"pass-all   {'ON (nothing is dropped)' if status['pass_all'] else 'off'}")
    early = status["early"]
    print("early      " + (f"on: TLS handshakes on port {early['port']} (trigger "
                             f"{early['trigger']}), {early['seconds_left']} s left unless "
                             "shuntd renews it" if early["port"] else "off"))
    print(f"flows      {t.occupancy} / {t.capacity}")
    print(f"ip pairs   {t.pair_occupancy} / {t.pair_capacity}")
    print(f"pins       {maps.pin_dir}")
    for name, value in status["stats"].items():
        print(f"  {name:<24} {value}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace, maps: PinnedMaps) -> int:
    rows = [_entry_row("flow", k, c) for k, c in maps.table.entries()]
    rows += [_entry_row("pair", k, c) for k, c in maps.table.pair_entries()]
    sort_key = {"pkts": "pkts", "bytes": "bytes", "last-seen": "last_seen"}[args.sort]
    rows.sort(key=lambda r: r[sort_key] or 0, reverse=True)
    print(json.dumps(rows, indent=2) if args.json else _table(rows))
    return EXIT_OK


def cmd_shunt(args: argparse.Namespace, maps: PinnedMaps) -> int:
    from shuntd.datapath.table import ShuntResult

    kind, target = _target(args)
    lease = args.lease
    if kind == "flow":
        result = maps.table.shunt_flow(*target, lease_seconds=lease)
    else:
        result = maps.table.shunt_pair(*target, lease_seconds=lease)
    if result is ShuntResult.OK:
        print(f"shunted {kind} for {lease:g} s (the daemon renews only what it shunted)")
        return EXIT_OK
    if result is ShuntResult.EXISTS:
        print(f"{kind} already shunted")
        return EXIT_OK
    raise CtlError(f"shunt failed: {result.value} {maps.table.last_error}".rstrip())


def _refuse_behind_shuntd(args: argparse.Namespace, what: str) -> None:
    """A running shuntd (its bpf_link on the interface) owns the entries: deleting them here
    would lose their counters from conn.log and shunt.log, so that needs --force."""
    from shuntd.datapath.errors import InterfaceError
    from shuntd.datapath.iface import interface_info

    if args.force:
        return
    try:
        links = xdp_links(interface_info(args.iface).index)
    except InterfaceError:
        return
    if links:
        raise CtlError(f"shuntd is running on {args.iface}: {what} would lose the entries' "
                       "counters from conn.log and shunt.log (a policy's unshunt(conn), or "
                       "stopping shuntd, logs them); --force does it anyway and prints them",
                       EXIT_FAILED)


def cmd_unshunt(args: argparse.Namespace, maps: PinnedMaps) -> int:
    kind, target = _target(args)
    _refuse_behind_shuntd(args, f"unshunting a {kind} by hand")
    if kind == "flow":
        counters = maps.table.unshunt_flow(*target)
    else:
        counters = maps.table.unshunt_pair(*target)
    if counters is None:
        raise CtlError(f"{kind} is not shunted")
    out = {"pkts1": counters.pkts1, "bytes1": counters.bytes1, "pkts2": counters.pkts2,
           "bytes2": counters.bytes2}
    print(json.dumps(out) if args.json else
          "unshunted; final counters " + " ".join(f"{k}={v}" for k, v in out.items()))
    return EXIT_OK


def cmd_flush(args: argparse.Namespace, maps: PinnedMaps) -> int:
    _refuse_behind_shuntd(args, "flushing the maps")
    t = maps.table
    flows = [k for k, _ in t.entries()]
    pairs = [k for k, _ in t.pair_entries()]
    removed = sum(t.unshunt_key(k) is not None for k in flows)
    for key in pairs:
        a1, _, a2, _ = _endpoints(key)
        if t.unshunt_pair(a1, a2, int(key.vlan_outer), int(key.vlan_inner)) is not None:
            removed += 1
    print(json.dumps({"removed": removed}) if args.json else f"removed {removed} entries")
    return EXIT_OK


def _endpoints(key: Any) -> tuple[Any, int, Any, int]:
    from shuntd.datapath.program import key_endpoints

    return key_endpoints(key)


def cmd_detach(args: argparse.Namespace, maps: PinnedMaps | None) -> int:
    """Fail open: pass-all first (works even if the detach below fails), then remove the
    program from the interface: detach its bpf_link(s), else a legacy netlink attach."""
    from pyroute2 import IPRoute

    from shuntd.datapath.errors import InterfaceError
    from shuntd.datapath.iface import interface_info

    did = []
    if maps is not None:
        maps.table.set_pass_all(True)
        did.append("pass-all set")
    try:
        info = interface_info(args.iface)
    except InterfaceError as exc:
        if maps is None:
            raise CtlError(str(exc), EXIT_NOT_PINNED) from None
        print("; ".join(did) + f"; interface {args.iface!r} is gone")
        return EXIT_OK
    links = detach_links(info.index)
    did += [f"bpf_link {i} detached" for i in links]
    state = interface_info(args.iface).xdp
    if state.prog_id:
        with IPRoute() as ipr:  # legacy attach (ip link set ... xdp): no link to detach
            ipr.link("set", index=info.index, xdp_fd=-1)
        did.append(f"legacy XDP program {state.prog_id} removed")
    if interface_info(args.iface).xdp.prog_id:
        raise CtlError("; ".join(did) + "; an XDP program is still attached")
    if not did:
        did.append("no XDP program was attached")
    print("; ".join(did))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from shuntd.datapath.pins import PIN_ROOT

    p = argparse.ArgumentParser(prog="shuntctl",  # the docstring's first paragraph
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--pin-root", default=str(PIN_ROOT), help=f"({PIN_ROOT})")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=text)
        sp.add_argument("iface", help="interface shuntd runs on")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    add("status", "interface, mode, program, occupancy, counters")
    lst = add("list", "shunted flows and pairs with their counters")
    lst.add_argument("--sort", choices=("pkts", "bytes", "last-seen"), default="pkts")
    for name in ("shunt", "unshunt"):
        sp = add(name, f"{name} a flow or an IP pair by hand")
        sp.add_argument("--flow", nargs=2, metavar=("SRC:PORT", "DST:PORT"))
        sp.add_argument("--proto", default="tcp", help="tcp, udp, icmp, icmp6 or a number")
        sp.add_argument("--pair", nargs=2, metavar=("A", "B"))
        if name == "unshunt":
            sp.add_argument("--force", action="store_true",
                            help="even while shuntd runs (the counters are printed, not logged)")
        if name == "shunt":
            sp.add_argument("--lease", type=float, default=300.0,
                            help="seconds until XDP passes the flow again (300)")
    add("flush", "remove every shunted flow and pair").add_argument(
        "--force", action="store_true",
        help="even while shuntd runs (the entries' counters are not logged)")
    add("detach", "emergency fail-open: pass-all, then remove the XDP program")
    return p


COMMANDS = {"status": cmd_status, "list": cmd_list, "shunt": cmd_shunt,
            "unshunt": cmd_unshunt, "flush": cmd_flush}


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise CtlError(f"shuntctl needs root (or CAP_BPF): sudo shuntctl {args.command} ...",
                       EXIT_FAILED)
    if getattr(args, "lease", 1.0) <= 0:
        raise CtlError("--lease must be positive", EXIT_USAGE)
    if args.command in ("shunt", "unshunt"):
        _target(args)  # usage errors before the 1 s compile
    root = Path(args.pin_root)
    if args.command == "detach":
        try:
            maps: PinnedMaps | None = PinnedMaps(args.iface, root)
        except CtlError as exc:
            if exc.code != EXIT_NOT_PINNED:  # e.g. no compiler: say so, still detach
                print(f"shuntctl: cannot set pass-all: {exc}", file=sys.stderr)
            maps = None  # still remove a program: detach must work in every state
        try:
            return cmd_detach(args, maps)
        finally:
            if maps is not None:
                maps.close()
    with PinnedMaps(args.iface, root) as maps:
        return COMMANDS[args.command](args, maps)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except CtlError as exc:
        print(f"shuntctl: {exc}", file=sys.stderr)
        return exc.code
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            print("shuntctl: permission denied: shuntctl needs root (or CAP_BPF)",
                  file=sys.stderr)
        else:
            print(f"shuntctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
