"""SSH over TCP: confirmed only after key exchange (SSH2 NEWKEYS / SSH1 SESSION_KEY), §6.2.

Like Zeek's binpac analyser: version banners alone never confirm; the binary packets can only
be framed once both banners fixed the protocol version, so one side alone cannot confirm;
connections picked up midstream ("partial") are not fed to it at all (conn/service.py).
"""

from __future__ import annotations

from .base import Analyzer

MSG_NEWKEYS = 21            # SSH2
SSH_CMSG_SESSION_KEY = 3    # SSH1
MAX_BANNER_BYTES = 8192     # RFC 4253 §4.2 lets a server send lines before its banner
MAX_PACKET = 256 * 1024


class _Side:
    __slots__ = ("buf", "banner")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.banner: bytes | None = None


class SshAnalyzer(Analyzer):
    """Banner exchange, then binary packet headers up to NEWKEYS."""

    __slots__ = ("_orig", "_resp", "_version")
    name = "ssh"

    def __init__(self) -> None:
        super().__init__()
        self._orig = _Side()
        self._resp = _Side()
        self._version = 0        # 1 or 2 once both banners are known

    def deliver(self, is_orig: bool, data: bytes) -> None:
        if self.done:
            return
        side = self._orig if is_orig else self._resp
        side.buf += data
        if side.banner is None and not self._banner(is_orig, side):
            return
        if self._version == 0:
            if self._orig.banner is None or self._resp.banner is None:
                return
            self._version = _protocol_version(self._orig.banner, self._resp.banner)
            self._packets(True, self._orig)
            if not self.done:
                self._packets(False, self._resp)
            return
        self._packets(is_orig, side)

    def _banner(self, is_orig: bool, side: _Side) -> bool:
        buf = side.buf
        while True:
            i = buf.find(b"\n")
            if i < 0:
                if len(buf) > MAX_BANNER_BYTES:
                    self.fail("no SSH identification")
                return False
            line = bytes(buf[:i]).rstrip(b"\r")
            del buf[: i + 1]
            if line[:4] == b"SSH-":
                side.banner = line
                return True
            if is_orig:
                self.fail("malformed ssh identification")
                return False

    def _packets(self, is_orig: bool, side: _Side) -> None:
        buf = side.buf
        pos = 0
        while len(buf) - pos >= 6:
            plen = int.from_bytes(buf[pos : pos + 4], "big")
            if plen > MAX_PACKET or plen < 2:
                self.fail("bad SSH packet length")
                return
            if self._version == 2:
                msg_type = buf[pos + 5]
                total = 4 + plen
                if msg_type == MSG_NEWKEYS:
                    self.confirmed = True
                    self.done = True
                    return
            else:
                padding = 8 - (plen % 8)
                type_at = pos + 4 + padding
                if type_at >= len(buf):
                    break
                total = 4 + padding + plen
                if is_orig and buf[type_at] == SSH_CMSG_SESSION_KEY:
                    self.confirmed = True
                    self.done = True
                    return
            if len(buf) - pos < total:
                break
            pos += total
        del buf[:pos]


def _protocol_version(orig_banner: bytes, resp_banner: bytes) -> int:
    """SSH2 when both sides speak it (2.0, or 1.99 = both), else SSH1."""
    def speaks2(b: bytes) -> bool:
        return b.startswith(b"SSH-2.") or b.startswith(b"SSH-1.99")
    return 2 if speaks2(orig_banner) and speaks2(resp_banner) else 1
