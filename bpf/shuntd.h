/* shuntd.h: every layout shared by the XDP program and the Python daemon.
 *
 * This is the single definition. Python never re-declares these structs: it takes the
 * ctypes types bcc generates from this file (map Key/Leaf types, and the `event_layout`
 * array map for the ring-buffer record) and parses the enums and #defines below by name
 * (shuntd/datapath/program.py). So: keep every enum member on its own line, give
 * #defines plain integer values, and never reorder fields without bumping
 * SHUNTD_LAYOUT_VERSION.
 *
 * Byte order: addresses are stored as on the wire (network order, 16 bytes, IPv4 as the
 * v4-mapped address ::ffff:a.b.c.d). Ports, VLAN ids, seq/ack and lengths are numbers in
 * host order.
 *
 * Endpoint ordering (flows and pairs): the program knows nothing of orig/resp. An
 * endpoint is (addr, port). Endpoint A is "side 1" if its 16 address bytes compare
 * smaller with memcmp, or the addresses are equal and its port number is smaller or
 * equal. The other endpoint is "side 2". Counters are per side: pkts1/bytes1 count the
 * packets *sent by* side 1. For IP pairs the same rule with the address only.
 *
 * ICMP/ICMPv6 (Zeek's convention, zeek-conn.md 4.3): "ports" are ICMP types.
 *  - paired types (request/reply, SHUNTD_ICMP*_PAIRED below): endpoints are
 *    (src, type) and (dst, counterpart type), ordered canonically as above;
 *  - every other type is one-way: key is (src, type, dst, code) source first, NOT
 *    canonically ordered; the sender is always side 1.
 *
 * Parsing: Ethernet, up to two VLAN tags (0x8100/0x88a8; a third tag = unparseable),
 * IPv4 (IHL >= 5, options skipped), IPv6 walking at most 6 hop-by-hop/routing/dest-opts/
 * fragment headers (anything else, e.g. AH 51 or no-next-header 59, ends the walk and is the
 * L4 protocol). Lookups: parseable TCP/UDP/ICMP/ICMPv6 -> `flows`, then ip_pairs. Other IP
 * protocols (ESP, GRE, SCTP...) are looked up in `flows` with both ports 0 (Zeek's
 * unknown_transport key (src, 0, dst, 0, proto)), then in ip_pairs. Non-first fragments and
 * packets whose L4 header (or IPv6 extension chain) is truncated or malformed match
 * ip_pairs only. A TCP packet with SYN that matches a flow entry is passed, uncounted: it opens
 * a new connection on the same ports (reuse) or repeats the handshake, and the analyser must
 * see it (IP pairs drop everything). A bad or truncated L2/L3 header is passed without any lookup.
 *
 * Clock ("map time"): nanoseconds of CLOCK_MONOTONIC at tick resolution. On the per-packet
 * path the program reads bpf_jiffies64() (a plain load, ~1 ns) and converts it with
 * shunt_config.ns_per_jiffy / clock_offset_ns, which the daemon calibrates against
 * CLOCK_MONOTONIC_COARSE (program.py: calibrate_clock(); redo it every minute or so to absorb
 * NTP slew). Until calibrated (ns_per_jiffy == 0) it falls back to bpf_ktime_get_coarse_ns()
 * (CLOCK_MONOTONIC_COARSE, ~20 ns per call here, which alone breaks the cost floor).
 * last_seen_ns and lease_expiry_ns are map time. Ring events are rare, so their ts_ns is
 * exact: bpf_ktime_get_ns(), CLOCK_MONOTONIC. If the daemon dies the conversion stays fixed
 * and jiffies keep counting, so leases still run out (fail open).
 *
 * Bytes are IP bytes (IPv4 total length; IPv6 payload length + 40), as Zeek's
 * *_ip_bytes, never frame bytes.
 */
#ifndef SHUNTD_H
#define SHUNTD_H

#define SHUNTD_LAYOUT_VERSION 3

/* Map sizes: override with -DSHUNTD_FLOWS_MAX=... etc. */
#ifndef SHUNTD_FLOWS_MAX
#define SHUNTD_FLOWS_MAX 131072
#endif
#ifndef SHUNTD_PAIRS_MAX
#define SHUNTD_PAIRS_MAX 16384
#endif
/* Ring buffer size in 4 KiB pages (power of two): 64 pages = 256 KiB. */
#ifndef SHUNTD_RING_PAGES
#define SHUNTD_RING_PAGES 64
#endif
/* TLS handshakes XDP follows at once (map `tls_watch`, LRU: a full map evicts the oldest). */
#ifndef SHUNTD_WATCH_MAX
#define SHUNTD_WATCH_MAX 16384
#endif

