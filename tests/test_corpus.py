"""Zeek's own conn.log baselines vs. the engine, on the real traces of ../shared/corpus.

Every trace in corpus/zeek/core/ and stretch/ (tunnels, odd link layers) must reproduce its
baseline: every row, no extra row, and the deterministic fields equal (corpus README), plus
the tunnel services of outer connections and tunnel_parents. Baselines are parsed by a small
reader here, not by our log writer. Run with `-s` to see the per-field match table.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from shuntd.conn.record import CONN_FIELDS
from shuntd.conn.settings import EngineSettings, bare_server_ports
from shuntd.conn.tracker import ConnTracker
from shuntd.offline import run_trace

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "zeek"

pytestmark = pytest.mark.corpus

EXACT_FIELDS = ("proto", "conn_state", "history", "orig_bytes", "resp_bytes", "missed_bytes",
                "orig_pkts", "orig_ip_bytes", "resp_pkts", "resp_ip_bytes")
DETECTED_SERVICES = {"ssl", "dtls", "http", "dns", "ssh", "quic"}
# Tunnel analyzers (packet analyzers, present in bare mode too) confirm their outer connection.
TUNNEL_SERVICES = {"vxlan", "geneve", "gtpv1", "teredo", "ayiya"}
COMPARED_SERVICES = DETECTED_SERVICES | TUNNEL_SERVICES


# Protocol scripts a bare-mode (`zeek -b`) test loads, which decides likely_server_ports.
# Guessed from the test name (scripts.base.protocols.<proto>...); core.* tests load only conn.
BARE_LOADS: dict[str, list[str]] = {
    "irc.starttls": ["irc", "ssl"],
    "xmpp.starttls": ["xmpp", "ssl"],
    "pop3.starttls": ["ssl"],
    "history-flip": ["http"],
    "local-flip": ["http"],
    "tcp.miss-end-data": ["http"],
    # Its baseline names ssl inside the CONNECT: the bare test must load the ssl scripts too.
    "http.http-connect-with-header": ["http", "ssl"],
    "radiotap": ["dns"],
    "wlanmon": ["dns"],
    "vlan-mpls": ["http"],
    # core.tunnels.* tests @load the protocols whose logs they check.
    "tunnels.analyzer-confirmation": ["http"],
    "tunnels.gtp.different_dl_and_ul": ["http"],
    "tunnels.teredo_bubble_with_payload": ["http"],
    "tunnels.gre-pptp": ["dns"],
    "tunnels.gtp.inner_ipv6": ["dns"],
    "tunnels.gtp.opt_header": ["ssl"],
    "tunnels.geneve-vxlan-truncated": ["dns"],
}

# Known, explained differences: (trace, row key text, field) -> reason. One line each.
_GRIDFTP = ("ftp.gridftp", "XXXXXXXXXX.XXXXXX 192.168.57.103 35391 192.168.57.101 55968 tcp")
_GRIDFTP_WHY = ("gridftp.zeek calls skip_further_processing on the SSL data channel once "
                "size_threshold is crossed; needs the FTP/GridFTP analyzers shuntd lacks")
KNOWN_EXCEPTIONS: dict[tuple[str, str, str], str] = {
    (*_GRIDFTP, f): _GRIDFTP_WHY
    for f in ("conn_state", "history", "orig_bytes", "resp_bytes", "orig_pkts", "orig_ip_bytes",
              "resp_pkts", "resp_ip_bytes", "duration")
}


def _bare_loads(name: str, meta: dict) -> list[str] | None:
    """Protocols a `zeek -b` test loads; None in default mode (everything loaded)."""
    if "-b" not in meta["command"].split():
        return None
    loads = BARE_LOADS.get(name)
    if loads is None:
        m = re.match(r"scripts\.base\.protocols\.([a-z0-9_-]+)\.", meta["source_test"])
        loads = [m.group(1)] if m else []
    return loads


def _hooks(loads: list[str] | None):
    """E3's EventDispatcher (service detection) when present; else no service compare.
    In bare mode only the analysers of the loaded protocol scripts exist."""
    try:
        from shuntd.conn.service import ServiceSettings
        from shuntd.events import EventDispatcher
    except ImportError:
        return None
    disabled = frozenset() if loads is None else frozenset(DETECTED_SERVICES - set(loads))
    return EventDispatcher(service_settings=ServiceSettings(disabled=disabled))


def _read_zeek_tsv(path: Path) -> list[dict[str, str]]:
    """Minimal Zeek ASCII log reader: #fields header, tab-separated rows, '#' comments."""
    fields: list[str] = []
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            if line.startswith("#fields\t"):
                fields = line.split("\t")[1:]
            continue
        if not line.strip():
            continue
        rows.append(dict(zip(fields, line.split("\t"), strict=False)))
    return rows


