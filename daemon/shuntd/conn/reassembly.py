"""Per-direction TCP reassembly as Zeek's TCP_Reassembler does it (for gaps and delivery).

Sequence numbers here are relative to the endpoint's start (the first data byte is 1). Data
is delivered in order to `hooks.tcp_deliver`; acknowledged holes become content gaps
(`missed_bytes`, history `G`/`g` when both endpoints are clean; spec §1.9). Blocks stay
buffered until acknowledged, because Zeek's close/EOF logic looks at them.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING

from shuntd.conn.tcpstate import CLOSED, ESTABLISHED, RESET

if TYPE_CHECKING:
    from shuntd.conn.tcp import TCPEndpoint

M64 = (1 << 64) - 1
_ZEROS_VIEW = memoryview(bytes(65536))  # stand-in payload when only lengths matter


def _is_clean(ep: TCPEndpoint) -> bool:
    return ep.state == ESTABLISHED or (ep.state == CLOSED and ep.prev_state == ESTABLISHED)


class Reassembler:
    """Blocks `(seq, upper, data)` sorted and non-overlapping; `lrs` = next seq to deliver.
    Blocks are tuples (smaller than lists); delivering one replaces it with a data-less copy.

    The first block, when it is delivered data (`data` None), lives in the two slots
    `head_lo`/`head_hi` instead of a tuple in a list: an open connection typically holds
    exactly one such block (its request, delivered but not yet acked), and the slots cost
    16 B where the list and the tuple cost 128 B. Rare paths work on `_all()` and store the
    result back with `_keep()`; the common paths handle the head directly."""

    __slots__ = ("ep", "lrs", "trim_seq", "blocks", "did_eof", "size", "head_lo", "head_hi")

    def __init__(self, ep: TCPEndpoint) -> None:
        self.ep = ep
        self.lrs = 1
        self.trim_seq = 1
        # The blocks after the head: an empty tuple while there are none, else a list
        # (made with its first block: an appended-to empty list would over-allocate).
        # None once skipping (Zeek's `skip_deliveries`: buffering stopped for good).
        self.blocks: list[tuple] | tuple[()] | None = ()
        self.head_lo: int | None = None   # first block, delivered: [head_lo, head_hi)
        self.head_hi = 0
        self.did_eof = False
        self.size = 0          # bytes buffered in blocks (the head included)

    @property
    def skip(self) -> bool:
        """Buffering stopped for good (a limit was hit)."""
        return self.blocks is None

    def has_blocks(self) -> bool:
        """Anything buffered (delivered or not)."""
        return self.head_lo is not None or bool(self.blocks)

    def _all(self) -> list[tuple]:
        """Every block, the head included, sorted (a new list, for the rare paths)."""
        blocks = list(self.blocks or ())
        if self.head_lo is not None:
            blocks.insert(0, (self.head_lo, self.head_hi, None))
        return blocks

    def _keep(self, blocks: list[tuple]) -> None:
        """Store the sorted `blocks` (not while skipping): a delivered first block in the
        head slots, the rest in `blocks`."""
        if blocks and blocks[0][2] is None:
            self.head_lo, self.head_hi = blocks[0][0], blocks[0][1]
            blocks = blocks[1:]
        else:
            self.head_lo = None
        self.blocks = blocks if blocks else ()

    def _add_delivered(self, seq: int, upper: int) -> None:
        """Record the block [seq, upper) just delivered at the end of the buffer."""
        blocks = self.blocks
        if blocks:
            blocks.append((seq, upper, None))
        elif self.head_lo is None:
            self.head_lo = seq
            self.head_hi = upper
        else:
            self.blocks = [(seq, upper, None)]

    # --- data in -----------------------------------------------------------------------------
    def data_len_sent(self, seq: int, n: int) -> None:
        """`data_sent` of `n` > 0 bytes nobody consumes (no tcp_deliver listener): the same
        bookkeeping without a payload object on the common in-order path."""
        blocks = self.blocks
        if blocks is None:   # skipping
            return
        if seq == self.lrs and seq >= self.trim_seq and (not blocks or blocks[-1][1] <= seq):
            upper = seq + n
            self.size += n
            self._add_delivered(seq, upper)
            self.lrs = upper
            ep = self.ep
            acked = ep.ack_rel   # ep.no_data_acked(), inlined
            if acked == 0 or acked == 1:
                self._trim_if_unacked()
            limit = ep.analyzer.settings.tcp_excessive_data_without_further_acks
            if limit and self.size > limit:
                self._clear()
            return
        self.data_sent(seq, _ZEROS_VIEW[:n] if n <= len(_ZEROS_VIEW) else bytes(n))

    def data_sent(self, seq: int, data: bytes) -> None:
        blocks = self.blocks
        if blocks is None:   # skipping
            return
        ep = self.ep
        an = ep.analyzer
        n = len(data)
        if n and seq == self.lrs and seq >= self.trim_seq and (not blocks or blocks[-1][1] <= seq):
            # Fast path of _new_block: in-order data at the delivery point (the common case).
            upper = seq + n
            self.size += n
            self._add_delivered(seq, upper)
            self.lrs = upper
            if an.want_stream:
                conn = an.conn
                an.hooks.tcp_deliver(conn, ep.side == conn.orig_side, data)
            acked = ep.ack_rel   # ep.no_data_acked(), inlined
            if acked == 0 or acked == 1:
                self._trim_if_unacked()
            # Nothing lies above the delivery point now: only the total size can be too much.
            limit = an.settings.tcp_excessive_data_without_further_acks
            if limit and self.size > limit:
                self._clear()
            return
        self._new_block(seq, data)
        settings = an.settings
        limit = settings.tcp_max_above_hole_without_any_acks
        if limit and self.has_blocks() and self._top() - self.lrs > limit and ep.no_data_acked():
            self._clear()
        limit = settings.tcp_excessive_data_without_further_acks
        if limit and self.size > limit:
            self._clear()

    def _clear(self) -> None:
        self.blocks = None   # skip from now on
        self.head_lo = None
        self.size = 0

    def _top(self) -> int:
        """Upper end of the last block (there is one)."""
        blocks = self.blocks
        return blocks[-1][1] if blocks else self.head_hi

    def _new_block(self, seq: int, data: bytes) -> None:
        n = len(data)
        if n == 0:
            return
        upper = seq + n
        if upper <= self.trim_seq:
            return
        if seq < self.trim_seq:
            data = data[self.trim_seq - seq:]
            seq = self.trim_seq
        blocks = self.blocks
        if not self.has_blocks() or self._top() <= seq:
            self.size += upper - seq
            if seq == self.lrs:
                # In-order data at the delivery point: deliver it straight away.
                self._add_delivered(seq, upper)
                self.lrs = upper
                an = self.ep.analyzer
                if an.want_stream:
                    conn = an.conn
                    an.hooks.tcp_deliver(conn, self.ep.side == conn.orig_side, data)
                self._trim_if_unacked()
                return
            if blocks:
                blocks.append((seq, upper, data))
            else:
                self.blocks = [(seq, upper, data)]
            if seq <= self.lrs < upper:
                self._block_inserted()
            return
        else:
            blocks = self._all()
            pieces = []
            cur = seq
            i = bisect_right(blocks, (seq, M64 + 1)) - 1
            if i < 0:
                i = 0
            for b in blocks[i:]:
                if b[0] >= upper:
                    break
                if b[1] <= cur:
                    continue
                if b[0] > cur:
                    pieces.append((cur, b[0], data[cur - seq:b[0] - seq]))
                cur = b[1]
                if cur >= upper:
                    break
            if cur < upper:
                pieces.append((cur, upper, data[cur - seq:]))
            if not pieces:
                return
            for p in pieces:
                self.size += p[1] - p[0]
            blocks.extend(pieces)
            blocks.sort(key=lambda b: b[0])
            self._keep(blocks)
            # Zeek's BlockInserted delivers only when the first new block covers the
            # delivery point.
            if pieces[0][0] <= self.lrs < pieces[0][1]:
                self._block_inserted()

    def _block_inserted(self) -> None:
        self._deliver_contiguous()
        self._trim_if_unacked()

    def _trim_if_unacked(self) -> None:
        """Nothing acked yet but more than tcp_max_initial_window sent: stop holding data."""
        ep = self.ep
        if ep.no_data_acked():
            limit = ep.analyzer.settings.tcp_max_initial_window
            if limit and ep.size > limit:
                self.trim_to_seq(self.lrs)

    def _deliver_contiguous(self) -> None:
        ep = self.ep
        an = ep.analyzer
        conn = an.conn
        hooks = an.hooks
        blocks = self.blocks
        if blocks is None:
            return
        for i, b in enumerate(blocks):
            if b[0] > self.lrs:
                break
            if b[0] == self.lrs:
                self.lrs = b[1]
                data = b[2]
                if data is not None:
                    blocks[i] = (b[0], b[1], None)
                    if an.want_stream:
                        hooks.tcp_deliver(conn, ep.side == conn.orig_side, data)

    # --- acks ----------------------------------------------------------------------------------
    def ack_received(self, seq: int) -> None:
        ep = self.ep
        rare = ep.rare   # (ep.FIN_cnt > 0 and seq >= ep.FIN_seq, without the properties)
        if rare is not None and rare.FIN_cnt > 0 and seq >= rare.FIN_seq:
            seq = rare.FIN_seq - 1
        if seq <= self.trim_seq:
            return
        self.trim_to_seq(seq)
        self.check_eof()

    def trim_to_seq(self, seq: int) -> None:
        if seq > self.lrs:
            self._undelivered(seq)
        blocks = self.blocks
        head_lo = self.head_lo
        if head_lo is not None:
            if self.head_hi > seq:   # the first block stays: so do all others
                if seq > self.trim_seq:
                    self.trim_seq = seq
                return
            self.size -= self.head_hi - head_lo
            self.head_lo = None
        if blocks:
            n = 0
            for b in blocks:
                if b[1] > seq:
                    break
                self.size -= b[1] - b[0]
                n += 1
            if n:
                del blocks[:n]
            if self.head_lo is None and blocks and blocks[0][2] is None:
                self.head_lo, self.head_hi = blocks[0][0], blocks[0][1]   # the new head
                del blocks[0]
            if not blocks:
                self.blocks = ()   # an emptied list still costs 56 B
        if seq > self.trim_seq:
            self.trim_seq = seq

    def _undelivered(self, up_to_seq: int) -> None:
        ep = self.ep
        an = ep.analyzer
        if up_to_seq <= 2 and an.is_partial:
            # Partial connection: the faked SYN octet / keep-alive artefact (Zeek ignores it).
            return
        if self.blocks is not None:
            restart = True
            while restart:
                restart = False
                for b in self.blocks or ():
                    if b[0] < self.lrs:
                        continue
                    if b[0] >= up_to_seq:
                        break
                    gap_len = b[0] - self.lrs
                    if gap_len > 0:
                        self._gap(gap_len)
                    self.lrs = b[0]
                    self._block_inserted()
                    restart = True
                    break
            if up_to_seq > self.lrs:
                self._gap(up_to_seq - self.lrs)
        if up_to_seq > self.lrs:
            self.lrs = up_to_seq

    def _gap(self, length: int) -> None:
        ep = self.ep
        an = ep.analyzer
        conn = an.conn
        clean = _is_clean(ep) and _is_clean(ep.peer)
        is_orig = ep.side == conn.orig_side
        if clean:
            ep.gap_letter(conn)
        if clean or an.settings.report_gaps_for_partial:
            conn.missed_bytes += length
            an.hooks.content_gap(conn, is_orig, length)

    # --- end of data ---------------------------------------------------------------------------
    def data_pending(self) -> bool:
        if self.blocks is None:   # skipping
            return False
        ep = self.ep
        delivered = self.lrs   # both relative to start_seq
        last = ep.last_rel
        if last < delivered:
            return False
        if delivered != last - 1 and delivered != last:
            return True
        peer_reasm = ep.peer.reasm  # None = nothing buffered
        if ep.state != RESET and peer_reasm is not None and peer_reasm.has_blocks():
            return True
        return False

    def check_eof(self) -> None:
        ep = self.ep
        rare = ep.rare   # (ep.FIN_cnt > 0, without the property)
        if (not self.did_eof and ((rare is not None and rare.FIN_cnt > 0) or ep.state == CLOSED
                                  or ep.state == RESET)
                and not self.data_pending()):
            self.did_eof = True
            ep.analyzer.endpoint_eof(ep)
