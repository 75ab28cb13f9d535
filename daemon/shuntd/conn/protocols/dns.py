"""DNS over UDP (one message per datagram) and TCP (2-byte length prefix), spec §6.2 / §3.4.

Confirmed by the first message whose header, questions and answers parse. A message that does
not parse is not a violation (Zeek's DNS interpreter just drops it), so parsing keeps trying
for a bounded number of messages. The first message decides Zeek's application-layer flip: a
response (QR=1) sent by the originator asks for the roles to be swapped (`flip_wanted`).
"""

from __future__ import annotations

from .base import Analyzer

MAX_TRIES = 20       # unparsable messages tolerated before giving up on the connection


def parse_message(msg: bytes) -> bool:
    """True if the header, the questions and the answer records parse.

    Names are (possibly compressed) label sequences; a malformed one (0x40/0x80 label
    types, more than 127 labels, past the end) fails the message. Skipped inline, one loop
    over questions then answers: a DNS connection's first message is parsed here."""
    n = len(msg)
    if n < 12:
        return False
    qdcount = msg[4] << 8 | msg[5]
    records = qdcount + (msg[6] << 8 | msg[7])
    pos = 12
    for i in range(records):
        labels = 0
        while True:   # the name
            if pos >= n:
                return False
            length = msg[pos]
            if length == 0:
                pos += 1
                break
            if length >= 0xC0:   # a compression pointer ends the name
                pos += 2
                if pos > n:
                    return False
                break
            if length & 0xC0:
                return False     # 0x40/0x80 label types are obsolete
            pos += 1 + length
            labels += 1
            if labels > 127:
                return False
        if i < qdcount:          # a question: type, class
            pos += 4
            if pos > n:
                return False
        else:                    # an answer: type, class, ttl, rdlength, rdata
            if pos + 10 > n:
                return False
            pos += 10 + (msg[pos + 8] << 8 | msg[pos + 9])
            if pos > n:
                return False
    return True


class DnsAnalyzer(Analyzer):
    """DNS message recognition; `tcp` selects the length-prefixed framing."""

    __slots__ = ("tcp", "_bufs", "_first", "_tries", "flip_wanted")
    name = "dns"

    def __init__(self, tcp: bool = False) -> None:
        # Analyzer.__init__, inline (one of these per DNS connection)
        self.confirmed = False
        self.violation: str | None = None
        self.done = False
        self.reported = False
        self.tcp = tcp
        self._bufs = (bytearray(), bytearray()) if tcp else ()  # framing buffers: TCP only
        self._first = True
        self._tries = 0
        self.flip_wanted = False

    def deliver(self, is_orig: bool, data: bytes) -> None:
        if self.done:
            return
        if not self.tcp:
            self._message(is_orig, data)
            return
        buf = self._bufs[0 if is_orig else 1]
        buf += data
        while len(buf) >= 2 and not self.done:
            mlen = int.from_bytes(buf[0:2], "big")
            if len(buf) < 2 + mlen:
                return
            msg = bytes(buf[2 : 2 + mlen])
            del buf[: 2 + mlen]
            self._message(is_orig, msg)

    def _message(self, is_orig: bool, msg: bytes) -> None:
        if len(msg) < 12:
            self._tries += 1
        else:
            if self._first:
                self._first = False
                if msg[2] & 0x80 and is_orig:
                    self.flip_wanted = True
            if parse_message(msg):
                self.confirmed = True
                self.done = True
                return
            self._tries += 1
        if self._tries >= MAX_TRIES:
            self.done = True
