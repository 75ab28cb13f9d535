"""Command-line options of the event layer (conn_long.log, contents extraction) and the
construction of the `EventDispatcher` from them, kept here so cli.py needs two lines.
"""

from __future__ import annotations

import argparse
from typing import Any

from shuntd.conn.contents import ContentsExtractor, ContentsSettings
from shuntd.conn.long import LongConnSettings, parse_durations
from shuntd.conn.service import TCP_PORTS, UDP_PORTS, ServiceSettings
from shuntd.events import EventDispatcher

KNOWN_ANALYZERS = frozenset(TCP_PORTS) | frozenset(UDP_PORTS)


def _durations(text: str) -> tuple[float, ...]:
    try:
        return parse_durations(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_event_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("events and extra logs")
    g.add_argument("--no-conn-long", action="store_true",
                   help="do not write conn_long.log (connections still open past durations)")
    g.add_argument("--long-durations", type=_durations, default=None, metavar="D,...",
                   help="conn_long.log thresholds, e.g. 10min,30min,1h,12h,24h,3d (default)")
    g.add_argument("--long-repeat-last", action="store_true",
                   help="after the last duration keep writing a row every last duration")
    g.add_argument("--extract-contents", action="store_true",
                   help="write each established TCP connection's streams to "
                        "contents_<orig>-<resp>_{orig,resp}.dat files (Conn::default_extract)")
    g.add_argument("--contents-prefix", default="contents", metavar="PREFIX",
                   help="file name prefix of --extract-contents files (contents)")


class EventLogs:
    """The dispatcher plus the extra log writers it owns; `close()` when done."""

    def __init__(self, dispatcher: EventDispatcher, writers: list[Any]) -> None:
        self.dispatcher = dispatcher
        self.writers = writers

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def dispatcher_from_args(args: argparse.Namespace, log_dir: str, fmt: str,
                         write_long_row: Any = None) -> EventLogs:
    """Build the dispatcher; raises OSError if conn_long.log cannot be opened.

    `write_long_row`: where conn_long rows go instead of a file of our own (the live daemon's
    workers hand them to the one process that writes the logs)."""
    from shuntd.conn.record import CONN_FIELDS
    from shuntd.logs.zeek import LogSchema, open_log

    disabled: frozenset[str] = frozenset()
    bare = getattr(args, "bare", None)
    if bare is not None:       # `zeek -b`: only the analysers of the loaded protocols exist
        loaded = {p.strip() for p in bare.split(",") if p.strip()}
        disabled = KNOWN_ANALYZERS - loaded
    writers: list[Any] = []
    long_settings = None
    if args.no_conn_long:
        write_long_row = None
    else:
        long_settings = LongConnSettings(
            durations=args.long_durations or LongConnSettings().durations,
            repeat_last_duration=args.long_repeat_last)
        if write_long_row is None:
            writer = open_log(log_dir, LogSchema("conn_long", CONN_FIELDS), fmt=fmt)
            writers.append(writer)
            write_long_row = writer.write
    contents = None
    if args.extract_contents:
        contents = ContentsExtractor(ContentsSettings(directory=log_dir,
                                                      prefix=args.contents_prefix,
                                                      default_extract=True))
    dispatcher = EventDispatcher(service_settings=ServiceSettings(disabled=disabled),
                                 long_connections=long_settings,
                                 write_long_row=write_long_row, contents=contents)
    return EventLogs(dispatcher, writers)
