"""QUIC over UDP: confirmed when a client INITIAL decrypts (RFC 9001 §5.2), then the TLS
ClientHello carried in its CRYPTO frames confirms the child SSL analyser: `quic,ssl` (§6.2).

Initial keys derive from the client's first Destination Connection ID, so anyone on the path
can decrypt Initial packets; that is what Zeek's QUIC analyser does too. Versions: 1 and 2.
Needs the `cryptography` package (Debian python3-cryptography); without it QUIC is never
confirmed (and a warning says so once).
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from .base import Analyzer
from .tls import TlsSession

log = logging.getLogger(__name__)

try:  # optional dependency: detection degrades to "never confirmed"
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
    HAVE_CRYPTO = True
except ImportError:  # pragma: no cover - depends on the host
    HAVE_CRYPTO = False

QUIC_V1 = 0x00000001
QUIC_V2 = 0x6B3343CF
_SALTS = {
    QUIC_V1: bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),
    QUIC_V2: bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),
}
_LABEL_PREFIX = {QUIC_V1: b"quic ", QUIC_V2: b"quicv2 "}
_INITIAL_TYPE = {QUIC_V1: 0, QUIC_V2: 1}       # long-header packet type of INITIAL
_RETRY_TYPE = {QUIC_V1: 3, QUIC_V2: 0}         # RETRY has no length field
MAX_CRYPTO_BYTES = 1 << 16
MAX_DATAGRAMS = 20

FRAME_PADDING = 0x00
FRAME_PING = 0x01
FRAME_ACK = 0x02
FRAME_ACK_ECN = 0x03
FRAME_CRYPTO = 0x06
FRAME_CONNECTION_CLOSE = 0x1C
FRAME_CONNECTION_CLOSE_APP = 0x1D


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """RFC 9000 §16 variable-length integer: (value, new offset); raises IndexError if short."""
    first = buf[pos]
    size = 1 << (first >> 6)
    if pos + size > len(buf):
        raise IndexError("truncated varint")
    value = first & 0x3F
    for i in range(1, size):
        value = (value << 8) | buf[pos + i]
    return value, pos + size


def _hkdf_expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    return HKDFExpand(hashes.SHA256(), length, info).derive(secret)


def client_initial_keys(version: int, dcid: bytes) -> tuple[bytes, bytes, bytes]:
    """(key, iv, hp) protecting the client's Initial packets."""
    initial_secret = hmac.new(_SALTS[version], dcid, hashlib.sha256).digest()
    client_secret = _hkdf_expand_label(initial_secret, b"client in", 32)
    prefix = _LABEL_PREFIX[version]
    return (
        _hkdf_expand_label(client_secret, prefix + b"key", 16),
        _hkdf_expand_label(client_secret, prefix + b"iv", 12),
        _hkdf_expand_label(client_secret, prefix + b"hp", 16),
    )


