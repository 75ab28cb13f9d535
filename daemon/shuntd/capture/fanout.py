"""Share one interface between N worker processes with PACKET_FANOUT_HASH.

The kernel picks the member socket from the skb's *symmetric* flow hash, so both directions of
a connection reach the same worker — each worker can own its connections outright. With
PACKET_FANOUT_FLAG_DEFRAG the kernel reassembles IPv4 fragments before hashing (fragments carry
no ports and would otherwise land elsewhere); workers then see the reassembled datagram, once,
with its reassembled length and the time of the completing fragment — as Zeek counts it
(zeek-conn.md §0.3). Known gap: the kernel does not reassemble IPv6 for fanout; IPv6 fragments
hash on addresses only, so a fragmented IPv6 datagram may reach a different worker than the
unfragmented packets of its flow (fixing that needs PACKET_FANOUT_EBPF with an address-pair hash).

Membership decides the split (hash scaled by the number of members), so open every worker's
ring before traffic is processed: either `open_fanout_rings()` in the parent before forking, or
`open_worker_ring()` in each worker followed by a start barrier.
"""

from __future__ import annotations

from shuntd.capture.ring import FANOUT_NEW_GROUP, CaptureError, CaptureRing, RingConfig


def open_worker_ring(
    iface: str, worker: int, workers: int, group_id: int, config: RingConfig | None = None
) -> CaptureRing:
    """Open the ring of worker `worker` (0-based) of `workers`, joined to fanout `group_id`.

    The kernel does not number members; `worker` is validated so a miswired command line fails
    loudly. A single worker does not join a group (no fanout cost). `group_id` may be
    FANOUT_NEW_GROUP for the first member; the others then use its `.fanout_group`.
    """
    if workers < 1:
        raise CaptureError(f"workers must be at least 1, not {workers}")
    if not 0 <= worker < workers:
        raise CaptureError(f"worker index {worker} is outside 0..{workers - 1}")
    return CaptureRing(iface, config, fanout_group=group_id if workers > 1 else None)


def open_fanout_rings(
    iface: str, workers: int, group_id: int | None = None, config: RingConfig | None = None
) -> list[CaptureRing]:
    """Open all `workers` rings of one fanout group at once (closing them all on failure).

    Without `group_id` the kernel allocates an unused one, so concurrent daemons never collide.
    """
    group = FANOUT_NEW_GROUP if group_id is None else group_id
    rings: list[CaptureRing] = []
    try:
        for i in range(workers):
            ring = open_worker_ring(iface, i, workers, group, config)
            rings.append(ring)
            if ring.fanout_group is not None:
                group = ring.fanout_group
    except BaseException:
        for ring in rings:
            ring.close()
        raise
    return rings
