"""Hand-built application payloads for the service-detection tests (E3's helpers).

Every byte here follows the protocol specifications (RFC 5246/8446 TLS, RFC 6347/9147 DTLS,
RFC 9000/9001 QUIC, RFC 4253 SSH, RFC 1035 DNS); nothing is produced by shuntd's code.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

# -- TLS -----------------------------------------------------------------------------------


def tls_record(ctype: int, body: bytes, version: int = 0x0303) -> bytes:
    return struct.pack("!BHH", ctype, version, len(body)) + body


def handshake(mtype: int, body: bytes) -> bytes:
    return bytes([mtype]) + len(body).to_bytes(3, "big") + body


def client_hello_body(version: int = 0x0303) -> bytes:
    return (struct.pack("!H", version) + b"\x11" * 32 + b"\x00"
            + b"\x00\x04\x13\x01\xc0\x2f" + b"\x01\x00")


def client_hello(version: int = 0x0303) -> bytes:
    return handshake(1, client_hello_body(version))


def server_hello(version: int = 0x0303, supported_version: int | None = None) -> bytes:
    ext = b""
    if supported_version is not None:
        ext = struct.pack("!HHH", 43, 2, supported_version)
    body = (struct.pack("!H", version) + b"\x22" * 32 + b"\x00" + b"\xc0\x2f" + b"\x00"
            + struct.pack("!H", len(ext)) + ext)
    return handshake(2, body)


CCS = tls_record(20, b"\x01")


def appdata(n: int = 64) -> bytes:
    return tls_record(23, b"\xaa" * n)


def encrypted_handshake(n: int = 40) -> bytes:
    """A Finished sent after ChangeCipherSpec: type 22, opaque bytes."""
    return tls_record(22, b"\x5a" * n)


# -- DTLS ----------------------------------------------------------------------------------


def dtls_record(ctype: int, body: bytes, version: int = 0xFEFD, epoch: int = 0,
                seq: int = 0) -> bytes:
    return (struct.pack("!BHH", ctype, version, epoch) + seq.to_bytes(6, "big")
            + struct.pack("!H", len(body)) + body)


def dtls_handshake(mtype: int, body: bytes, msg_seq: int = 0) -> bytes:
    n = len(body).to_bytes(3, "big")
    return bytes([mtype]) + n + struct.pack("!H", msg_seq) + b"\x00\x00\x00" + n + body


def dtls_client_hello(version: int = 0xFEFD) -> bytes:
    body = (struct.pack("!H", version) + b"\x33" * 32 + b"\x00" + b"\x00"  # sid, cookie
            + b"\x00\x02\xc0\x2f" + b"\x01\x00")
    return dtls_record(22, dtls_handshake(1, body), version=0xFEFF)


def dtls_server_hello(version: int = 0xFEFD) -> bytes:
    body = (struct.pack("!H", version) + b"\x44" * 32 + b"\x00" + b"\xc0\x2f" + b"\x00"
            + b"\x00\x00")
    return dtls_record(22, dtls_handshake(2, body), version=version)


# -- HTTP / SSH / DNS ----------------------------------------------------------------------

HTTP_REQUEST = b"GET /index.html HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n"
HTTP_REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
CONNECT_REQUEST = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
CONNECT_REPLY = b"HTTP/1.1 200 Connection established\r\n\r\n"

SSH_CLIENT_BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"
SSH_SERVER_BANNER = b"SSH-2.0-OpenSSH_8.9\r\n"


def ssh_packet(msg_type: int, payload: bytes = b"") -> bytes:
    """RFC 4253 §6 binary packet, unencrypted (block size 8, at least 4 padding bytes)."""
    body_len = 1 + len(payload)
    padding = 8 - ((4 + 1 + body_len) % 8)
    if padding < 4:
        padding += 8
    packet_length = 1 + body_len + padding
    return (struct.pack("!IB", packet_length, padding) + bytes([msg_type]) + payload
            + b"\x00" * padding)


SSH_KEXINIT = ssh_packet(20, b"\x01" * 16 + b"\x00\x00\x00\x00" * 10 + b"\x00" + b"\x00" * 4)
SSH_NEWKEYS = ssh_packet(21)


def dns_name(name: str) -> bytes:
    out = b""
    for label in name.split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def dns_query(qid: int = 0x1234, name: str = "example.com") -> bytes:
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + dns_name(name) + b"\x00\x01\x00\x01"


def dns_response(qid: int = 0x1234, name: str = "example.com") -> bytes:
    answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + bytes([93, 184, 216, 34])
    return (struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + dns_name(name)
            + b"\x00\x01\x00\x01" + answer)


# -- QUIC (RFC 9001 §5: Initial protection, written out independently for the tests) -------

QUIC_V1_SALT = bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a")


def _expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    full = b"tls13 " + label
    info = struct.pack("!H", length) + bytes([len(full)]) + full + b"\x00"
    # HKDF-Expand (RFC 5869) with SHA-256, written out.
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(secret, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def quic_client_keys(dcid: bytes) -> tuple[bytes, bytes, bytes]:
    initial = hmac.new(QUIC_V1_SALT, dcid, hashlib.sha256).digest()
    client = _expand_label(initial, b"client in", 32)
    return (_expand_label(client, b"quic key", 16), _expand_label(client, b"quic iv", 12),
            _expand_label(client, b"quic hp", 16))


def varint(v: int) -> bytes:
    if v < 64:
        return bytes([v])
    if v < 16384:
        return struct.pack("!H", 0x4000 | v)
    return struct.pack("!I", 0x80000000 | v)


def crypto_frame(offset: int, data: bytes) -> bytes:
    return b"\x06" + varint(offset) + varint(len(data)) + data


def quic_client_initial(dcid: bytes = bytes.fromhex("8394c8f03e515708"),
                        crypto: bytes | None = None, pn: int = 2,
                        key_dcid: bytes | None = None, frames: bytes | None = None) -> bytes:
    """A protected QUIC v1 client Initial carrying `crypto` (default: a ClientHello) in one
    CRYPTO frame at offset 0 (or exactly `frames`), padded to 1200 bytes. `key_dcid` protects
    it with another DCID's keys."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if crypto is None:
        crypto = client_hello()
    key, iv, hp = quic_client_keys(key_dcid if key_dcid is not None else dcid)
    if frames is None:
        frames = crypto_frame(0, crypto)
    pn_bytes = pn.to_bytes(4, "big")
    scid = b"\xc1\x01"
    header_wo_len = (bytes([0xC3]) + struct.pack("!I", 1) + bytes([len(dcid)]) + dcid
                     + bytes([len(scid)]) + scid + b"\x00")  # token length 0
    # pad so the whole datagram is 1200 bytes: len field is 2-byte varint
    payload_len = 1200 - len(header_wo_len) - 2 - 4 - 16
    frames += b"\x00" * (payload_len - len(frames))
    length = 4 + len(frames) + 16
    header = header_wo_len + struct.pack("!H", 0x4000 | length) + pn_bytes
    nonce = (int.from_bytes(iv, "big") ^ pn).to_bytes(12, "big")
    sealed = AESGCM(key).encrypt(nonce, frames, header)
    pn_offset = len(header) - 4
    sample = sealed[:16]          # starts 4 bytes after the packet number field's start
    enc = Cipher(algorithms.AES(hp), modes.ECB()).encryptor()
    mask = enc.update(sample) + enc.finalize()
    first = header[0] ^ (mask[0] & 0x0F)
    protected_pn = bytes(b ^ m for b, m in zip(pn_bytes, mask[1:5], strict=True))
    return bytes([first]) + header[1:pn_offset] + protected_pn + sealed