/* Flow map key (map `flows`): canonical bidirectional tuple. 44 bytes, no implicit
 * padding; the pad fields must be zero. */
struct flow_key {
    __u32 addr1[4];   /* side 1 address, network byte order (memory = wire bytes) */
    __u32 addr2[4];   /* side 2 address */
    __u16 port1;      /* side 1 port / ICMP type */
    __u16 port2;      /* side 2 port / ICMP counterpart type or code */
    __u8  proto;      /* IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...) */
    __u8  pad0;
    __u16 vlan_outer; /* 12-bit VID of the outer tag, 0 = untagged */
    __u16 vlan_inner; /* 12-bit VID of the inner tag (QinQ), 0 = none */
    __u16 pad1;
};

/* IP-pair map key (map `ip_pairs`): canonical address pair, any protocol. 36 bytes. */
struct pair_key {
    __u32 addr1[4];   /* smaller address (memcmp) */
    __u32 addr2[4];
    __u16 vlan_outer;
    __u16 vlan_inner;
};

/* flow_value.flags */
#define SHUNT_F_LEASE_EVENT_SENT 1
/* The entry was made by XDP itself (early shunt, see "Early shunts" below), not by the
 * daemon: its trigger is shunt_config.early_trigger. The daemon adopts it when its own
 * analyser reaches ssl_established; its first lease renewal clears the bit (an entry being
 * renewed is somebody's: never taken as an early shunt nobody adopted). */
#define SHUNT_F_EARLY 2
/* TCP history letters of dropped packets (flow entries only), as Zeek's analyser would have
 * recorded them: a packet without SYN/FIN/RST is a "data" packet (D) if it has payload, else
 * an "ack" packet (A) if it has ACK. Bit SHUNT_F_TCP_LETTERS_SHIFT + i, letter i =
 * 0 D of side 1, 1 A of side 1, 2 D of side 2, 3 A of side 2. The order in which they first
 * appeared: rank of letter i (0..3, how many letters were set before it) in the two bits at
 * SHUNT_F_TCP_RANK_SHIFT + 2 * i. */
#define SHUNT_F_TCP_LETTERS_SHIFT 8
#define SHUNT_F_TCP_RANK_SHIFT 12

/* Per-side TCP sequence tracking of a flow entry (see flow_value.tcp). 12 bytes. */
struct tcp_side {
    __u32 next;        /* highest seq + payload sent (Zeek's last_seq, without the FIN) */
    __u32 ack;         /* highest ack sent (not from RST packets) */
    __u16 next_wraps;  /* times `next` passed 2^32 since the daemon set it */
    __u16 ack_wraps;
};

/* Value of both `flows` and `ip_pairs`. Counters are updated with atomic adds, so they
 * are exact with several CPUs on one entry. 96 bytes. */
struct flow_value {
    __u64 pkts1;           /* packets sent by side 1 and dropped */
    __u64 bytes1;          /* IP bytes of those packets */
    __u64 pkts2;           /* packets sent by side 2 and dropped */
    __u64 bytes2;
    __u64 last_seen_ns;    /* map time of the last dropped packet, 0 = none */
    __u64 lease_expiry_ns; /* map time, set/renewed by the daemon; from then on: pass */
    __u64 flags;           /* SHUNT_F_* (64-bit: bcc's BPF target has 64-bit atomics only) */
    __u64 event_seq;       /* number of ring events emitted for this entry so far */
    __u32 trigger;         /* opaque tag of the daemon (why it shunted), unused in XDP */
    __u32 pad0;
    /* TCP flow entries only: each side's highest "next sequence number" (seq + payload; a
     * FIN's own slot is not counted, the FIN event brings it) and highest ack it sent, with
     * how often each wrapped past 2^32 since the daemon wrote the starting values (the
     * connection's own at shunt time). Updated as Zeek updates them: only when the value
     * moves forward (by less than 2^31). Lets the daemon bring sequence numbers
     * (orig_bytes, resp_bytes) up to date when a shunt ends. */
    struct tcp_side tcp[2];  /* [0] side 1, [1] side 2 */
};

/* shunt_event.type */
enum shunt_event_type {
    SHUNT_EVENT_NONE = 0,
    SHUNT_EVENT_TCP_FIN = 1,       /* FIN (without RST) on a shunted TCP flow; dropped */
    SHUNT_EVENT_TCP_RST = 2,       /* RST on a shunted TCP flow; dropped */
    SHUNT_EVENT_LEASE_EXPIRED = 3, /* first packet after the entry's lease ran out; passed */
    SHUNT_EVENT_EARLY = 4,         /* XDP made a flow entry itself (early shunt); the packet
                                    * that completed the handshake was passed */
};

