"""SSL/TLS over TCP: confirmation on a ClientHello and Zeek's `ssl_established` rule (spec §6.3).

`TlsSession` holds the handshake/encryption state that TLS, DTLS and QUIC's CRYPTO stream share;
`TlsAnalyzer` frames TLS (and SSLv2) records out of a TCP byte stream.

`ssl_established` follows Zeek's binpac analyser (each direction CLEAR -> ENCRYPTED; raised on
the first record processed as ciphertext while both directions are ENCRYPTED) with one
deliberate tightening, because policies shunt on it: it also needs a ClientHello from the
originator AND a ServerHello from the responder, so one party alone can never trigger it.
"""

from __future__ import annotations

from .base import Analyzer

# Record content types.
CT_CHANGE_CIPHER_SPEC = 20
CT_ALERT = 21
CT_HANDSHAKE = 22
CT_APPLICATION_DATA = 23
CT_HEARTBEAT = 24

HS_CLIENT_HELLO = 1
HS_SERVER_HELLO = 2

SSLv2 = 0x0002
SSLv3 = 0x0300
TLSv10 = 0x0301
TLSv11 = 0x0302
TLSv12 = 0x0303
TLSv13 = 0x0304
DTLSv10 = 0xFEFF
DTLSv12 = 0xFEFD
DTLSv13 = 0xFEFC

# Versions after which CCS does not encrypt and application data does (Zeek: "not TLS 1.3").
_PRE_TLS13 = frozenset({SSLv2, SSLv3, TLSv10, TLSv11, TLSv12, DTLSv10, DTLSv12})
_KNOWN_VERSIONS = frozenset(
    {SSLv2, SSLv3, TLSv10, TLSv11, TLSv12, TLSv13, DTLSv10, DTLSv12, DTLSv13}
)
EXT_SUPPORTED_VERSIONS = 43

MAX_RECORD = 16384 + 2048          # ciphertext limit of RFC 5246 §6.2.3
MAX_HANDSHAKE_BUFFER = 1 << 16     # a ClientHello/ServerHello never needs more


def version_ok(version: int) -> bool:
    """Versions Zeek's SSL analyser accepts in a hello (incl. TLS 1.3 drafts 0x7Fxx)."""
    return version in _KNOWN_VERSIONS or (version >> 8) == 0x7F


def is_tls13(version: int) -> bool:
    return version in (TLSv13, DTLSv13) or (version >> 8) == 0x7F


def server_hello_version(body: bytes) -> int | None:
    """Negotiated version from a ServerHello body (supported_versions wins), None if malformed."""
    if len(body) < 38:
        return None
    version = int.from_bytes(body[0:2], "big")
    pos = 34
    sid_len = body[pos]
    pos += 1 + sid_len
    pos += 3  # cipher suite (2) + compression method (1)
    if pos > len(body):
        return None
    if pos + 2 > len(body):
        return version  # no extensions
    ext_end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 2
    if ext_end > len(body):
        return None
    while pos + 4 <= ext_end:
        etype = int.from_bytes(body[pos : pos + 2], "big")
        elen = int.from_bytes(body[pos + 2 : pos + 4], "big")
        pos += 4
        if pos + elen > ext_end:
            return None
        if etype == EXT_SUPPORTED_VERSIONS and elen == 2:
            version = int.from_bytes(body[pos : pos + 2], "big")
        pos += elen
    return version


