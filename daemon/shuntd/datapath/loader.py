"""Bring the datapath up on one interface, in the order that fails early and fails open.

checks -> interface -> pin directory -> compile (adopting pins) -> verify pinned layouts ->
attach (native, frags-aware copy if the MTU needs it, else generic) -> ShuntTable + RingPoller.
Nothing is attached until everything else succeeded, and ``close()`` detaches before it unpins.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from shuntd.datapath import libbpf, pins, prereq
from shuntd.datapath.attach import XdpAttachment, attach_xdp, refuse_if_occupied
from shuntd.datapath.errors import MtuTooLargeError, PinError
from shuntd.datapath.iface import XdpMode, interface_info, require_up
from shuntd.datapath.program import DEFAULT_FLOWS_MAX, DEFAULT_PAIRS_MAX, XdpProgram
from shuntd.datapath.ring import RingPoller
from shuntd.datapath.stats import read_stats
from shuntd.datapath.table import DEFAULT_LEASE_SECONDS, ShuntTable


class Datapath:
    """The program, its attachment, its table and its ring poller on one interface."""

    def __init__(self, ifname: str, prog: XdpProgram, attachment: XdpAttachment,
                 pin_dir: Path | None, adopted: bool, frags: bool, lease_seconds: float):
        self.ifname = ifname
        self.prog = prog
        self.attachment = attachment
        self.pin_dir = pin_dir
        self.adopted = adopted  # pinned maps from an earlier run were reused
        self.frags = frags  # the multi-buffer (BPF_F_XDP_HAS_FRAGS) copy is attached
        self.table = ShuntTable(prog, lease_seconds)
        self.ring = RingPoller(prog)

    @property
    def mode(self) -> XdpMode:
        return self.attachment.mode

    def stats(self) -> dict[str, int]:
        return read_stats(self.prog)

    def close(self, unpin: bool = False) -> None:
        """Detach (traffic visible again), release the program; ``unpin`` also deletes the
        pinned maps (final shutdown: counters of anything still shunted are gone)."""
        self.attachment.detach()
        self.table.close()
        self.ring.close()
        self.prog.close()
        if unpin and self.pin_dir is not None:
            pins.unpin_all(self.ifname, self.pin_dir.parent)

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _verify_pins(prog: XdpProgram, flows_max: int, pairs_max: int, pin_dir: Path) -> None:
    """bcc adopts a pinned map whatever its layout: check each one against this build."""
    want = {
        "flows": (prog.flows, ctypes.sizeof(prog.FlowKey), ctypes.sizeof(prog.FlowValue),
                  flows_max),
        "ip_pairs": (prog.ip_pairs, ctypes.sizeof(prog.PairKey),
                     ctypes.sizeof(prog.FlowValue), pairs_max),
        "config": (prog.config, 4, ctypes.sizeof(prog.ShuntConfig), 1),
    }
    for name, (table, key_size, value_size, max_entries) in want.items():
        info = libbpf.map_info(table.map_fd)
        have = (info.key_size, info.value_size, info.max_entries)
        if have != (key_size, value_size, max_entries):
            raise PinError(
                f"pinned map {pin_dir / name} has key/value/entries {have}, this build needs "
                f"{(key_size, value_size, max_entries)}: stop shuntd and remove {pin_dir} "
                f"(its counters are lost) or restore the previous map size"
            )
    info = libbpf.map_info(prog.stats_table.map_fd)
    if info.max_entries != prog.stats_table.max_entries:
        raise PinError(f"pinned map {pin_dir / 'stats'} has {info.max_entries} entries: "
                       f"remove {pin_dir}")


def open_datapath(
    ifname: str,
    *,
    mode: str = "auto",
    pin: bool = True,
    pin_root: Path = pins.PIN_ROOT,
    flows_max: int | None = None,
    pairs_max: int | None = None,
    ring_pages: int | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    extra_cflags: tuple[str, ...] = (),
) -> Datapath:
    """Load and attach the shunting program on ``ifname``. Raises a DatapathError subclass
    with a one-line fix for every missing prerequisite."""
    prereq.check_all()
    info = interface_info(ifname)
    require_up(info)
    refuse_if_occupied(info)
    flows_max = flows_max or DEFAULT_FLOWS_MAX
    pairs_max = pairs_max or DEFAULT_PAIRS_MAX
    pin_dir = pins.prepare_pin_dir(ifname, pin_root) if pin else None
    adopted = pin_dir is not None and (pin_dir / "flows").exists()
    prog = XdpProgram.compile(flows_max=flows_max, pairs_max=pairs_max, ring_pages=ring_pages,
                              pin_dir=str(pin_dir) if pin_dir else None,
                              extra_cflags=extra_cflags)
    attachment: XdpAttachment | None = None
    try:
        if pin_dir is not None:
            _verify_pins(prog, flows_max, pairs_max, pin_dir)
        prog.calibrate_clock()  # the daemon repeats it about every 60 s (program.py)
        frags = False
        try:
            attachment = attach_xdp(prog.prog_fd(frags=False), ifname, mode)
        except MtuTooLargeError:
            frags = True  # jumbo MTU: the multi-buffer copy is accepted in native mode
            attachment = attach_xdp(prog.prog_fd(frags=True), ifname, mode)
        return Datapath(ifname, prog, attachment, pin_dir, adopted, frags, lease_seconds)
    except BaseException:
        if attachment is not None:
            attachment.detach()
        prog.close()
        if pin_dir is not None and not adopted:
            pins.unpin_all(ifname, pin_root)  # do not leave fresh, empty pins behind
        raise