/* shunt_event.entry: which map holds the entry that fired */
#define SHUNT_ENTRY_FLOW 1
#define SHUNT_ENTRY_PAIR 2

/* Ring-buffer record (map `events`). 88 bytes.
 * For TCP FIN/RST: key is the packet's canonical flow key (also when the entry that matched
 * is an IP pair), side is the sender's side in that key.
 * For LEASE_EXPIRED of a flow entry: key is the entry's key, side is the sender's side.
 * For LEASE_EXPIRED of a pair entry: key holds the pair (addresses, VLANs), ports and
 * proto 0, side is the sender's side in the pair.
 * For EARLY: key is the new entry's key, side/seq/ack/tcp_flags/ip_len/payload_len are those of
 * the packet on which the handshake completed (passed, not counted), event_seq is 1. */
struct shunt_event {
    __u64 ts_ns;        /* CLOCK_MONOTONIC (exact, bpf_ktime_get_ns) */
    __u8  version;      /* SHUNTD_LAYOUT_VERSION */
    __u8  type;         /* enum shunt_event_type */
    __u8  side;         /* 1 or 2 */
    __u8  tcp_flags;    /* raw TCP flags byte (FIN 0x01 SYN 0x02 RST 0x04 PSH 0x08 ACK 0x10) */
    __u8  entry;        /* SHUNT_ENTRY_FLOW / SHUNT_ENTRY_PAIR */
    __u8  pad0;
    __u16 tcp_letters;  /* TCP FIN/RST of a flow entry: bits 8..19 of the entry's flags
                         * (SHUNT_F_TCP_*) just before this packet, i.e. the history letters
                         * of the packets dropped before it, and their order */
    __u32 ip_len;       /* IP bytes of this packet */
    __u32 payload_len;  /* TCP payload bytes (ip_len - IP headers - TCP header), 0 otherwise */
    __u32 seq;          /* TCP sequence number, host order */
    __u32 ack;          /* TCP acknowledgement number, host order */
    __u32 ifindex;      /* ingress ifindex */
    __u32 event_seq;    /* per-entry counter, 1 for the entry's first event */
    struct flow_key key;
    __u32 pad2;
};

/* IP-pair prefilter (map `pair_filter`, ARRAY of __u32 counters): lets a packet that misses
 * `flows` skip the `ip_pairs` lookup unless its address pair may be shunted. The daemon adds 1
 * to slot pair_filter_slot(pair) for every entry it puts in ip_pairs and subtracts 1 when it
 * removes one (program.py: pair_filter_slot()). Slot of a pair: x = XOR of the eight native-
 * endian __u32 words of addr1 and addr2 (so order does not matter); x ^= x >> 16;
 * x *= 0x45d9f3b; x ^= x >> 16; slot = x & (SHUNTD_PAIR_FILTER_SLOTS - 1). VLANs are not in it
 * (a collision only costs one lookup). */
#ifndef SHUNTD_PAIR_FILTER_SLOTS
#define SHUNTD_PAIR_FILTER_SLOTS 65536
#endif
#define SHUNTD_PAIR_FILTER_MULT 0x45d9f3b

/* Map `clock_probe` (ARRAY, 1 entry): written by the helper program xdp_clock_probe, which
 * the daemon test-runs to read jiffies and the kernel clocks at one instant. */
struct clock_sample {
    __u64 jiffies;
    __u64 coarse_ns;  /* CLOCK_MONOTONIC_COARSE */
    __u64 mono_ns;    /* CLOCK_MONOTONIC */
};

/* shunt_config.flags */
#define SHUNT_CFG_PASS_ALL 1     /* emergency switch: pass every packet, touch no entry */
#define SHUNT_CFG_IGNORE_VLANS 2 /* build keys with vlan_outer = vlan_inner = 0 */

