"""The analyser contract shared by every protocol parser."""

from __future__ import annotations


class Analyzer:
    """One protocol parser instance for one connection (Zeek: one analyzer instance).

    `deliver` is fed TCP stream data in sequence order or one UDP datagram per call.
    The service layer reads the verdict attributes after each call:
    `confirmed` (protocol recognised; set once), `violation` (text; the data is not this
    protocol), `done` (no more data needed; the analyser may be dropped).
    """

    __slots__ = ("confirmed", "violation", "done", "reported")
    name = ""
    # Flags only some analysers raise (they define a slot of the same name); the service
    # layer reads them after every delivery, so the others answer with these class defaults.
    inner: str | None = None             # an inner protocol confirmed too (QUIC: "ssl")
    flip_wanted = False                  # swap the roles (DNS: the first message a reply)
    established = False                  # ssl_established (TLS, DTLS)
    tunnel: tuple[bytes, bytes] | None = None   # bytes after an HTTP CONNECT's 2xx reply

    def __init__(self) -> None:
        self.confirmed = False
        self.violation: str | None = None
        self.done = False
        self.reported = False      # the service layer has acted on `confirmed`

    def deliver(self, is_orig: bool, data: bytes) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def gap(self, is_orig: bool, nbytes: int) -> None:
        """A hole in the stream: like Zeek's binpac analysers, stop parsing (no violation)."""
        self.done = True

    def fail(self, reason: str) -> None:
        self.violation = reason
        self.done = True
