"""DTLS over UDP: records inside datagrams, sharing TLS's handshake/encryption rules (§6.2-6.3).

Confirmed on a ClientHello with a supported version (DTLS handshake header: 12 bytes). A DTLS
1.3 unified-header record (first byte 001xxxxx) marks its direction encrypted at once.
"""

from __future__ import annotations

from .base import Analyzer
from .tls import CT_CHANGE_CIPHER_SPEC, CT_HANDSHAKE, HS_CLIENT_HELLO, HS_SERVER_HELLO, TlsSession

CT_TLS12_CID = 25
MAX_TRIES = 20


class DtlsAnalyzer(Analyzer):
    """DTLS record framing per datagram."""

    __slots__ = ("session", "established", "_datagrams")
    name = "dtls"

    def __init__(self) -> None:
        super().__init__()
        self.session = TlsSession()
        self.established = False
        self._datagrams = 0

    def deliver(self, is_orig: bool, data: bytes) -> None:
        if self.done:
            return
        self._datagrams += 1
        session = self.session
        pos = 0
        n = len(data)
        while pos < n:
            first = data[pos]
            if first & 0xE0 == 0x20:               # DTLS 1.3 unified header
                session.mark_encrypted(is_orig)
                pos = self._skip_unified(data, pos)
                if self._after() or pos < 0:
                    return
                continue
            if n - pos < 13:
                self.fail("truncated DTLS record")
                return
            ctype = first
            if ctype < CT_CHANGE_CIPHER_SPEC or ctype > CT_TLS12_CID or data[pos + 1] != 0xFE:
                self.fail("not a DTLS record")
                return
            length = int.from_bytes(data[pos + 11 : pos + 13], "big")
            body = data[pos + 13 : pos + 13 + length]
            if len(body) < length:
                self.fail("truncated DTLS record")
                return
            if session.record(is_orig, ctype) and ctype == CT_HANDSHAKE:
                self._handshake(is_orig, body)
            pos += 13 + length
            if self._after():
                return
        if not self.confirmed and self._datagrams >= MAX_TRIES:
            self.done = True

    def _handshake(self, is_orig: bool, body: bytes) -> None:
        pos = 0
        while len(body) - pos >= 12:
            mtype = body[pos]
            mlen = int.from_bytes(body[pos + 1 : pos + 4], "big")
            frag_off = int.from_bytes(body[pos + 6 : pos + 9], "big")
            frag_len = int.from_bytes(body[pos + 9 : pos + 12], "big")
            frag = body[pos + 12 : pos + 12 + frag_len]
            if frag_off == 0 and (
                (mtype == HS_CLIENT_HELLO and len(frag) >= 2)
                or (mtype == HS_SERVER_HELLO and frag_len == mlen and len(frag) == mlen)
            ):
                self.session.handshake_message(is_orig, mtype, bytes(frag))
            pos += 12 + frag_len

    @staticmethod
    def _skip_unified(data: bytes, pos: int) -> int:
        """Offset after a unified-header record; -1 if it runs to the end of the datagram."""
        flags = data[pos]
        if flags & 0x10:          # connection id of unknown length: rest of datagram
            return -1
        hdr = 1 + (2 if flags & 0x08 else 1)
        if not flags & 0x04:      # no length field: rest of datagram
            return -1
        if pos + hdr + 2 > len(data):
            return -1
        length = int.from_bytes(data[pos + hdr : pos + hdr + 2], "big")
        return pos + hdr + 2 + length

    def _after(self) -> bool:
        session = self.session
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