/* Map `config` (ARRAY, one entry at index 0). All zero = defaults. 48 bytes. */
struct shunt_config {
    __u32 flags;          /* SHUNT_CFG_* */
    __u32 pairs_active;   /* nonzero if ip_pairs may hold entries (daemon keeps it = count);
                           * zero skips pair_filter and ip_pairs altogether */
    __u32 layout_version; /* written by the daemon for tools; not read by XDP */
    __u32 ns_per_jiffy;   /* map time = jiffies * ns_per_jiffy + clock_offset_ns (mod 2^64); */
    __u64 clock_offset_ns; /* 0 = not calibrated: use bpf_ktime_get_coarse_ns() */
    /* Early shunts (below). Off while early_port == 0 or map time >= early_until_ns. */
    __u64 early_until_ns; /* map time; the daemon pushes it forward (now + lease) every
                           * lease/3: a dead-man switch, so a dead daemon stops new early
                           * shunts within one lease */
    __u64 early_lease_ns; /* lease of an entry XDP makes: lease_expiry_ns = now + this */
    __u32 early_trigger;  /* flow_value.trigger of those entries (the daemon's trigger code) */
    __u16 early_port;     /* TCP port of the TLS servers whose handshakes are followed, 0 = off */
    __u16 pad1;
};

/* Early shunts: the TLS handshake followed in XDP.
 * A policy that shunts every TLS session at ssl_established (policies/tls.py) makes every
 * late packet of a daemon that lags behind cost it CPU. With early shunts XDP starts dropping
 * at the same packet without waiting for the daemon:
 *  - arm: a TCP packet with ACK and payload, to early_port, that misses `flows`,
 *    whose payload starts a TLS handshake record holding a ClientHello (16 03 0x .. .. 01),
 *    while early shunts are on: a `tls_watch` entry (LRU) under the flow's key;
 *  - follow: each later in-order TCP payload packet of a watched flow walks the TLS record
 *    headers of its side (bounded loop) and tracks, per side, the next expected sequence
 *    number, where the next record header starts, the type of the record in progress and
 *    whether that side is encrypted, plus the version from the server's first record (a
 *    ServerHello: legacy version or supported_versions); exactly Zeek's rule for
 *    ssl_established (CCS switches a side to encrypted unless TLS 1.3; a type-23 record does
 *    in TLS 1.3; the event is raised on the packet completing the first ciphertext record
 *    once both sides are encrypted);
 *  - fire: on that packet XDP passes the packet (the analyser must see it), makes a `flows`
 *    entry (BPF_NOEXIST: counters 0, lease now + early_lease_ns, trigger early_trigger,
 *    flags SHUNT_F_EARLY, tcp[] = each side's next seq and highest ack so far), emits
 *    SHUNT_EVENT_EARLY and deletes the watch. Every later packet takes the shunted path;
 *  - give up (delete the watch, the flow stays on today's path): anything that does not
 *    follow: a sequence gap or reordering, a record header split across segments, a record
 *    that is not TLS, a version other than SSL 3.0 to TLS 1.3, an unexpected record type
 *    before the version is known, FIN or RST, a full `flows` map or ring buffer at fire
 *    time (counted in STAT_EARLY_FULL). A retransmission (only old bytes) is passed, state
 *    unchanged. Never fires before Zeek would raise ssl_established;
 *  - never again: a `tls_watch` value with client 0 (all zero) is the daemon's mark on a flow
 *    whose early shunt it ended as not TLS to its analyser: XDP arms no watch on it (so a
 *    ClientHello-shaped exchange repeated mid-stream gets no second shunt), until the LRU
 *    evicts the mark. */
struct watch_side {
    __u32 next;       /* next expected sequence number (seq + payload of the last in-order
                       * packet), host order */
    __u32 ack;        /* highest ack this side sent (forward only), on the packets XDP looks
                       * at: payload or FIN/RST (pure ACKs are not looked up, for cost) */
    __u32 rec;        /* sequence number where this side's next record header starts */
    __u8  pending;    /* content type of the record in progress, 0 none */
    __u8  encrypted;  /* 1 once this side sends ciphertext (Zeek's ENCRYPTED state) */
    __u16 pad0;
};

/* Value of map `tls_watch` (key: struct flow_key, as `flows`). 48 bytes. */
struct tls_watch {
    struct watch_side side[2];  /* [0] side 1, [1] side 2 (flow key order) */
    __u64 armed_ns;   /* map time of the ClientHello (a watch older than the lease is stale) */
    __u16 version;    /* negotiated version from the ServerHello, 0 = not seen yet */
    __u8  client;     /* side (1 or 2) that sent the ClientHello; 0: never again (above) */
    __u8  pad0;
    __u32 pad1;
};

/* Every change to `config` and `pair_filter` goes through the helper program xdp_config_op,
 * test-run (BPF_PROG_TEST_RUN) on a frame that holds one struct config_op. Several processes
 * change these maps (the workers of --workers N add and remove IP pairs, the parent calibrates
 * the clock, shuntctl sets pass-all), so user space never writes a whole entry back (a read-
 * modify-write would lose a concurrent increment or restore a stale field): counters change by
 * atomic adds, flag bits by atomic or/and, the clock fields (one writer) by plain stores of
 * those fields only. flags and pairs_active share the first 8 bytes of shunt_config and are
 * changed with 64-bit atomics on that word (the BPF target here has 64-bit atomic or/and only),
 * never with 32-bit ones, so no two atomic sizes ever meet on the same bytes. */