class QuicAnalyzer(Analyzer):
    """Client Initial decryption and CRYPTO-stream ClientHello extraction."""

    __slots__ = ("inner", "_keys", "_dcid", "_crypto", "_crypto_next", "_tls", "_datagrams")
    name = "quic"

    def __init__(self) -> None:
        super().__init__()
        self.inner: str | None = None            # "ssl" once the ClientHello confirmed it
        self._keys: tuple[int, bytes, bytes, bytes] | None = None
        self._dcid: bytes | None = None
        self._crypto: dict[int, bytes] = {}
        self._crypto_next = 0
        self._tls = TlsSession()
        self._datagrams = 0
        if not HAVE_CRYPTO:
            log.warning("python 'cryptography' missing: QUIC will never be confirmed")
            self.done = True

    def deliver(self, is_orig: bool, data: bytes) -> None:
        if self.done:
            return
        self._datagrams += 1
        if is_orig:
            pos = 0
            while pos < len(data) and not self.done:
                try:
                    pos = self._packet(data, pos)
                except (IndexError, ValueError):
                    break
                if pos < 0:
                    break
        if self._datagrams >= MAX_DATAGRAMS and not self.done:
            if not self.confirmed:
                self.fail("no decryptable QUIC Initial")
            else:
                self.done = True

    def _packet(self, data: bytes, pos: int) -> int:
        """Handle one long-header packet at pos; returns the next packet's offset or -1."""
        first = data[pos]
        if not first & 0x80:
            return -1                                   # short header: 1-RTT, opaque
        version = int.from_bytes(data[pos + 1 : pos + 5], "big")
        if version not in _SALTS:
            if not self.confirmed:
                self.fail(f"unsupported QUIC version 0x{version:08x}")
            return -1
        p = pos + 5
        dcid_len = data[p]
        dcid = data[p + 1 : p + 1 + dcid_len]
        p += 1 + dcid_len
        scid_len = data[p]
        p += 1 + scid_len
        ptype = (first >> 4) & 0x03
        if ptype == _INITIAL_TYPE[version]:
            token_len, p = read_varint(data, p)
            p += token_len
        elif ptype == _RETRY_TYPE[version]:
            return -1
        length, p = read_varint(data, p)
        end = p + length
        if end > len(data):
            raise IndexError("truncated QUIC packet")
        if ptype == _INITIAL_TYPE[version]:
            if self._dcid is None:
                self._dcid = bytes(dcid)
                self._keys = (version, *client_initial_keys(version, self._dcid))
            self._initial(data, pos, p, end)
        return end

    def _initial(self, data: bytes, start: int, pn_offset: int, end: int) -> None:
        assert self._keys is not None
        version, key, iv, hp = self._keys
        sample = data[pn_offset + 4 : pn_offset + 20]
        if len(sample) < 16:
            raise IndexError("short QUIC sample")
        encryptor = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()
        mask = encryptor.update(bytes(sample)) + encryptor.finalize()
        first = data[start] ^ (mask[0] & 0x0F)
        pn_len = (first & 0x03) + 1
        pn_bytes = bytes(b ^ m for b, m in zip(data[pn_offset : pn_offset + pn_len],
                                               mask[1 : 1 + pn_len], strict=True))
        header = bytes([first]) + bytes(data[start + 1 : pn_offset]) + pn_bytes
        pn = int.from_bytes(pn_bytes, "big")
        nonce = (int.from_bytes(iv, "big") ^ pn).to_bytes(12, "big")
        try:
            plain = AESGCM(key).decrypt(nonce, bytes(data[pn_offset + pn_len : end]), header)
        except Exception:  # InvalidTag: not an Initial protected with these keys
            if not self.confirmed:
                self.fail("QUIC Initial does not decrypt")
            return
        self.confirmed = True
        self._frames(plain)

    def _frames(self, plain: bytes) -> None:
        pos = 0
        n = len(plain)
        while pos < n:
            ftype, pos = read_varint(plain, pos)
            if ftype == FRAME_PADDING or ftype == FRAME_PING:
                continue
            if ftype == FRAME_CRYPTO:
                offset, pos = read_varint(plain, pos)
                length, pos = read_varint(plain, pos)
                chunk = plain[pos : pos + length]
                pos += length
                if offset + length <= MAX_CRYPTO_BYTES:
                    self._crypto.setdefault(offset, chunk)
            elif ftype in (FRAME_ACK, FRAME_ACK_ECN):
                _, pos = read_varint(plain, pos)       # largest acknowledged
                _, pos = read_varint(plain, pos)       # ack delay
                ranges, pos = read_varint(plain, pos)
                _, pos = read_varint(plain, pos)       # first range
                for _ in range(2 * ranges):
                    _, pos = read_varint(plain, pos)
                if ftype == FRAME_ACK_ECN:
                    for _ in range(3):
                        _, pos = read_varint(plain, pos)
            elif ftype in (FRAME_CONNECTION_CLOSE, FRAME_CONNECTION_CLOSE_APP):
                break
            else:
                break       # other frames are not allowed in Initial packets
        self._crypto_stream()

    def _crypto_stream(self) -> None:
        """Feed the contiguous CRYPTO prefix to the TLS handshake parser (ClientHello only)."""
        data = bytearray()
        offset = 0
        while True:
            best = None
            for off, chunk in self._crypto.items():
                if off <= offset < off + len(chunk):
                    best = chunk[offset - off :]
                    break
            if best is None:
                break
            data += best
            offset += len(best)
        if len(data) < 4:
            return
        mlen = int.from_bytes(data[1:4], "big")
        if len(data) < 4 + mlen:
            return
        self._tls.handshake_message(True, data[0], bytes(data[4 : 4 + mlen]))
        if self._tls.confirmed:
            self.inner = "ssl"
            self.done = True
        elif self._tls.violation is not None:
            self.done = True