class TlsSession:
    """Handshake and encryption state of one TLS/DTLS session (both directions)."""

    __slots__ = (
        "encrypted_orig", "encrypted_resp", "negotiated", "client_hello", "server_hello",
        "established", "confirmed", "violation",
    )

    def __init__(self) -> None:
        self.encrypted_orig = False
        self.encrypted_resp = False
        self.negotiated = 0            # 0 = no ServerHello yet
        self.client_hello = False
        self.server_hello = False
        self.established = False
        self.confirmed = False
        self.violation: str | None = None

    def handshake_message(self, is_orig: bool, mtype: int, body: bytes) -> None:
        """One complete handshake message in a CLEAR direction."""
        if mtype == HS_CLIENT_HELLO and is_orig:
            if len(body) < 2:
                self.violation = "truncated ClientHello"
                return
            version = int.from_bytes(body[0:2], "big")
            if not version_ok(version):
                self.violation = f"unsupported client SSL version 0x{version:04x}"
                return
            self.client_hello = True
            self.confirmed = True
        elif mtype == HS_SERVER_HELLO and not is_orig:
            version = server_hello_version(body)
            if version is None:
                self.violation = "malformed ServerHello"
                return
            self.negotiated = version
            self.server_hello = True

    def sslv2_client_master_key(self) -> None:
        """SSLv2: CLIENT-MASTER-KEY ends the handshake at once (Zeek raises established)."""
        if self.client_hello and self.server_hello and not self.established:
            self.encrypted_orig = self.encrypted_resp = True
            self.established = True

    def record(self, is_orig: bool, ctype: int) -> bool:
        """Apply one record's effect on the encryption state; True if its content is cleartext.

        CCS switches its sender to ENCRYPTED unless TLS 1.3 was negotiated; application data
        in a CLEAR direction switches it unless a pre-1.3 version was negotiated; a record seen
        in an ENCRYPTED direction while both are ENCRYPTED raises established (once).
        """
        encrypted = self.encrypted_orig if is_orig else self.encrypted_resp
        if not encrypted:
            if ctype == CT_CHANGE_CIPHER_SPEC:
                if not is_tls13(self.negotiated):
                    self._set_encrypted(is_orig)
                return False
            if ctype == CT_APPLICATION_DATA and self.negotiated not in _PRE_TLS13:
                self._set_encrypted(is_orig)
                encrypted = True
            else:
                return True
        self.ciphertext_record()
        return False

    def mark_encrypted(self, is_orig: bool) -> None:
        """DTLS 1.3 unified header: the direction is encrypted from this record on."""
        self._set_encrypted(is_orig)
        self.ciphertext_record()

    def ciphertext_record(self) -> None:
        if (self.encrypted_orig and self.encrypted_resp and not self.established
                and self.client_hello and self.server_hello):
            self.established = True

    def _set_encrypted(self, is_orig: bool) -> None:
        if is_orig:
            self.encrypted_orig = True
        else:
            self.encrypted_resp = True


class _Direction:
    """Per-direction framing state (made with the direction's first data)."""

    __slots__ = ("records", "handshake", "sslv2_possible", "hello_done")

    def __init__(self) -> None:
        # An incomplete record / handshake message carried over to the next delivery: an
        # empty bytes until there is one (most deliveries hold whole records).
        self.records: bytearray | bytes = b""
        self.handshake: bytearray | bytes = b""
        self.sslv2_possible = True     # only the very first record of a direction may be SSLv2
        self.hello_done = False        # its hello parsed: later handshake bytes are not needed


