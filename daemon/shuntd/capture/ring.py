"""Live capture from an AF_PACKET TPACKET_V3 mmap ring: yields `(ts, frame, wire_len, linktype)`.

Why a ring and not scapy or `recv`: the kernel writes packets straight into memory we share
with it, in blocks of many packets, and hands us a whole block at a time, so the per-packet cost
in Python is one `struct.unpack_from` and a slice — scapy's sniff loses most packets at a few
thousand per second (spec peers.md §7c).

What the consumer gets, and for how long:
* `ts` is network time as Zeek sees it through libpcap's microsecond precision:
  `tp_sec + (tp_nsec // 1000) / 1e6` (same doubles as the pcap reader for the same packet).
* `frame` is a memoryview INTO THE RING. It is valid only until the iterator is advanced: the
  block is handed back to the kernel once its last frame was consumed, and the view itself is
  released when the next frame is requested (touching it afterwards raises ValueError instead of
  reading bytes of some later packet). Decode it immediately; copy (`bytes(frame)`) to keep it.
  Slices taken from it are not released for you: do not keep them either.
* `wire_len` is the length on the wire (`tp_len`); `len(frame)` is smaller when the packet was
  truncated by the snap length (`RingConfig.snaplen`) or by a block too small to hold it.
* `linktype` is the pcap link type: 1 (Ethernet, also loopback) or 101 (raw IP, ARPHRD_NONE).

VLAN: the kernel always strips the outermost 802.1Q/802.1ad tag on receive (hardware offload or
`skb_vlan_untag`) and reports it in `tp_vlan_tci`/`tp_vlan_tpid` with TP_STATUS_VLAN_VALID. We
RE-INSERT the tag into the frame, in place, like libpcap does (a 4-byte PACKET_RESERVE gives the
headroom): the decoder then sees the same bytes as on the wire and in a pcap, and `wire_len`
grows by 4 to match.

Direction: on a tap/span port every packet is received (RX). Packets this host transmits on the
interface (PACKET_OUTGOING) are ignored by default — on a veth lab, capture each side's RX
instead — set `RingConfig.include_outgoing` to see them.

Drops: `stats()` reads PACKET_STATISTICS (the kernel resets its counters on every read; we
accumulate) so losses are reported, never silent.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_RESERVE = 12
PACKET_FANOUT = 18
PACKET_IGNORE_OUTGOING = 23
TPACKET_V3 = 2
PACKET_MR_PROMISC = 1
PACKET_OUTGOING = 4
ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26

PACKET_FANOUT_HASH = 0
PACKET_FANOUT_FLAG_UNIQUEID = 0x2000
PACKET_FANOUT_FLAG_IGNORE_OUTGOING = 0x4000  # Linux >= 6.10; older kernels refuse it (EINVAL)
PACKET_FANOUT_FLAG_DEFRAG = 0x8000

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1 << 0
TP_STATUS_CSUM_NOTREADY = 1 << 3  # locally sent, checksum left to the NIC (tx offload)
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6
TP_STATUS_CSUM_VALID = 1 << 7  # the driver or NIC already verified the checksum
_CSUM_UNCHECKABLE = TP_STATUS_CSUM_NOTREADY | TP_STATUS_CSUM_VALID

VLAN_TAG_LEN = 4
ETH_P_8021Q = 0x8100

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
_ARPHRD_TO_LINKTYPE = {1: LINKTYPE_ETHERNET, 772: LINKTYPE_ETHERNET, 65534: LINKTYPE_RAW}

# struct tpacket_req3: block_size, block_nr, frame_size, frame_nr, retire_blk_tov (ms),
# sizeof_priv, feature_req_word.
_REQ3 = struct.Struct("=7I")
# struct tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1: block_status,
# num_pkts, offset_to_first_pkt, ...
_BLOCK_HDR = struct.Struct("=III")  # read at block + 8: status, num_pkts, first offset
_BLOCK_STATUS = struct.Struct("=I")
_BLOCK_STATUS_OFF = 8
# struct tpacket3_hdr (48 bytes) then struct sockaddr_ll at TPACKET_ALIGN(48) = 48:
# next_offset, sec, nsec, snaplen, len, status, mac, [net, rxhash, vlan_tci, vlan_tpid,
# 2 pad + 8 tp_padding + sll_family, sll_protocol, sll_ifindex, sll_hatype], sll_pkttype.
# The VLAN fields are read apart (`_VLAN`, at 32), only for the frames that have them: every
# field costs each frame an object.
_PKT_HDR = struct.Struct("=IIIIIIH32xB")
_VLAN = struct.Struct("=IH")
_VLAN_OFF = 32
_TPACKET3_HDRLEN = 48 + 20
# Where the kernel puts an Ethernet frame (tp_mac) with our PACKET_RESERVE: TPACKET_ALIGN(hdr
# + 16) + reserve - 14 (af_packet.c tpacket_rcv). `_PKT_KEY` reads the header and, when the
# frame is there, its bytes 26-38 (a claim key) in one go; `_PKT_HDR1` has the same fields with
# a cheap last one instead (no claim: no key wanted). Near the end of the mapping the key may
# lie past it: `_PKT_HDR` + a slice then.
_MAC_USUAL = ((_TPACKET3_HDRLEN + 16 + 15) & ~15) + VLAN_TAG_LEN - 14
_PKT_KEY = struct.Struct(f"=IIIIIIH32xB{_MAC_USUAL + 26 - 59}x12s")
_PKT_HDR1 = struct.Struct("=IIIIIIH32xBB")
# A claimed frame's Ethernet type + IPv4 version/IHL + TOS, total length, fragment field + TTL +
# protocol, TCP seq, ack, data offset + flags (from byte 12): the ring's own tally.
_TCP4 = struct.Struct("!IHxxIxx12xIIH")
_TCP4_SNAP = 54
# By the TCP data offset + flags word: where the TCP header ends in the IP packet (20 + its
# length) when the flags are ACK without SYN, FIN or RST and the header has 20+ bytes; else
# more than any IP length, so one comparison checks flags, header and payload length.
_HDR_END = tuple(20 + ((of >> 10) & 0x3C) if of & 0x17 == 0x10 and of >= 0x5000 else 1 << 17
                 for of in range(1 << 16))
# A tally's `tally` counts packets above bit 64 and IP bytes below (one addition per packet).
TALLY_PKT_SHIFT = 64  # (bytes below 2^64: no carry into the packets, ever)
_ONE_PKT = 1 << TALLY_PKT_SHIFT
_TAG = struct.Struct("!HH")
_STATS_V3 = struct.Struct("=III")
_MREQ = struct.Struct("=iHH8s")
_SOCK_FILTER = struct.Struct("=HBBI")
_SOCK_FPROG = struct.Struct("@HP")
_BPF_RET_K = 0x06

Record = tuple[float, memoryview, int, int]
# `poll(claim=(keys, take[, due, clock]))`: a frame whose bytes 26-38 are a key of `keys` is
# offered to `take(value, ring, start, snap, wire_len, ts)` first, before any object is made of
# it; the ring skips it when `take` returns True. With `due` and `clock`, values may be tallies
# the ring updates itself for the common frames (see CaptureRing.poll).
Claim = (tuple[dict[bytes, Any], Callable[[Any, mmap.mmap, int, int, int, float], bool]]
         | tuple[dict[bytes, Any], Callable[[Any, mmap.mmap, int, int, int, float], bool],
                 Callable[[], float], Callable[[float], None]])
log = logging.getLogger(__name__)

FANOUT_NEW_GROUP = -1  # `fanout_group` value: let the kernel pick an unused id (see .fanout_group)


class CaptureError(Exception):
    """Capture could not be set up (missing interface, no privilege, bad ring geometry)."""


@dataclass(frozen=True, slots=True)
class RingConfig:
    """Ring geometry and capture options.

    The defaults (64 x 1 MiB) hold ~400k small packets: about a second of a Python consumer's
    worth of backlog. `frame_size` only matters to the kernel's geometry check in V3 (packets are
    packed back to back, any size up to a block); `snaplen` truncates with a one-instruction
    socket filter, as tcpdump's -s does.

    `retire_timeout_ms` bounds the latency of a quiet link (a partly filled block is handed over
    after it) but also closes a block at every lull: at low rates the ring holds only
    `block_count` lulls, so a consumer stalled longer than block_count x timeout drops packets
    even with the blocks nearly empty. 64 x 20 ms tolerates a 1.3 s stall.
    """

    block_size: int = 1 << 20
    block_count: int = 64
    frame_size: int = 2048
    retire_timeout_ms: int = 20
    snaplen: int | None = None
    promiscuous: bool = False
    include_outgoing: bool = False

    def check(self) -> None:
        """Raise CaptureError naming the first setting the kernel would refuse."""
        page = mmap.PAGESIZE
        if self.block_size < page or self.block_size % page:
            raise CaptureError(f"block_size {self.block_size} must be a multiple of {page}")
        if self.block_count < 1:
            raise CaptureError(f"block_count {self.block_count} must be at least 1")
        if self.frame_size < _TPACKET3_HDRLEN or self.frame_size % 16:
            raise CaptureError(
                f"frame_size {self.frame_size} must be a multiple of 16 and >= {_TPACKET3_HDRLEN}"
            )
        if self.block_size % self.frame_size:
            raise CaptureError(
                f"block_size {self.block_size} must be a multiple of frame_size {self.frame_size}"
            )
        if not 1 <= self.retire_timeout_ms <= 60_000:
            raise CaptureError(f"retire_timeout_ms {self.retire_timeout_ms} must be 1..60000")
        if self.snaplen is not None and not 64 <= self.snaplen <= 262144:
            raise CaptureError(f"snaplen {self.snaplen} must be 64..262144")


@dataclass(slots=True)
class CaptureStats:
    """Counters since the ring was opened.

    `seen` is every packet the socket accepted, including `dropped` ones (the ring was full);
    `delivered` is what this ring yielded; `freeze_q_cnt` counts times the queue froze full.
    """

    seen: int = 0
    dropped: int = 0
    freeze_q_cnt: int = 0
    delivered: int = 0


def interface_index(iface: str) -> int:
    """ifindex of `iface`, or CaptureError saying it is missing."""
    try:
        return socket.if_nametoindex(iface)
    except OSError as exc:
        raise CaptureError(f"capture interface {iface!r} does not exist") from exc


def _attach_snaplen_filter(sock: socket.socket, snaplen: int) -> None:
    """Truncate every packet to `snaplen` with the classic BPF program `ret #snaplen`."""
    insn = ctypes.create_string_buffer(_SOCK_FILTER.pack(_BPF_RET_K, 0, 0, snaplen))
    prog = _SOCK_FPROG.pack(1, ctypes.addressof(insn))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)


class CaptureRing:
    """One AF_PACKET socket with a TPACKET_V3 RX ring bound to one interface.

    Use `poll(timeout)` in a loop (it returns when nothing is ready, so the caller can run its
    timers), or iterate the ring itself to block forever. Close it (or use `with`) to unmap.
    `fanout_group` joins a PACKET_FANOUT_HASH group (see fanout.py); FANOUT_NEW_GROUP makes
    the kernel allocate an unused id, read back from `self.fanout_group` for the other members.
    Only one `poll()` generator may be in use at a time.
    """

    __slots__ = ("config", "iface", "ifindex", "_stats", "_stats_lock", "_block", "_resume",
                 "_drop_outgoing", "fanout_group", "link_down_events", "resyncs", "claimed",
                 "csum_unchecked", "_sock", "_map", "_view", "linktype", "_poller")

    def __init__(
        self, iface: str, config: RingConfig | None = None, fanout_group: int | None = None
    ) -> None:
        self.config = config = config or RingConfig()
        config.check()
        self.iface = iface
        self.ifindex = interface_index(iface)
        self._stats = CaptureStats()
        self._stats_lock = threading.Lock()  # stats() is read by the metrics thread too
        self._block = 0
        self._resume: tuple[int, int] | None = None  # (offset, packets left) in current block
        self._drop_outgoing = not config.include_outgoing
        self.fanout_group: int | None = None
        self.link_down_events = 0
        self.resyncs = 0  # times the kernel went on past the block we waited for (_resync)
        self.claimed = 0  # frames taken by a `poll()` claim instead of yielded
        # Of the frame `poll()` yielded last: the kernel says its checksum is not filled in
        # yet (CSUM_NOTREADY) or already verified (CSUM_VALID). Either way the bytes cannot
        # or need not be checked: pass it as `ignore_checksums` to decode().
        self.csum_unchecked = False
        try:
            # Protocol 0: receive nothing until bound to our interface, so no packet of another
            # interface ever slips into the ring.
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except PermissionError as exc:
            raise CaptureError(
                "opening an AF_PACKET socket needs root (or CAP_NET_RAW); run shuntd with sudo"
            ) from exc
        try:
            self._map, self._view = self._setup(config, fanout_group)
        except BaseException:
            self._sock.close()
            raise
        self.linktype = self._linktype()
        self._poller = select.poll()
        self._poller.register(self._sock.fileno(), select.POLLIN | select.POLLERR)

    def _setup(
        self, config: RingConfig, fanout_group: int | None
    ) -> tuple[mmap.mmap, memoryview]:
        sock = self._sock
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        sock.setsockopt(SOL_PACKET, PACKET_RESERVE, VLAN_TAG_LEN)
        if config.snaplen is not None:
            _attach_snaplen_filter(sock, config.snaplen)
        frames = config.block_size // config.frame_size * config.block_count
        req = _REQ3.pack(
            config.block_size, config.block_count, config.frame_size, frames,
            config.retire_timeout_ms, 0, 0,
        )
        try:
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        except OSError as exc:
            size = config.block_size * config.block_count
            raise CaptureError(f"kernel refused a {size}-byte TPACKET_V3 ring: {exc}") from exc
        size = config.block_size * config.block_count
        ring = mmap.mmap(sock.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            if not config.include_outgoing:
                # Best effort: spares the kernel copying our own transmissions into the ring;
                # outgoing packets are also skipped while reading, so old kernels stay correct.
                try:
                    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
                except OSError:
                    pass
            try:
                sock.bind((self.iface, ETH_P_ALL))
            except OSError as exc:
                raise CaptureError(f"cannot bind capture to {self.iface!r}: {exc}") from exc
            if config.promiscuous:
                mreq = _MREQ.pack(self.ifindex, PACKET_MR_PROMISC, 0, b"")
                sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
            if fanout_group is not None:
                self._join_fanout(fanout_group, config.include_outgoing)
        except BaseException:
            ring.close()
            raise
        return ring, memoryview(ring)

    def _join_fanout(self, group: int, include_outgoing: bool) -> None:
        flags = PACKET_FANOUT_FLAG_DEFRAG
        if group == FANOUT_NEW_GROUP:
            group, flags = 0, flags | PACKET_FANOUT_FLAG_UNIQUEID
        elif not 0 <= group <= 0xFFFF:
            raise CaptureError(f"fanout group id {group} must be 0..65535")
        tried = [flags] if include_outgoing else [flags | PACKET_FANOUT_FLAG_IGNORE_OUTGOING, flags]
        last: OSError | None = None
        for fl in tried:
            try:
                arg = group | ((PACKET_FANOUT_HASH | fl) << 16)  # > INT_MAX: pass as u32 bytes
                self._sock.setsockopt(SOL_PACKET, PACKET_FANOUT, struct.pack("=I", arg))
                raw = self._sock.getsockopt(SOL_PACKET, PACKET_FANOUT)
                self.fanout_group = raw & 0xFFFF
                return
            except OSError as exc:
                last = exc
        msg = f"cannot join fanout group {group} on {self.iface!r}: {last}"
        if last is not None and last.errno == errno.EINVAL:
            msg += " (group exists with other settings, or on another interface?)"
        raise CaptureError(msg) from last

    def _linktype(self) -> int:
        hatype = self._sock.getsockname()[3]
        try:
            return _ARPHRD_TO_LINKTYPE[hatype]
        except KeyError:
            self.close()
            raise CaptureError(
                f"interface {self.iface!r} has hardware type {hatype}; only Ethernet, "
                "loopback and raw-IP interfaces are supported"
            ) from None

    # -- reading ---------------------------------------------------------------------------

    def poll(self, timeout: float | None = 0.0, claim: Claim | None = None
             ) -> Iterator[Record]:
        """Yield every frame ready now, waiting up to `timeout` seconds (None: forever) first.

        Stops when no block is ready. Breaking out early is fine: the next call resumes at the
        frame after the last one yielded.

        `claim` (Ethernet only) lets the consumer take frames it recognises by their bytes
        26-38 (IPv4 addresses and ports) straight from the ring: a frame whose slice is a key
        of the dict (which may change meanwhile) is passed to the function with the dict's
        value, the ring's buffer, the frame's offset in it, its captured and wire length
        (VLAN tag stripped: the kernel removed it, bytes 12-13 are the type after it) and its
        time; if that returns True the frame is not yielded. Such frames cost a header read
        and a lookup: no memoryview, no tuple.

        Tallies (`claim` with `due` and `clock`): a value whose `fast` is not 0 is counted by
        the ring itself, without calling `take`, for its common frames: IPv4 without options,
        not a fragment, TCP with ACK and none of SYN, FIN, RST, captured before `due()` (asked
        again after the consumer or `take` ran), of a kind `fast` allows (bit 1: with payload,
        bit 2: without; a value whose `armed` allows the kind instead is re-armed first:
        `value.rearm()` sets `fast` and returns True). The ring adds the IP total length plus
        1 << TALLY_PKT_SHIFT to `tally` (packets above that bit, bytes below), keeps the latest
        time in `last_ts`, and moves `seq` (the
        sequence number after the payload) and `ack` forward as XDP's tcp_track does: to the
        frame's value when it lies less than half the 32-bit space ahead (both are kept
        unwrapped). `take` does the same for the frames it takes, so the result is as if it
        had taken them all; it sets `fast` once it holds for the value. `clock(ts)` is told
        the latest time of the frames tallied before the ring calls `take`, yields an older
        frame or stops (the consumer's clock moves as if `take` had seen them; a frame yielded
        no older than them moves it there anyway, with no timer due in between). Ring-tallied
        frames cost a second header read and a few additions.
        """
        cfg = self.config
        bsize, bcount = cfg.block_size, cfg.block_count
        view = self._view
        ring = self._map
        outgoing = PACKET_OUTGOING if self._drop_outgoing else -1
        linktype = self.linktype
        stats = self._stats
        # libpcap caps the frame at the snap length again after re-inserting a VLAN tag.
        snaplen = cfg.snaplen or bsize
        keys: dict[bytes, Any] = {}
        take: Any = None
        due_fn: Any = None
        clock_fn: Any = None
        if claim is not None and linktype == LINKTYPE_ETHERNET:
            keys, take = claim[0], claim[1]
            if len(claim) == 4:
                due_fn, clock_fn = claim[2], claim[3]  # type: ignore[misc]
        lookup = keys.get  # (the same dict throughout: it may change, not be replaced)
        unpack_hdr = _PKT_KEY.unpack_from if take is not None else _PKT_HDR1.unpack_from
        unpack_tcp = _TCP4.unpack_from
        hdr_end = _HDR_END
        one_pkt = _ONE_PKT
        mac_usual = _MAC_USUAL
        # Tally frames captured before `due`; None: ask due_fn (the consumer or take ran).
        stale: float | None = None if due_fn is not None else -1.0
        due = stale
        clock = 0.0  # latest time of frames tallied, not yet told to clock_fn
        claimed = 0
        if not self._block_ready(self._block * bsize):
            wait = -1 if timeout is None else max(0, int(timeout * 1000))
            for _fd, events in self._poller.poll(wait):
                if events & select.POLLERR:
                    self._socket_error()
                if events & select.POLLIN and not self._block_ready(self._block * bsize):
                    self._resync()
        while True:
            block = self._block * bsize
            if not self._block_ready(block):
                return
            if self._resume is not None:
                off, left = self._resume
                self._resume = None
            else:
                _, left, first = _BLOCK_HDR.unpack_from(ring, block + _BLOCK_STATUS_OFF)
                off = block + first
            delivered = 0
            frame: memoryview | None = None
            try:
                while left:
                    try:
                        nxt, sec, nsec, snap, wire_len, status, mac, pkttype, key = unpack_hdr(
                            ring, off)
                    except struct.error:  # the key would lie past the end of the mapping
                        nxt, sec, nsec, snap, wire_len, status, mac, pkttype = (
                            _PKT_HDR.unpack_from(ring, off))
                        key = ring[off + mac + 26:off + mac + 38]
                    start = off + mac
                    off += nxt
                    left -= 1
                    if pkttype == outgoing:
                        continue
                    if keys:
                        if mac != mac_usual:
                            key = ring[start + 26:start + 38]
                        hit = lookup(key)
                        if hit is not None:
                            ts = sec + (nsec // 1000) / 1e6
                            if due is None:
                                due = due_fn()
                            if ts < due and snap >= 54:  # (_TCP4_SNAP)
                                head, ip_len, frag_proto, seq, ack, of = unpack_tcp(
                                    ring, start + 12)
                                # IPv4 without options, not a fragment, TCP, ACK without
                                # SYN/FIN/RST and a TCP header of 20+ bytes (`_HDR_END`: its
                                # end in the IP packet, else beyond any), all within the IP
                                # and the wire lengths, a kind the tally takes.
                                end = hdr_end[of]
                                if (head >> 8 == 0x080045 and frag_proto & 0x3FFF00FF == 6
                                        and end <= ip_len <= wire_len - 14):
                                    payload = ip_len - end
                                    kind = 1 if payload else 2
                                    if hit.fast & kind or hit.armed & kind and hit.rearm():
                                        hit.tally += ip_len + one_pkt
                                        if ts > hit.last_ts:
                                            hit.last_ts = ts
                                        cur = hit.seq
                                        d = (seq + payload - cur) & 0xFFFFFFFF
                                        if 0 < d < 0x80000000:
                                            hit.seq = cur + d
                                        cur = hit.ack
                                        d = (ack - cur) & 0xFFFFFFFF
                                        if 0 < d < 0x80000000:
                                            hit.ack = cur + d
                                        if ts > clock:
                                            clock = ts
                                        claimed += 1
                                        continue
                            if clock:
                                clock_fn(clock)
                                clock = 0.0
                            taken = take(hit, ring, start, snap, wire_len, ts)
                            due = stale
                            if taken:
                                claimed += 1
                                continue
                    if status & TP_STATUS_VLAN_VALID and snap >= 12:
                        tci, tpid = _VLAN.unpack_from(ring, start - mac + _VLAN_OFF)
                        if not status & TP_STATUS_VLAN_TPID_VALID:
                            tpid = ETH_P_8021Q
                        start -= VLAN_TAG_LEN
                        view[start:start + 12] = view[start + 4:start + 16]
                        _TAG.pack_into(ring, start + 12, tpid, tci & 0xFFFF)
                        snap = min(snap + VLAN_TAG_LEN, snaplen)
                        wire_len += VLAN_TAG_LEN
                    frame = view[start:start + snap]
                    self.csum_unchecked = status & _CSUM_UNCHECKABLE != 0
                    delivered += 1
                    ts = sec + (nsec // 1000) / 1e6
                    if clock > ts:
                        # (Else the consumer's clock moves to `ts` with this frame anyway,
                        # no timer in between: the tally stopped before `due`.)
                        clock_fn(clock)
                        clock = 0.0
                    yield ts, frame, wire_len, linktype
                    frame.release()
                    frame = None
                    due = stale
            finally:
                # Also reached when the consumer stops iterating: remember where to resume, or
                # hand the block back if its last frame was already yielded.
                stats.delivered += delivered
                if claimed:
                    self.claimed += claimed
                    claimed = 0
                if clock:
                    clock_fn(clock)
                    clock = 0.0
                if frame is not None:
                    frame.release()
                if left:
                    self._resume = (off, left)
                else:
                    _BLOCK_STATUS.pack_into(ring, block + _BLOCK_STATUS_OFF, TP_STATUS_KERNEL)
                    self._block = (self._block + 1) % bcount

    def _resync(self) -> None:
        """The kernel says a block is ready but ours is not: find where the kernel went on.

        The kernel fills blocks in ring order and we hand them back in the same order, so
        the block we wait for is always the oldest one it will hand over, and while we wait
        for it no other block is ours. Under overload (ring full, queue frozen) a 6.x kernel
        was seen to go on a block past ours instead, which left ours with the kernel and
        every later block ready: waiting for ours then spins (the socket stays readable)
        while the ring fills and drops everything. Continue at the first ready block after
        ours (the oldest of that run); checked again after seeing it, since a block retired
        meanwhile is a race, not a skip."""
        bsize, bcount = self.config.block_size, self.config.block_count
        for step in range(1, bcount):
            nxt = (self._block + step) % bcount
            if self._block_ready(nxt * bsize):
                if self._block_ready(self._block * bsize):
                    return  # ours was handed over meanwhile: nothing was skipped
                self._block = nxt
                self._resume = None
                self.resyncs += 1
                if self.resyncs == 1:
                    log.warning("capture ring on %s: the kernel went on past block %d; "
                                "continuing at block %d (further skips are counted)",
                                self.iface, (nxt - step) % bcount, nxt)
                return

    def _socket_error(self) -> None:
        """The kernel flags link changes as socket errors: down is survivable, gone is not."""
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # reading clears it
        if err == errno.ENETDOWN:
            # Down and unregistered both report ENETDOWN; only a link that still exists comes
            # back (the kernel re-hooks the socket on NETDEV_UP).
            try:
                still_there = socket.if_nametoindex(self.iface) == self.ifindex
            except OSError:
                still_there = False
            if not still_there:
                raise CaptureError(f"capture interface {self.iface!r} was removed")
            self.link_down_events += 1
            return
        if err:
            raise CaptureError(f"capture on {self.iface!r} failed: {os.strerror(err)}")

    def _block_ready(self, block: int) -> bool:
        status = _BLOCK_STATUS.unpack_from(self._map, block + _BLOCK_STATUS_OFF)[0]
        return bool(status & TP_STATUS_USER)

    def __iter__(self) -> Iterator[Record]:
        while True:
            yield from self.poll(None)

    def stats(self) -> CaptureStats:
        """Accumulated counters (reads and resets the kernel's PACKET_STATISTICS)."""
        with self._stats_lock:  # (each read resets the kernel's counters: none may be lost)
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS_V3.size)
            packets, drops, freezes = _STATS_V3.unpack(raw)
            s = self._stats
            s.seen += packets  # the kernel's tp_packets already includes tp_drops
            s.dropped += drops
            s.freeze_q_cnt += freezes
            return CaptureStats(s.seen, s.dropped, s.freeze_q_cnt, s.delivered)

    def fileno(self) -> int:
        """The socket, for callers that multiplex it in their own poll loop."""
        return self._sock.fileno()

    def close(self) -> None:
        """Unmap the ring and close the socket (promiscuous membership ends with it)."""
        view = getattr(self, "_view", None)
        if view is not None:
            view.release()
            self._view = None  # type: ignore[assignment]
            try:
                self._map.close()
            except BufferError:
                pass  # a consumer still holds a frame slice: unmapped when it is collected
        self._sock.close()

    def __enter__(self) -> CaptureRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
