"""Offline pipeline: trace file -> decode -> defragment -> ConnTracker (what `shuntd -r` runs).

Shared by the CLI and the corpus tests so both exercise exactly the same path.
"""

from __future__ import annotations

import gc
from pathlib import Path

from shuntd.capture.pcapfile import TraceError, open_trace
from shuntd.conn.tracker import ConnTracker
from shuntd.defrag import Defragmenter
from shuntd.packet import decode

_GC_GEN0_THRESHOLD = 50_000


class OfflineResult:
    """What a run saw: frames read, frames without a usable IP packet, and the error if any."""

    __slots__ = ("frames", "undecodable", "error")

    def __init__(self) -> None:
        self.frames = 0
        self.undecodable = 0
        self.error: str | None = None


def run_trace(path: str | Path, tracker: ConnTracker) -> OfflineResult:
    """Feed every packet of `path` to `tracker`, then terminate it as Zeek does at end of
    input. A corrupt/truncated trace stops the feed at that packet (recorded in `.error`);
    connections open at that point are still flushed."""
    result = OfflineResult()
    ignore = tracker.settings.ignore_checksums
    defrag = Defragmenter(ignore_checksums=ignore)
    process = tracker.process
    # Every connection makes a handful of tracked objects; with the default gen-0 threshold
    # (700) the cyclic collector runs every few connections and costs ~10% of a run. Collect
    # less often while feeding and draining; restored afterwards (bench/engine.py measures
    # the effect).
    thresholds = gc.get_threshold()
    gc.set_threshold(max(thresholds[0], _GC_GEN0_THRESHOLD), *thresholds[1:])
    try:
        try:
            with open_trace(path) as reader:
                for ts, frame, wire_len, linktype in reader:
                    result.frames += 1
                    pkt = decode(frame, linktype, ts, wire_len, ignore)
                    if pkt is None:
                        result.undecodable += 1
                        tracker.advance(ts)
                        continue
                    if pkt.frag:
                        tracker.advance(ts)
                        pkt = defrag.add(pkt)
                        if pkt is None:
                            continue
                    process(pkt)
        except TraceError as exc:
            result.error = str(exc)
        except OSError as exc:
            result.error = f"cannot read {path}: {exc.strerror or exc}"
        # The end of input removes every connection still open at once: still under the
        # raised threshold (with the default one, full collections over the whole table run
        # several times while it drains).
        tracker.finish()
    finally:
        gc.set_threshold(*thresholds)
    return result
