"""Service detection: which analysers a connection gets and when `service` names appear (§6).

Mirrors Zeek's analyzer tree for the protocols shuntd knows (ssl, dtls, http, dns, ssh, quic):
1. by port: every analyser registered for the (post-first-flip) responder port is attached
   when the connection is created;
2. by content (DPD): a PIA buffers the first `dpd_buffer_size` bytes / `dpd_max_packets`
   chunks of each direction and matches Zeek's `dpd.sig` signatures anchored at the start;
   a match attaches the analyser and replays the buffered data to it;
3. only an analyser's confirmation appends its name to `conn.service` (confirmation order);
   a violation detaches it; a violation after confirmation, within the first
   `ignore_violations_after` bytes, removes the name again (or appends `-name` when
   `track_removed_services` is set), as `dpd.zeek` does (§6.4).
An HTTP CONNECT answered 2xx opens an inner layer (signatures only) over the tunnelled bytes.

Per-connection state lives in `conn.services` (None once nothing can change any more: the
analysers and buffers are freed then, not at removal); nothing here does I/O or knows policies:
results go to a `ServiceSink` (the event dispatcher).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from collections.abc import Callable
from typing import Any, Protocol

from .protocols.base import Analyzer
from .protocols.dns import DnsAnalyzer
from .protocols.dtls import DtlsAnalyzer
from .protocols.http import HttpAnalyzer
from .protocols.quic import QuicAnalyzer
from .protocols.ssh import SshAnalyzer
from .protocols.tls import TlsAnalyzer

# Analysers that ignore TCP connections picked up midstream (Zeek: `TCP()->IsPartial()`
# checks in HTTP.cc, SSL.cc, SSH.cc). "Midstream" here = no SYN or SYN-ACK from either side
# in the history so far: that matches every corpus baseline (SYN-ACK-first flips such as
# history-flip/local-flip are analysed, data-only `D`/`Dr` connections are not), where a
# literal reading of Zeek's is_partial bit would drop the former.
SKIP_PARTIAL = frozenset({"http", "ssl", "ssh"})
_SYN_LETTERS = frozenset("SHsh")


def _midstream(conn: Any, state: ConnServices) -> bool:
    if state.saw_syn:
        return False
    if _SYN_LETTERS.isdisjoint(conn.history):
        return True
    state.saw_syn = True
    return False

TCP_PORTS: dict[str, frozenset[int]] = {
    "ssl": frozenset({443, 465, 563, 585, 614, 636, 989, 990, 992, 993, 995, 5223}),
    "http": frozenset({80, 81, 631, 1080, 3128, 8000, 8080, 8888}),
    "dns": frozenset({53}),
    "ssh": frozenset({22}),
}
UDP_PORTS: dict[str, frozenset[int]] = {
    "dns": frozenset({53, 137, 5353, 5355}),
    "dtls": frozenset({443}),
    "quic": frozenset({443, 853, 784}),
}

_HTTP_METHODS = (
    b"OPTIONS|GET|HEAD|POST|PUT|DELETE|ACL|BASELINE-CONTROL|BIND|CHECKIN|CHECKOUT|CONNECT|COPY|"
    b"LABEL|LINK|LOCK|MERGE|MKACTIVITY|MKCALENDAR|MKCOL|MKREDIRECTREF|MOVE|ORDERPATCH|PATCH|"
    b"PROPFIND|PROPPATCH|REBIND|REPORT|SEARCH|TRACE|UNBIND|UNCHECKOUT|UNLINK|UNLOCK|UPDATE|"
    b"VERSION-CONTROL|BCOPY|BDELETE|BMOVE|BPROPFIND|BPROPPATCH|NOTIFY|POLL|SUBSCRIBE|"
    b"UNSUBSCRIBE|X-MS-ENUMATTS|MKWORKSPACE|RPC_IN_DATA|RPC_OUT_DATA"
)


@dataclasses.dataclass(frozen=True)
class Signature:
    """One `dpd.sig` entry: payload regex anchored at the start of one direction's data.

    `reach`: the longest match of the regex after its optional leading run of `lead` bytes
    (tests/test_service_detect.py checks it against the regex). A TCP prefix that does not
    match and is at least that long past its lead can never match, however it grows."""

    name: str
    analyzer: str
    pattern: re.Pattern[bytes]
    direction: str                  # "orig", "resp" or "any"
    requires_reverse: str | None = None   # another signature that must match the other side
    enables: bool = True
    reach: int = 0
    lead: bytes = b""


def _sig(name: str, analyzer: str, regex: bytes, direction: str, reach: int,
         requires_reverse: str | None = None, enables: bool = True,
         lead: bytes = b"") -> Signature:
    if lead:
        regex = b"[" + re.escape(lead) + b"]*(?:" + regex + b")"
    return Signature(name, analyzer, re.compile(regex, re.DOTALL), direction,
                     requires_reverse, enables, reach, lead)


TCP_SIGNATURES: tuple[Signature, ...] = (
    _sig("dpd_tls_client", "ssl",
         rb"(?:\x16\x03[\x00-\x03]..\x01...\x03[\x00-\x03]|...?\x01[\x00\x03][\x00-\x04])",
         "orig", 11),
    _sig("dpd_tls_server", "ssl",
         rb"(?:\x15\x03[\x00-\x03]....)?\x16\x03[\x00-\x03]..\x02...(?:\x03[\x00-\x04]|\x7f[\x00-\x50])",
         "resp", 18),
    _sig("dpd_http_client", "http", _HTTP_METHODS, "orig", 16, lead=b"\t\n\v\f\r "),
    _sig("dpd_http_server", "http", rb"[hH][tT][tT][pP]/[0-9]", "resp", 6),
    _sig("dpd_ssh_server", "ssh", rb"[sS][sS][hH]-", "resp", 4, enables=False),
    _sig("dpd_ssh_client", "ssh", rb"[sS][sS][hH]-[12]\.", "orig", 6,
         requires_reverse="dpd_ssh_server"),
)
UDP_SIGNATURES: tuple[Signature, ...] = (   # (each datagram matched alone: reach unused)
    _sig("dpd_dtls_client", "dtls",
         rb"\x16\xfe[\xff\xfd]\x00{7}...\x01.{11}\xfe[\xff\xfd]", "orig", 27),
    _sig("dpd_quic_initial", "quic", rb"[\xc0-\xcf]\x00\x00\x00\x01", "any", 5),
    _sig("dpd_quic_v2_initial", "quic", rb"[\xd0-\xdf]\x6b\x33\x43\xcf", "any", 5),
)
# Every analyser name: disabling all of them switches service detection off (bare mode).
ALL_ANALYZERS: frozenset[str] = (
    frozenset(TCP_PORTS) | frozenset(UDP_PORTS)
    | frozenset(s.analyzer for s in TCP_SIGNATURES + UDP_SIGNATURES))


_FACTORIES: dict[tuple[str, bool], Callable[[], Analyzer]] = {}
for _tcp in (True, False):
    _FACTORIES["ssl", _tcp] = TlsAnalyzer
    _FACTORIES["http", _tcp] = HttpAnalyzer
    _FACTORIES["dns", _tcp] = functools.partial(DnsAnalyzer, True) if _tcp else DnsAnalyzer
    _FACTORIES["ssh", _tcp] = SshAnalyzer
    _FACTORIES["dtls", _tcp] = DtlsAnalyzer
    _FACTORIES["quic", _tcp] = QuicAnalyzer
del _tcp


def make_analyzer(name: str, tcp: bool) -> Analyzer:
    factory = _FACTORIES.get((name, tcp))
    if factory is None:
        raise ValueError(f"unknown analyser {name!r}")
    return factory()


_NEVER = 1 << 62   # a prefix length never reached


class _Candidates:
    """Signatures a PIA still matches, and per direction one pattern of all of them: a
    packet none of them can match (nearly every one) costs one regex call, not one per
    signature. Made once per distinct set (ServiceDetection._candidates), never changed
    (`after_*` only remember what _prune derives from it)."""

    __slots__ = ("sigs", "orig", "resp", "settle_orig", "settle_resp", "full_orig",
                 "full_resp", "lead_orig", "lead_resp", "after_orig", "after_resp")

    def __init__(self, sigs: tuple[Signature, ...]) -> None:
        self.sigs = sigs
        self.orig = self._any_of([s for s in sigs if s.direction != "resp"])
        self.resp = self._any_of([s for s in sigs if s.direction != "orig"])
        # TCP (see _prune): a direction's prefix `settle_*` long may have outgrown one of
        # its signatures; `full_*` long (`lead_*` bytes skipped), all of them.
        own_orig = [s for s in sigs if s.direction == "orig"]
        own_resp = [s for s in sigs if s.direction == "resp"]
        self.settle_orig = min([s.reach for s in own_orig], default=_NEVER)
        self.settle_resp = min([s.reach for s in own_resp], default=_NEVER)
        self.full_orig = max([s.reach for s in own_orig], default=0)
        self.full_resp = max([s.reach for s in own_resp], default=0)
        self.lead_orig = frozenset(b"".join(s.lead for s in own_orig))
        self.lead_resp = frozenset(b"".join(s.lead for s in own_resp))
        # The candidates left once a direction outgrew all its unmatched signatures.
        self.after_orig: _Candidates | None = None
        self.after_resp: _Candidates | None = None

    @staticmethod
    def _any_of(sigs: list[Signature]) -> re.Pattern[bytes] | None:
        if not sigs:
            return None
        return re.compile(b"|".join(b"(?:" + s.pattern.pattern + b")" for s in sigs),
                          re.DOTALL)


_NO_CANDIDATES = _Candidates(())


@dataclasses.dataclass
class ServiceSettings:
    """Zeek's DPD options (names follow Zeek's globals)."""

    dpd_buffer_size: int = 1024
    dpd_max_packets: int = 100
    ignore_violations_after: int = 10240           # DPD::ignore_violations_after
    track_removed_services: bool = False           # DPD::track_removed_services_in_connection
    # Conn::analyzer_inactivity_timeouts (FTP too in Zeek; shuntd has no FTP analyser).
    analyzer_inactivity_timeouts: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"ssh": 3600.0})
    disabled: frozenset[str] = frozenset()         # analysers never attached


class ServiceSink(Protocol):
    """Where detection results go (implemented by the event dispatcher)."""

    def service_confirmed(self, conn: Any, name: str) -> None: ...
    def service_violation(self, conn: Any, name: str, reason: str) -> None: ...
    def ssl_established(self, conn: Any) -> None: ...
    def flip_roles(self, conn: Any) -> None: ...
    def set_inactivity_timeout(self, conn: Any, seconds: float) -> None: ...


_NO_MATCHES: frozenset[str] = frozenset()  # shared: frozenset() makes a new object


class _Layer:
    """Attached analysers plus the PIA still looking for signatures over the same bytes."""

    __slots__ = ("analyzers", "chunks", "prefix_orig", "prefix_resp", "count_orig",
                 "count_resp", "matched", "candidates", "done_orig", "done_resp")

    def __init__(self, candidates: _Candidates, analyzers: tuple[Analyzer, ...],
                 tcp: bool) -> None:
        # Replaced, never changed: a delivery loops over it while a verdict may attach one,
        # and once every analyser is done it is the shared empty tuple.
        self.analyzers = analyzers
        # The buffered chunks: a tuple replaced as it grows (at most dpd_max_packets a
        # direction), empty until the first; tuples of bytes drop out of the garbage
        # collector's scans, a list would be scanned until the connection is removed.
        self.chunks: tuple[tuple[bool, bytes], ...] = ()
        # TCP: the first bytes of each direction, matched as a whole; UDP: their number.
        self.prefix_orig: bytearray | bytes | int = b"" if tcp else 0
        self.prefix_resp: bytearray | bytes | int = b"" if tcp else 0
        self.count_orig = 0
        self.count_resp = 0
        self.matched: set[str] | frozenset[str] = _NO_MATCHES
        self.candidates = candidates   # no signatures = PIA finished
        self.done_orig = False         # that direction is past the DPD limits
        self.done_resp = False


class ConnServices(_Layer):
    """Service-detection state of one connection: its first layer (the analysers and the
    PIA over the connection's own bytes) and the layers an HTTP CONNECT opens inside."""

    __slots__ = ("tcp", "inner", "failed", "established", "active", "saw_syn")

    def __init__(self, candidates: _Candidates, analyzers: tuple[Analyzer, ...],
                 tcp: bool) -> None:
        _Layer.__init__(self, candidates, analyzers, tcp)
        self.tcp = tcp
        self.inner: list[_Layer] | tuple[()] = ()   # a list once a tunnel opens one
        # Analysers that confirmed and then failed (a tuple until the first one).
        self.failed: list[str] | tuple[str, ...] = ()
        self.established = False
        self.active = True                   # False once nothing can change any more
        self.saw_syn = False                 # a SYN/SYN-ACK is in the history (not midstream)

    @property
    def layers(self) -> tuple[_Layer, ...]:
        """Every layer, outermost first (a snapshot: a verdict may open another)."""
        return (self, *self.inner) if self.inner else (self,)


class ServiceDetection:
    """Attaches analysers to connections and turns their verdicts into `service` entries."""

    __slots__ = ("settings", "sink", "off", "_plans", "_cands")

    def __init__(self, sink: ServiceSink, settings: ServiceSettings | None = None) -> None:
        self.settings = settings or ServiceSettings()
        self.sink = sink
        # responder port (+ 65536 for TCP) -> (factories of the analysers attached by port,
        # signatures left to the PIA): at most 2 x 65536 entries, computed once each instead
        # of once per connection.
        self._plans: dict[int, tuple[tuple[Callable[[], Analyzer], ...], _Candidates]] = {}
        self._cands: dict[tuple[str, ...], _Candidates] = {}   # see _candidates
        # Bare mode without protocol analysers (`zeek -b`): no per-connection state at all.
        self.off = self.settings.disabled >= ALL_ANALYZERS

    # -- engine entry points -------------------------------------------------------------

    def new_connection(self, conn: Any) -> ConnServices | None:
        if self.off:
            return None
        key = conn.key   # (conn.proto and conn.resp_p without the properties)
        resp_p = key[4 - 2 * conn.orig_side]
        proto = key[0]
        if proto == 6:
            tcp = True
            plan = self._plans.get(resp_p + 65536)
        elif proto == 17:
            tcp = False
            plan = self._plans.get(resp_p)
        else:
            return None
        if plan is None:
            plan = self._plan(tcp, resp_p)
        factories, candidates = plan
        if len(factories) == 1:   # (most ports have one analyser, or none)
            analyzers: tuple[Analyzer, ...] = (factories[0](),)
        elif not factories:
            analyzers = ()
        else:
            analyzers = tuple([factory() for factory in factories])
        # The candidates are shared: a layer only ever replaces them, never changes them.
        state = conn.services = ConnServices(candidates, analyzers, tcp)
        return state

    def _plan(self, tcp: bool, resp_p: int) -> tuple[tuple[Callable[[], Analyzer], ...],
                                                    _Candidates]:
        ports, sigs = (TCP_PORTS, TCP_SIGNATURES) if tcp else (UDP_PORTS, UDP_SIGNATURES)
        disabled = self.settings.disabled
        names = tuple(name for name, plist in ports.items()
                      if resp_p in plist and name not in disabled)
        sigs_left = [s for s in sigs if s.analyzer not in names and s.analyzer not in disabled]
        plan = (tuple(_FACTORIES[name, tcp] for name in names), self._candidates(sigs_left))
        self._plans[resp_p + 65536 if tcp else resp_p] = plan
        return plan

    def _candidates(self, sigs: list[Signature]) -> _Candidates:
        """The shared _Candidates of these signatures (a handful of distinct sets exist)."""
        if not sigs:
            return _NO_CANDIDATES
        key = tuple(s.name for s in sigs)
        cands = self._cands.get(key)
        if cands is None:
            cands = self._cands[key] = _Candidates(tuple(sigs))
        return cands

    def udp_payload(self, conn: Any, is_orig: bool, payload: Any) -> None:
        """One UDP datagram, before ConnSize counts it (so a DNS flip attributes like Zeek).

        _deliver's steps for UDP's one layer (no tunnel opens inside UDP, no midstream
        rule), and the PIA's datagram-by-datagram matching inline: most UDP connections
        are a DNS query and its response, and this runs for both."""
        state = conn.services
        if state is None:
            return
        if state.inner:
            self._deliver(conn, state, is_orig, bytes(payload))
            return
        data = bytes(payload)
        analyzers = state.analyzers
        if analyzers:
            for an in analyzers:
                an.deliver(is_orig, data)
                self._verdict(conn, state, an)
        cands = state.candidates
        if cands.sigs and not (state.done_orig if is_orig else state.done_resp):
            # _pia for a datagram: each is matched alone; the prefix slots count bytes.
            if is_orig:
                count = state.count_orig = state.count_orig + 1
                buffered: int = state.prefix_orig  # type: ignore[assignment]
            else:
                count = state.count_resp = state.count_resp + 1
                buffered = state.prefix_resp  # type: ignore[assignment]
            settings = self.settings
            if buffered >= settings.dpd_buffer_size or count > settings.dpd_max_packets:
                self._pia_direction_done(state, is_orig)
            else:
                state.chunks = (*state.chunks, (is_orig, data))
                if is_orig:
                    state.prefix_orig = buffered + len(data)
                    any_of = cands.orig
                else:
                    state.prefix_resp = buffered + len(data)
                    any_of = cands.resp
                if any_of is not None and any_of.match(data) is not None:
                    self._pia_matched(conn, state, state, is_orig, data, cands)
        # _sweep, for the one layer (mostly one analyser, done after its first datagram)
        analyzers = state.analyzers
        for an in analyzers:
            if an.done:
                analyzers = state.analyzers = (
                    () if len(analyzers) == 1 else tuple([a for a in analyzers if not a.done]))
                break
        if state.candidates.sigs:
            return
        if state.chunks:
            state.chunks = ()
        if not analyzers:
            state.active = False
            conn.services = None   # frees the analysers; nothing reads it any more

    def tcp_deliver(self, conn: Any, is_orig: bool, data: bytes) -> None:
        state = conn.services
        if state is None or not data:
            return
        self._deliver(conn, state, is_orig, data)

    def content_gap(self, conn: Any, is_orig: bool, nbytes: int) -> None:
        state = conn.services
        if state is None:
            return
        for layer in state.layers:
            for an in layer.analyzers:
                an.gap(is_orig, nbytes)
            # Zeek's PIA stops matching a direction once it has a hole.
            self._pia_direction_done(layer, is_orig)
        self._sweep(conn, state)

    @staticmethod
    def services_failed(conn: Any) -> list[str]:
        state = conn.services
        if state is not None:
            return list(state.failed)
        return list(getattr(conn, "failed_services", ()))   # (kept there too)

    # -- internals -----------------------------------------------------------------------

    def _deliver(self, conn: Any, state: ConnServices, is_orig: bool, data: bytes) -> None:
        partial = state.tcp and not state.saw_syn and _midstream(conn, state)
        # (Snapshots: a verdict may add a layer or an analyser while these loops run.)
        for layer in (state, *state.inner) if state.inner else (state,):
            analyzers = layer.analyzers
            if analyzers:
                for an in analyzers:
                    if partial and an.name in SKIP_PARTIAL:
                        continue
                    an.deliver(is_orig, data)
                    self._verdict(conn, state, an)
            if layer.candidates.sigs:
                self._pia(conn, state, layer, is_orig, data)
        self._sweep(conn, state)

    def _pia(self, conn: Any, state: ConnServices, layer: _Layer, is_orig: bool,
             data: bytes) -> None:
        settings = self.settings
        if is_orig:
            if layer.done_orig:  # already finished: its candidates are already filtered
                return
            prefix, layer.count_orig = layer.prefix_orig, layer.count_orig + 1
            count = layer.count_orig
        else:
            if layer.done_resp:
                return
            prefix, layer.count_resp = layer.prefix_resp, layer.count_resp + 1
            count = layer.count_resp
        tcp = state.tcp
        # (UDP: the prefix slots only count the bytes buffered; each datagram is matched alone.)
        buffered = len(prefix) if tcp else prefix   # type: ignore[arg-type]
        if buffered >= settings.dpd_buffer_size or count > settings.dpd_max_packets:
            self._pia_direction_done(layer, is_orig)
            return
        layer.chunks = (*layer.chunks, (is_orig, data))
        subject: bytes | bytearray
        if not tcp:
            subject = data
            if is_orig:
                layer.prefix_orig = buffered + len(data)
            else:
                layer.prefix_resp = buffered + len(data)
        else:
            piece = data[: max(0, settings.dpd_buffer_size - buffered)]
            if prefix:
                prefix += piece          # a bytearray: extended in place
            else:
                prefix = bytearray(piece)
                if is_orig:
                    layer.prefix_orig = prefix
                else:
                    layer.prefix_resp = prefix
            subject = prefix
        cands = layer.candidates
        any_of = cands.orig if is_orig else cands.resp
        if any_of is None or any_of.match(subject) is None:
            # No signature for this direction matches: nothing can fire.
            if tcp and len(subject) >= (cands.settle_orig if is_orig else cands.settle_resp):
                self._prune(layer, is_orig, subject)
            return
        self._pia_matched(conn, state, layer, is_orig, subject, cands)

    def _pia_matched(self, conn: Any, state: ConnServices, layer: _Layer, is_orig: bool,
                     subject: bytes | bytearray, cands: _Candidates) -> None:
        """Some signature of `cands` matches `subject`: mark which, attach what fires."""
        direction = "orig" if is_orig else "resp"
        newly: list[str] = []
        matched = layer.matched
        for sig in cands.sigs:
            if sig.direction != "any" and sig.direction != direction:
                continue
            if sig.name in matched or not sig.pattern.match(subject):
                continue
            if not newly and type(matched) is not set:
                matched = layer.matched = set(matched)
            matched.add(sig.name)  # type: ignore[union-attr]
            newly.append(sig.name)
        if state.tcp and len(subject) >= (cands.settle_orig if is_orig else cands.settle_resp):
            self._prune(layer, is_orig, subject)
        if not newly:
            return  # nothing new can fire (the loop below only acts on this packet's matches)
        # A signature waiting for its reverse side fires when that side matches (any order).
        # _attach replaces layer.candidates, never changes the signatures iterated here.
        for sig in cands.sigs:
            if sig.name not in layer.matched or not sig.enables:
                continue
            if sig.requires_reverse and sig.requires_reverse not in layer.matched:
                continue
            if sig.name not in newly and sig.requires_reverse not in newly:
                continue
            self._attach(conn, state, layer, sig.analyzer)

    def _prune(self, layer: _Layer, is_orig: bool, prefix: bytes | bytearray) -> None:
        """Drop the signatures no longer able to match: this direction's unmatched ones its
        prefix has outgrown (matching is anchored at the start of the stream, so a longer
        prefix cannot match either), and those waiting for such a one on the other side.
        The direction keeps buffering chunks for a later match on the other side; once no
        signature is left at all, the PIA is finished (and the chunks dropped) as when
        both directions reach the DPD limits, without looking at the rest of the data."""
        cands = layer.candidates
        matched = layer.matched
        if not matched:
            # Usually the first chunk outgrows every signature of its direction at once:
            # the outcome depends on the candidates alone and is remembered there.
            if is_orig:
                full, lead, after = cands.full_orig, cands.lead_orig, cands.after_orig
            else:
                full, lead, after = cands.full_resp, cands.lead_resp, cands.after_resp
            if len(prefix) >= full and not (lead and prefix[0] in lead):
                if after is None:
                    after = self._outgrown(cands, is_orig, matched, None)
                    if is_orig:
                        cands.after_orig = after
                    else:
                        cands.after_resp = after
                layer.candidates = after
                return
        layer.candidates = self._outgrown(cands, is_orig, matched, prefix)

    def _outgrown(self, cands: _Candidates, is_orig: bool, matched: set[str] | frozenset[str],
                  prefix: bytes | bytearray | None) -> _Candidates:
        """`cands` without this direction's unmatched signatures `prefix` has outgrown (all
        of them if None) and those requiring one of them on the other side."""
        direction = "orig" if is_orig else "resp"
        sigs = cands.sigs
        keep = [s for s in sigs
                if s.direction != direction or s.name in matched
                or (prefix is not None
                    and len(prefix.lstrip(s.lead) if s.lead else prefix) < s.reach)]
        if len(keep) == len(sigs):
            return cands
        alive = {s.name for s in keep} | matched
        return self._candidates(
            [s for s in keep if s.requires_reverse is None or s.requires_reverse in alive])

    def _attach(self, conn: Any, state: ConnServices, layer: _Layer, name: str) -> None:
        if any(an.name == name for an in layer.analyzers):
            return
        layer.candidates = self._candidates([s for s in layer.candidates.sigs
                                             if s.analyzer != name])
        an = make_analyzer(name, state.tcp)
        layer.analyzers = (*layer.analyzers, an)
        if state.tcp and name in SKIP_PARTIAL and _midstream(conn, state):
            return
        for chunk_orig, chunk in layer.chunks:
            if an.done:
                break
            an.deliver(chunk_orig, chunk)
            self._verdict(conn, state, an)

    def _pia_direction_done(self, layer: _Layer, is_orig: bool) -> None:
        """Stop matching one direction; signatures already matched keep waiting for their
        reverse side until both directions are done (dpd_match_only_beginning)."""
        if is_orig:
            layer.done_orig = True
        else:
            layer.done_resp = True
        if layer.done_orig and layer.done_resp:
            layer.candidates = _NO_CANDIDATES
            return
        direction = "orig" if is_orig else "resp"
        layer.candidates = self._candidates(
            [s for s in layer.candidates.sigs
             if s.name in layer.matched or (s.direction != direction and s.direction != "any")])

    def _verdict(self, conn: Any, state: ConnServices, an: Analyzer) -> None:
        """Turn an analyser's flags into service entries and events (the flags an analyser
        does not have are the base class's defaults)."""
        sink = self.sink
        if an.confirmed and not an.reported:
            an.reported = True
            self._confirm(conn, an.name)
        inner = an.inner
        if inner and inner not in conn.service:
            self._confirm(conn, inner)
        if an.flip_wanted:
            an.flip_wanted = False
            if not _is_multicast(conn.resp_h):
                sink.flip_roles(conn)
        if an.established and not state.established:
            state.established = True
            sink.ssl_established(conn)
        tunnel = an.tunnel
        if tunnel is not None:
            an.tunnel = None
            self._open_tunnel(conn, state, tunnel)
        if an.violation is not None:
            reason, an.violation = an.violation, None
            self._violation(conn, state, an.name, reason, an.confirmed)

    def _confirm(self, conn: Any, name: str) -> None:
        if name in conn.service:
            return
        conn.service = [*conn.service, name]   # a shared empty tuple until the first one
        timeout = self.settings.analyzer_inactivity_timeouts.get(name)
        if timeout:
            self.sink.set_inactivity_timeout(conn, timeout)
        self.sink.service_confirmed(conn, name)

    def _violation(self, conn: Any, state: ConnServices, name: str, reason: str,
                   confirmed: bool) -> None:
        self.sink.service_violation(conn, name, reason)
        if not confirmed or name not in conn.service:
            return
        limit = self.settings.ignore_violations_after
        if limit > 0 and conn.orig.size + conn.resp.size > limit:
            return
        if self.settings.track_removed_services:
            conn.service = [*conn.service, "-" + name]
        else:
            services = list(conn.service)
            services.remove(name)
            conn.service = services
        state.failed = [*state.failed, name]
        failed = getattr(conn, "failed_services", None)
        if failed is not None:
            conn.failed_services = [*failed, name]

    def _open_tunnel(self, conn: Any, state: ConnServices, data: tuple[bytes, bytes]) -> None:
        disabled = self.settings.disabled   # bare mode: only loaded protocols' signatures
        layer = _Layer(self._candidates([s for s in TCP_SIGNATURES
                                         if s.analyzer not in disabled]), (), True)
        if state.inner:
            state.inner.append(layer)  # type: ignore[union-attr]
        else:
            state.inner = [layer]
        orig, resp = data
        if orig:
            self._pia(conn, state, layer, True, orig)
        if resp:
            self._pia(conn, state, layer, False, resp)

    @staticmethod
    def _sweep(conn: Any, state: ConnServices) -> None:
        """Drop finished analysers; a connection with nothing left costs nothing more."""
        busy = False
        for layer in (state, *state.inner) if state.inner else (state,):
            analyzers = layer.analyzers
            for an in analyzers:
                if an.done:
                    analyzers = layer.analyzers = tuple([a for a in analyzers if not a.done])
                    break
            if layer.candidates.sigs:
                busy = True
            else:
                if layer.chunks:
                    layer.chunks = ()
                if analyzers:
                    busy = True
        if not busy:
            state.active = False
            conn.services = None   # frees the analysers; nothing reads it any more


def _is_multicast(addr: Any) -> bool:
    try:
        if isinstance(addr, bytes | bytearray):
            return ipaddress.ip_address(bytes(addr)).is_multicast
        return ipaddress.ip_address(addr).is_multicast
    except ValueError:
        return False