def _settings_for(name: str, meta: dict) -> EngineSettings:
    argv = meta["command"].split()
    kw: dict = {"ignore_checksums": "-C" in argv}
    if '"Tunnel::delay_teredo_confirmation=F"' in argv:
        kw["delay_teredo_confirmation"] = False
    loads = _bare_loads(name, meta)
    if loads is not None:
        tcp, udp = bare_server_ports(loads)
        kw["likely_tcp_ports"] = tcp
        kw["likely_udp_ports"] = udp
    nets: list[str] = []
    for redef in meta.get("redefs", []):
        m = re.match(r"redef Site::local_nets\s*\+?=\s*\{(.*)\};", redef)
        if m:
            nets += [n.strip() for n in m.group(1).split(",") if n.strip()]
    kw["local_nets"] = tuple(nets)
    return EngineSettings(**kw)


def _fmt(value: object) -> str:
    """Our row value -> the baseline's text for comparison of exact fields."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "T" if value else "F"
    return str(value)


def _parents_text(value: str, uids: dict[str, str]) -> str:
    """A tunnel_parents set as the sorted rows its uids name ("-" when unset)."""
    if value in ("-", "", "(empty)"):
        return "-"
    return " | ".join(sorted(uids.get(u, "ip-tunnel") for u in value.split(",")))


def _pair_key(row: dict[str, str]) -> tuple:
    return (row["id.orig_h"], row["id.orig_p"], row["id.resp_h"], row["id.resp_p"], row["proto"])


def compare_trace(trace_dir: Path) -> tuple[Counter, Counter, list[str]]:
    """Run one trace; returns (matches per field, compared per field, difference lines)."""
    meta = json.loads((trace_dir / "meta.json").read_text())
    name = trace_dir.name
    baseline = _read_zeek_tsv(trace_dir / "conn.log")
    trace = next(p for p in trace_dir.iterdir() if p.name.startswith("trace."))
    settings = _settings_for(name, meta)
    rows: list[tuple] = []
    hooks = _hooks(_bare_loads(name, meta))
    tracker = ConnTracker(settings, hooks=hooks, sink=lambda _c, row: rows.append(row))
    result = run_trace(trace, tracker)
    names = [f for f, _t in CONN_FIELDS]
    ours = [dict(zip(names, r, strict=True)) for r in rows]

    ok: Counter = Counter()
    total: Counter = Counter()
    diffs: list[str] = []
    if result.error:
        diffs.append(f"{name}: trace error {result.error}")
    compare_local = bool(settings.local_nets)

    # tunnel_parents: uids are random, so a parent is compared as the row it names, or as
    # "ip-tunnel" when it names no row (IP-in-IP and GRE tunnels make none, as in Zeek).
    base_uids = {b["uid"]: " ".join(_pair_key(b)) for b in baseline}
    our_uids = {r["uid"]: " ".join(str(r[k]) for k in ("id.orig_h", "id.orig_p", "id.resp_h",
                                                       "id.resp_p", "proto")) for r in ours}

    # Pair by 5-tuple+proto, then by ts (when the baseline has it) or by order.
    by_key: dict[tuple, list[dict]] = defaultdict(list)
    for r in ours:
        key = (r["id.orig_h"], str(r["id.orig_p"]), r["id.resp_h"], str(r["id.resp_p"]),
               r["proto"])
        by_key[key].append(r)
    for b in baseline:
        key = _pair_key(b)
        cands = by_key.get(key, [])
        match = None
        if b["ts"].startswith("X"):
            match = cands[0] if cands else None
        else:
            for c in cands:
                if f"{c['ts']:.6f}" == b["ts"]:
                    match = c
                    break
        total["row"] += 1
        label = f"{b['ts']} {' '.join(key)}"
        if match is None:
            diffs.append(f"{name}: missing row {label} {b.get('history')} {b.get('conn_state')}")
            continue
        cands.remove(match)
        ok["row"] += 1
        fields = list(EXACT_FIELDS) + ["duration"]
        if compare_local:
            fields += ["local_orig", "local_resp"]
        bsvc = b.get("service", "-")
        if hooks is not None and (bsvc == "-" or set(bsvc.split(",")) <= COMPARED_SERVICES):
            fields.append("service")
        if "tunnel_parents" in b:
            fields.append("tunnel_parents")
        for f in fields:
            want = b[f]
            got = match[f]
            if f == "tunnel_parents":
                want = _parents_text(b[f], base_uids)
                got = _parents_text(",".join(sorted(match[f] or ())), our_uids)
                same = want == got
            elif f == "duration":
                same = (want == "-" and got is None) or (
                    want != "-" and got is not None and abs(float(want) - got) <= 1e-5)
            else:
                same = _fmt(got) == want
            total[f] += 1
            if same:
                ok[f] += 1
            elif (name, label, f) not in KNOWN_EXCEPTIONS:
                diffs.append(f"{name}: {label} {f}: want {want!r} got {_fmt(got)!r}")
    for key, left in by_key.items():
        for r in left:
            total["row"] += 1
            diffs.append(f"{name}: extra row {r['ts']:.6f} {' '.join(map(str, key))} "
                         f"{r['history']} {r['conn_state']}")
    return ok, total, diffs


def _traces(group: str) -> list[Path]:
    d = CORPUS / group
    return sorted(p for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


def _report(title: str, ok: Counter, total: Counter) -> None:
    print(f"\n{title}: per-field match rate")
    for f in sorted(total):
        print(f"  {f:15s} {ok[f]:5d}/{total[f]:<5d} {100.0 * ok[f] / total[f]:6.2f}%")
    all_ok = sum(ok.values())
    all_total = sum(total.values())
    if all_total:
        print(f"  {'overall':15s} {all_ok:5d}/{all_total:<5d} {100.0 * all_ok / all_total:6.2f}%")


@pytest.mark.skipif(not (CORPUS / "core").is_dir(), reason="../shared/corpus is absent")
def test_core_corpus_matches_zeek() -> None:
    ok: Counter = Counter()
    total: Counter = Counter()
    diffs: list[str] = []
    for trace_dir in _traces("core"):
        o, t, d = compare_trace(trace_dir)
        ok.update(o)
        total.update(t)
        diffs += d
    _report("core corpus", ok, total)
    for line in diffs:
        print("  DIFF", line)
    assert not diffs, f"{len(diffs)} unexplained differences (first: {diffs[0]})"


@pytest.mark.skipif(not (CORPUS / "stretch").is_dir(), reason="../shared/corpus is absent")
def test_stretch_corpus_matches_zeek() -> None:
    """stretch/: tunnels Zeek decapsulates (rows, outer services, tunnel_parents) and odd
    link layers (802.11, radiotap, PPP, MPLS, ...), held to the same standard as core/."""
    ok: Counter = Counter()
    total: Counter = Counter()
    diffs: list[str] = []
    for trace_dir in _traces("stretch"):
        o, t, d = compare_trace(trace_dir)
        ok.update(o)
        total.update(t)
        diffs += d
    _report("stretch corpus", ok, total)
    for line in diffs:
        print("  DIFF", line)
    assert not diffs, f"{len(diffs)} unexplained differences (first: {diffs[0]})"
