"""Contents extraction: each direction's TCP stream to a file, as Zeek's contents.zeek (§7).

On connection_established, for every direction enabled (default `default_extract`, or per
connection via `extract`), `<prefix>_<orig_h>:<orig_p>-<resp_h>:<resp_p>_orig.dat` (resp:
`_resp.dat`) is opened in `directory` (IPv6 addresses in brackets). The reassembled stream is
appended as delivered; every hole is written as the text `\\n<<gap N>>\\n`. Files close when
the connection is removed. Only connections that raise connection_established are extracted,
unless a policy calls `extract` itself (then from the current stream position).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

STATE_KEY = "contents"


@dataclasses.dataclass
class ContentsSettings:
    """Conn::extraction_prefix / Conn::default_extract, plus where files go."""

    directory: str = "."
    prefix: str = "contents"
    default_extract: bool = False


def _addr_text(addr: Any) -> str:
    if isinstance(addr, str):
        ip = ipaddress.ip_address(addr)
    else:
        ip = ipaddress.ip_address(bytes(addr))
    return f"[{ip}]" if ip.version == 6 else str(ip)


def contents_file_name(prefix: str, orig_h: Any, orig_p: int, resp_h: Any, resp_p: int,
                       is_orig: bool) -> str:
    """Zeek's name: contents_1.2.3.4:1234-5.6.7.8:80_orig.dat."""
    side = "orig" if is_orig else "resp"
    return (f"{prefix}_{_addr_text(orig_h)}:{orig_p}-{_addr_text(resp_h)}:{resp_p}"
            f"_{side}.dat")


class _Files:
    __slots__ = ("orig", "resp")

    def __init__(self) -> None:
        self.orig: BinaryIO | None = None
        self.resp: BinaryIO | None = None


class ContentsExtractor:
    """Opens, writes and closes the per-direction contents files."""

    __slots__ = ("settings",)

    def __init__(self, settings: ContentsSettings) -> None:
        self.settings = settings

    def connection_established(self, conn: Any) -> None:
        if self.settings.default_extract:
            self.extract(conn, True, True)

    def extract(self, conn: Any, orig: bool = True, resp: bool = True) -> list[str]:
        """Start extracting the given directions now; returns the paths opened."""
        if conn.proto != "tcp":
            return []
        ext = conn.ext
        if ext is None:
            conn.ext = ext = {}
        files = ext.get(STATE_KEY)
        if files is None:
            files = ext[STATE_KEY] = _Files()
        opened = []
        for is_orig, wanted in ((True, orig), (False, resp)):
            if not wanted or (files.orig if is_orig else files.resp) is not None:
                continue
            name = contents_file_name(self.settings.prefix, conn.orig_h, conn.orig_p,
                                      conn.resp_h, conn.resp_p, is_orig)
            path = os.path.join(self.settings.directory, name)
            try:
                fh = open(path, "wb")  # lives as long as the connection (Zeek truncates too)
            except OSError as exc:
                log.error("cannot open contents file %s: %s", path, exc)
                continue
            if is_orig:
                files.orig = fh
            else:
                files.resp = fh
            opened.append(path)
        return opened

    @staticmethod
    def _file(conn: Any, is_orig: bool) -> BinaryIO | None:
        ext = conn.ext
        files = ext.get(STATE_KEY) if ext else None
        if files is None:
            return None
        return files.orig if is_orig else files.resp

    def deliver(self, conn: Any, is_orig: bool, data: bytes) -> None:
        fh = self._file(conn, is_orig)
        if fh is not None:
            fh.write(data)

    def gap(self, conn: Any, is_orig: bool, nbytes: int) -> None:
        fh = self._file(conn, is_orig)
        if fh is not None:
            fh.write(b"\n<<gap %d>>\n" % nbytes)

    def close(self, conn: Any) -> None:
        ext = conn.ext
        files = ext.pop(STATE_KEY, None) if ext else None
        if files is None:
            return
        for fh in (files.orig, files.resp):
            if fh is not None:
                fh.close()