#define SHUNT_CONFIG_OP_PAIRS 1  /* pair_filter[slot] += delta (slot SHUNT_NO_SLOT: none);
                                  * pairs_active += delta; neither goes below zero */
#define SHUNT_CONFIG_OP_FLAGS 2  /* flags |= flags_set, then flags &= ~flags_clear */
#define SHUNT_CONFIG_OP_CLOCK 3  /* ns_per_jiffy, clock_offset_ns = the op's */
#define SHUNT_CONFIG_OP_EARLY 4  /* early_port, early_trigger, early_lease_ns, early_until_ns =
                                  * the op's (one writer: the daemon's main process) */
#define SHUNT_NO_SLOT 4294967295
/* The frame of xdp_config_op. 56 bytes. */
struct config_op {
    __u32 op;              /* SHUNT_CONFIG_OP_* */
    __u32 slot;            /* PAIRS: pair_filter slot, or SHUNT_NO_SLOT */
    __s32 delta;           /* PAIRS: change of the counters */
    __u32 flags_set;       /* FLAGS */
    __u32 flags_clear;     /* FLAGS */
    __u32 ns_per_jiffy;    /* CLOCK */
    __u64 clock_offset_ns; /* CLOCK */
    __u64 early_until_ns;  /* EARLY */
    __u64 early_lease_ns;  /* EARLY */
    __u32 early_trigger;   /* EARLY */
    __u16 early_port;      /* EARLY */
    __u16 pad0;
};

/* Map `stats` (PERCPU_ARRAY of __u64), indexed by this enum. Every packet counts in SEEN
 * and in exactly one of PASSED, DROPPED_FLOW, DROPPED_PAIR; the others are reasons/details. */
enum shunt_stat {
    STAT_SEEN = 0,
    STAT_PASSED = 1,
    STAT_DROPPED_FLOW = 2,
    STAT_DROPPED_PAIR = 3,
    STAT_NOT_IP = 4,                /* passed: ethertype not IPv4/IPv6 (ARP, LLDP, ...) */
    STAT_UNPARSEABLE = 5,           /* passed: bad/truncated L2 or L3 header */
    STAT_RINGBUF_RESERVE_FAIL = 6,  /* an event was lost: ring full */
    STAT_LEASE_EXPIRED_PASS = 7,    /* passed: entry found but its lease ran out */
    STAT_FRAG_NONFIRST = 8,         /* non-first fragment (matched against ip_pairs only) */
    STAT_L4_UNPARSEABLE = 9,        /* L3 fine, L4 header truncated/bad (ip_pairs only) */
    STAT_EVENTS = 10,               /* ring events submitted */
    STAT_PASS_ALL = 11,             /* passed by SHUNT_CFG_PASS_ALL */
    STAT_BYTES_DROPPED_FLOW = 12,   /* IP bytes */
    STAT_BYTES_DROPPED_PAIR = 13,   /* IP bytes */
    STAT_BYTES_PASSED = 14,         /* IP bytes of passed IP packets (0 for non-IP) */
    STAT_PAIR_FILTER_FALSE = 15,    /* pair_filter said "maybe", ip_pairs said no */
    STAT_EARLY_ARMED = 16,          /* ClientHello seen: a TLS handshake is followed */
    STAT_EARLY_FIRED = 17,          /* handshake complete: XDP made a flow entry (early shunt) */
    STAT_EARLY_GAVE_UP = 18,        /* a followed handshake left to the daemon (see above) */
    STAT_EARLY_FULL = 19,           /* no early shunt: `flows` map or ring buffer full */
    STAT__COUNT = 20,
};

/* ICMP request/reply pairs, as X(type, counterpart) in both directions. */
#define SHUNTD_ICMP4_PAIRED(X) \
    X(8, 0) X(0, 8) X(13, 14) X(14, 13) X(15, 16) X(16, 15) X(10, 9) X(9, 10) X(17, 18) X(18, 17)
#define SHUNTD_ICMP6_PAIRED(X) \
    X(128, 129) X(129, 128) X(133, 134) X(134, 133) X(135, 136) X(136, 135) \
    X(130, 131) X(131, 130) X(139, 140) X(140, 139) X(144, 145) X(145, 144)

#endif /* SHUNTD_H */