class TlsAnalyzer(Analyzer):
    """TLS records over a TCP stream (plus an SSLv2-compatible first record)."""

    __slots__ = ("session", "_orig", "_resp", "established")
    name = "ssl"

    def __init__(self) -> None:
        self.confirmed = False     # (Analyzer's flags, without the super() call)
        self.violation: str | None = None
        self.done = False
        self.reported = False
        self.session = TlsSession()
        self._orig: _Direction | None = None
        self._resp: _Direction | None = None
        self.established = False

    def deliver(self, is_orig: bool, data: bytes) -> None:
        if self.done:
            return
        if is_orig:
            d = self._orig
            if d is None:
                d = self._orig = _Direction()
        else:
            d = self._resp
            if d is None:
                d = self._resp = _Direction()
        buf: bytearray | bytes = d.records
        if buf:
            buf += data                  # (a bytearray: extended in place)
        else:
            buf = data                   # parsed where it is
        pos = 0
        n = len(buf)
        session = self.session
        while True:
            left = n - pos
            if d.sslv2_possible:
                if left < 3:
                    break
                if buf[pos] & 0x80:
                    used = self._sslv2_record(is_orig, buf, pos)
                    if used == 0:
                        break
                    pos += used
                    d.sslv2_possible = False
                    if self.done:
                        return
                    continue
                if left < 5:
                    break
                d.sslv2_possible = False
            elif left < 5:
                break
            ctype = buf[pos]
            length = (buf[pos + 3] << 8) | buf[pos + 4]
            if ctype < CT_CHANGE_CIPHER_SPEC or ctype > CT_HEARTBEAT:
                self.fail(f"unknown TLS record type {ctype}")
                return
            if buf[pos + 1] != 3 or length > MAX_RECORD:
                self.fail("invalid TLS record header")
                return
            end = pos + 5 + length
            if end > n:
                break
            # A handshake record in a CLEAR direction is cleartext (TlsSession.record
            # changes nothing for it); anything else goes through the session.
            if ctype == CT_HANDSHAKE and not (session.encrypted_orig if is_orig
                                              else session.encrypted_resp):
                if not d.hello_done:
                    self._handshake(is_orig, d, buf[pos + 5:end])
                    # _after, whose usual outcome (no verdict yet) is inline
                    if session.violation is not None or session.established:
                        if self._after(session):
                            return
                    elif session.confirmed:
                        self.confirmed = True
            elif not session.record(is_orig, ctype):
                # (only a record that is not cleartext can change the verdict)
                if session.violation is not None or session.established:
                    if self._after(session):
                        return
                elif session.confirmed:
                    self.confirmed = True
            pos = end
        if pos < n:
            if buf is data:
                d.records = bytearray(data[pos:])
            else:
                del buf[:pos]   # type: ignore[union-attr]  # (d.records itself)
        elif buf is not data:
            d.records = b""

    def _handshake(self, is_orig: bool, d: _Direction, fragment: bytes | bytearray) -> None:
        """One handshake record's fragment: parse the messages it completes up to the
        direction's hello; an incomplete message is kept for the next record."""
        hs = d.handshake
        if hs:
            hs += fragment               # (a bytearray: extended in place)
        else:
            hs = fragment
        pos = 0
        n = len(hs)
        session = self.session
        while n - pos >= 4:
            mlen = (hs[pos + 1] << 16) | (hs[pos + 2] << 8) | hs[pos + 3]
            if n - pos - 4 < mlen:
                break
            session.handshake_message(is_orig, hs[pos], hs[pos + 4:pos + 4 + mlen])
            pos += 4 + mlen
            if session.client_hello if is_orig else session.server_hello:
                d.hello_done = True
                d.handshake = b""
                return
        if pos >= n:
            d.handshake = b""
        elif n - pos > MAX_HANDSHAKE_BUFFER:
            d.hello_done = True
            d.handshake = b""
        elif hs is fragment:
            d.handshake = bytearray(fragment[pos:])
        else:
            del hs[:pos]   # type: ignore[union-attr]  # (d.handshake itself)

    def _sslv2_record(self, is_orig: bool, buf: bytearray, pos: int) -> int:
        """Parse one SSLv2 record (2-byte header form); returns bytes used, 0 if incomplete."""
        length = ((buf[pos] & 0x7F) << 8) | buf[pos + 1]
        if len(buf) - pos - 2 < length:
            return 0
        if length < 3:
            self.fail("short SSLv2 record")
            return 2 + length
        msg = buf[pos + 2]
        session = self.session
        if msg == 1 and is_orig:        # CLIENT-HELLO
            session.handshake_message(True, HS_CLIENT_HELLO, bytes(buf[pos + 3 : pos + 5]))
        elif msg == 4 and not is_orig:  # SERVER-HELLO: SSLv2 itself was negotiated
            session.negotiated = SSLv2
            session.server_hello = True
        elif msg == 2 and is_orig:      # CLIENT-MASTER-KEY
            session.sslv2_client_master_key()
        else:
            self.fail(f"unexpected SSLv2 message {msg}")
        self._after(session)
        return 2 + length

    def _after(self, session: TlsSession) -> bool:
        """Copy the session verdict out; True when parsing must stop."""
        if session.confirmed:
            self.confirmed = True
        if session.violation is not None:
            self.fail(session.violation)
            return True
        if session.established:
            self.established = True
            self.done = True
            return True
        return False
