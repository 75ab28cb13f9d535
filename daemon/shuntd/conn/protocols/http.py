"""HTTP over TCP: confirmation on a parsed request line (Zeek's HTTP analyser, spec §6.2).

Parsing stops at confirmation, except after a CONNECT request: then the reply is followed to
the end of its headers, and a 2xx reply hands the rest of both streams to an inner detection
layer (Zeek attaches a PIA to the tunnel, which is how `http,ssl` appears).
"""

from __future__ import annotations

from .base import Analyzer

MAX_LINE = 16384          # a request/status/header line longer than this is not HTTP to us
MAX_TUNNEL_BUFFER = 65536  # originator bytes held back while a CONNECT waits for its reply
_SEPARATORS = frozenset(b'()<>@,;:\\"/[]?={} \t')


def _is_token_char(c: int) -> bool:
    return 32 < c < 127 and c not in _SEPARATORS


def parse_request_line(line: bytes) -> bytes | None:
    """Method of an HTTP request line, None if it is not one (Zeek's HTTP_RequestLine)."""
    end = 0
    n = len(line)
    while end < n and _is_token_char(line[end]):
        end += 1
    if end == 0 or end == n or line[end] not in (0x20, 0x09):
        return None
    rest = line[end:].lstrip(b" \t")
    if not rest:
        return None
    return line[:end]


class _Lines:
    """LF- (or CRLF-) terminated lines out of a byte stream."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next_line(self) -> bytes | None:
        i = self.buf.find(b"\n")
        if i < 0:
            return None
        line = bytes(self.buf[:i])
        del self.buf[: i + 1]
        return line[:-1] if line.endswith(b"\r") else line


class HttpAnalyzer(Analyzer):
    """Request/reply line recognition with CONNECT tunnel hand-off."""

    __slots__ = ("_orig", "_resp", "_orig_state", "_resp_state", "_pending", "_connect",
                 "_reply_code", "tunnel")
    name = "http"

    # states
    _LINE, _HEADERS, _BODY = 0, 1, 2

    def __init__(self) -> None:
        self.confirmed = False     # (Analyzer's flags, without the super() call)
        self.violation: str | None = None
        self.done = False
        self.reported = False
        # Line buffers, made with each direction's first data (most connections are done
        # after the first request line and never buffer the replies).
        self._orig: _Lines | None = None
        self._resp: _Lines | None = None
        self._orig_state = self._LINE
        self._resp_state = self._LINE
        self._pending = 0                      # requests without a reply yet
        self._connect = False                  # a CONNECT is outstanding
        self._reply_code = 0
        self.tunnel: tuple[bytes, bytes] | None = None   # (orig, resp) bytes after the headers

    def deliver(self, is_orig: bool, data: bytes) -> None:
        if self.done:
            return
        if is_orig:
            self._deliver_orig(data)
        else:
            self._deliver_resp(data)

    def _deliver_orig(self, data: bytes) -> None:
        lines = self._orig
        if lines is None:
            lines = self._orig = _Lines()
        lines.feed(data)
        while self._orig_state != self._BODY:
            line = lines.next_line()
            if line is None:
                if len(lines.buf) > MAX_LINE:
                    self.fail("HTTP line too long")
                return
            if self._orig_state == self._LINE:
                if not line:
                    continue        # blank lines between requests are tolerated
                method = parse_request_line(line)
                if method is None:
                    self.fail("not a http request line")
                    return
                self._pending += 1
                self.confirmed = True
                if method.upper() != b"CONNECT":
                    self.done = True
                    return
                self._connect = True
                self._orig_state = self._HEADERS
            elif not line:
                self._orig_state = self._BODY    # CONNECT headers over: tunnel bytes follow
        if len(lines.buf) > MAX_TUNNEL_BUFFER:
            self.done = True

    def _deliver_resp(self, data: bytes) -> None:
        lines = self._resp
        if lines is None:
            lines = self._resp = _Lines()
        lines.feed(data)
        while True:
            line = lines.next_line()
            if line is None:
                if len(lines.buf) > MAX_LINE:
                    self.fail("HTTP line too long")
                return
            if self._resp_state == self._LINE:
                if not line:
                    continue
                if line[:5].upper() != b"HTTP/":
                    if self._pending:
                        self.done = True     # HTTP/0.9 reply: nothing more to learn
                    else:
                        self.fail("not a http reply line")
                    return
                parts = line.split(None, 2)
                code = parts[1] if len(parts) > 1 else b""
                if not code.isdigit():
                    self.fail("bad HTTP reply code")
                    return
                if self._pending:
                    self.confirmed = True
                self._reply_code = int(code)
                self._resp_state = self._HEADERS
            elif not line:
                if self._connect and 200 <= self._reply_code < 300:
                    orig = self._orig
                    orig_rest = (bytes(orig.buf) if orig is not None
                                 and self._orig_state == self._BODY else b"")
                    self.tunnel = (orig_rest, bytes(lines.buf))
                    self.done = True
                    return
                if 100 <= self._reply_code < 200:
                    self._resp_state = self._LINE    # interim reply; the real one follows
                    continue
                self.done = True
                return
