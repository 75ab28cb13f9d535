/* shuntd.bpf.c: the XDP shunting program (compiled and loaded through bcc).
 *
 * Drops, in the driver, the packets of flows (map `flows`) and IP pairs (map `ip_pairs`)
 * the daemon shunted, counting them per entry and per side; passes everything else. It
 * takes no policy decision: it parses, looks up, counts, reports FIN/RST and lapsed
 * leases on the ring buffer `events`, and fails open (anything it cannot parse, any
 * entry whose lease ran out, the PASS_ALL switch -> XDP_PASS). The one decision it makes
 * itself is the early shunt of a TLS session the daemon asked for (shuntd.h, "Early
 * shunts"). Layouts and the rules for keys, sides, clock and bytes are in shuntd.h.
 *
 * Headers are read from the linear part of the frame only; TLS record headers (early
 * shunts) with bpf_xdp_load_bytes(), which also reaches the fragments. So the program is
 * safe to load with BPF_F_XDP_HAS_FRAGS (multi-buffer / jumbo frames).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "shuntd.h"

#ifndef SHUNTD_PIN_DIR
BPF_TABLE("hash", struct flow_key, struct flow_value, flows, SHUNTD_FLOWS_MAX);
BPF_TABLE("hash", struct pair_key, struct flow_value, ip_pairs, SHUNTD_PAIRS_MAX);
BPF_ARRAY(config, struct shunt_config, 1);
BPF_PERCPU_ARRAY(stats, __u64, STAT__COUNT);
BPF_ARRAY(pair_filter, __u32, SHUNTD_PAIR_FILTER_SLOTS);
#else
/* Reuse (or create and pin) the state maps under SHUNTD_PIN_DIR, so entries, counters and
 * config survive a daemon restart. events, event_layout and clock_probe are not pinned. */
BPF_TABLE_PINNED("hash", struct flow_key, struct flow_value, flows, SHUNTD_FLOWS_MAX,
                 SHUNTD_PIN_DIR "/flows");
BPF_TABLE_PINNED("hash", struct pair_key, struct flow_value, ip_pairs, SHUNTD_PAIRS_MAX,
                 SHUNTD_PIN_DIR "/ip_pairs");
BPF_TABLE_PINNED("array", int, struct shunt_config, config, 1, SHUNTD_PIN_DIR "/config");
BPF_TABLE_PINNED("percpu_array", int, __u64, stats, STAT__COUNT, SHUNTD_PIN_DIR "/stats");
BPF_TABLE_PINNED("array", int, __u32, pair_filter, SHUNTD_PAIR_FILTER_SLOTS,
                 SHUNTD_PIN_DIR "/pair_filter");
#endif
BPF_ARRAY(clock_probe, struct clock_sample, 1);
/* Early shunts (shuntd.h): TLS handshakes being followed. Not pinned: after a restart a
 * handshake in progress simply takes the daemon's path. */
BPF_TABLE("lru_hash", struct flow_key, struct tls_watch, tls_watch, SHUNTD_WATCH_MAX);
/* Where early shunts build a new watch or flow entry before the insert: on the stack they
 * would bring the program near the verifier's 512 bytes. Per CPU, private to the program. */
struct early_scratch {
    struct flow_value value;
    struct tls_watch watch;
};
BPF_PERCPU_ARRAY(early_scratch, struct early_scratch, 1);
BPF_RINGBUF_OUTPUT(events, SHUNTD_RING_PAGES);
/* Never used by the program: it only makes bcc generate the ctypes type of the ring record
 * (event_layout.Leaf) from shuntd.h, so Python has no second copy of it. */
BPF_ARRAY(event_layout, struct shunt_event, 1);
/* Likewise for the frame of xdp_config_op. */
BPF_ARRAY(config_op_layout, struct config_op, 1);

/* Map time (shuntd.h): jiffies converted with the daemon's calibration; the coarse clock
 * until there is one. -DSHUNTD_CLOCK_COARSE / -DSHUNTD_CLOCK_FINE force
 * bpf_ktime_get_coarse_ns() / bpf_ktime_get_ns() (the bench compares the three). */
static __always_inline __u64 map_now(const struct shunt_config *cfg)
{
#if defined(SHUNTD_CLOCK_FINE)
    return bpf_ktime_get_ns();
#elif defined(SHUNTD_CLOCK_COARSE)
    return bpf_ktime_get_coarse_ns();
#else
    if (cfg->ns_per_jiffy)
        return bpf_jiffies64() * cfg->ns_per_jiffy + cfg->clock_offset_ns;
    return bpf_ktime_get_coarse_ns();
#endif
}

#define IPV6_EXT_MAX 6   /* extension headers walked before giving up on L4 */
#define TCP_FLAG_FIN_BIT 0x01
#define TCP_FLAG_SYN_BIT 0x02
#define TCP_FLAG_RST_BIT 0x04
#define TCP_FLAG_ACK_BIT 0x10

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define be16_host(x) __builtin_bswap16(x)
#define be32_host(x) __builtin_bswap32(x)
#define host_be32(x) __builtin_bswap32(x)
#else
#define be16_host(x) (x)
#define be32_host(x) (x)
#define host_be32(x) (x)
#endif

/* Where parsing stands: xdp-tutorial's cursor, every header bounds-checked once. */
struct hdr_cursor {
    void *pos;
    void *end;
    void *start;       /* frame start, for the wire-length check of the IP length */
    struct xdp_md *ctx;
};

/* F1: Zeek drops a packet whose wire length is below its IP length (truncated_IP_len)
 * before any connection exists: such a frame is unparseable, never counted into a flow. */
static __always_inline int beyond_wire(struct hdr_cursor *c, __u32 ip_len)
{
    __u32 l3_off = (__u32)(c->pos - c->start);
    __u32 linear = (__u32)(c->end - c->start);
    if (ip_len <= linear - l3_off)
        return 0;   /* the usual case: the whole packet is in the linear part, no helper call */
    /* Multi-buffer (jumbo) frames carry the rest in fragments: ask for the whole length. */
    __u32 wire_len = (__u32)bpf_xdp_get_buff_len(c->ctx);
    return l3_off > wire_len || ip_len > wire_len - l3_off;
}

struct vlan_tag {
    __be16 tci;
    __be16 proto;
};

struct ext_hdr {
    __u8 nexthdr;
    __u8 hdrlen;
};

struct frag6_hdr {
    __u8 nexthdr;
    __u8 reserved;
    __be16 frag_off;
    __be32 id;
};

/* What the parse found, in the form the lookups need. */
struct pkt_info {
    __u32 src[4];
    __u32 dst[4];
    __u16 sport;
    __u16 dport;
    __u16 vlan_outer;
    __u16 vlan_inner;
    __u32 ip_len;      /* IP bytes */
    __u32 l3_hdr_len;  /* IP header + IPv6 extension headers */
    __u32 l3_off;      /* frame offset of the IP header */
    __u32 seq;
    __u32 ack;
    __u16 tcp_hdr_len;
    __u8 proto;        /* L4 protocol (after IPv6 extension headers) */
    __u8 tcp_flags;
    __u8 one_way;      /* ICMP one-way type: key is source-first, not canonical */
};

/* Parse outcome for L3/L4. */
enum l4_state {
    L4_OK = 0,         /* flow key usable */
    L4_NONFIRST = 1,   /* non-first fragment: ip_pairs only */
    L4_BAD = 2,        /* truncated/malformed L4 or extension chain: ip_pairs only */
};

static __always_inline void stat_add(__u32 idx, __u64 n)
{
    __u64 *c = stats.lookup(&idx);
    if (c)
        *c += n;
}

/* Ethernet + up to two VLAN tags (0x8100 / 0x88a8). Returns the ethertype (network order)
 * or 0 if the L2 header is truncated or carries a third tag. */
static __always_inline __be16 parse_eth(struct hdr_cursor *c, struct pkt_info *p)
{
    struct ethhdr *eth = c->pos;
    if ((void *)(eth + 1) > c->end)
        return 0;
    c->pos = eth + 1;
    __be16 proto = eth->h_proto;

#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD)) {
            p->l3_off = sizeof(*eth) + i * sizeof(struct vlan_tag);
            return proto;
        }
        struct vlan_tag *vt = c->pos;
        if ((void *)(vt + 1) > c->end)
            return 0;
        __u16 vid = be16_host(vt->tci) & 0x0fff;
        if (i == 0)
            p->vlan_outer = vid;
        else
            p->vlan_inner = vid;
        proto = vt->proto;
        c->pos = vt + 1;
    }
    if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD))
        return 0;
    p->l3_off = sizeof(*eth) + 2 * sizeof(struct vlan_tag);
    return proto;
}

/* IPv4 with options. Returns <0 if the header is unusable, else an l4_state. */
static __always_inline int parse_ipv4(struct hdr_cursor *c, struct pkt_info *p)
{
    struct iphdr *ip = c->pos;
    if ((void *)(ip + 1) > c->end)
        return -1;
    if (ip->version != 4 || ip->ihl < 5)
        return -1;
    __u32 hl = ip->ihl * 4;
    if (c->pos + hl > c->end)
        return -1;
    __u32 tot = be16_host(ip->tot_len);
    if (tot < hl || beyond_wire(c, tot))
        return -1;
    p->src[2] = host_be32(0x0000ffff);
    p->src[3] = ip->saddr;
    p->dst[2] = host_be32(0x0000ffff);
    p->dst[3] = ip->daddr;
    p->ip_len = tot;
    p->l3_hdr_len = hl;
    p->proto = ip->protocol;
    c->pos += hl;
    if (be16_host(ip->frag_off) & 0x1fff)
        return L4_NONFIRST;
    return L4_OK;
}

/* IPv6 and its extension headers (hop-by-hop, routing, dest-opts, fragment), bounded. */
static __always_inline int parse_ipv6(struct hdr_cursor *c, struct pkt_info *p)
{
    struct ipv6hdr *ip6 = c->pos;
    if ((void *)(ip6 + 1) > c->end)
        return -1;
    if (ip6->version != 6)
        return -1;
    __builtin_memcpy(p->src, &ip6->saddr, 16);
    __builtin_memcpy(p->dst, &ip6->daddr, 16);
    p->ip_len = (__u32)be16_host(ip6->payload_len) + 40;
    if (beyond_wire(c, p->ip_len))
        return -1;
    __u32 hl = 40;
    __u8 nexthdr = ip6->nexthdr;
    c->pos = ip6 + 1;

#pragma unroll
    for (int i = 0; i < IPV6_EXT_MAX; i++) {
        if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
            nexthdr == IPPROTO_DSTOPTS) {
            struct ext_hdr *eh = c->pos;
            if ((void *)(eh + 1) > c->end)
                goto bad;
            __u32 len = ((__u32)eh->hdrlen + 1) * 8;
            nexthdr = eh->nexthdr;
            c->pos += len;
            hl += len;
        } else if (nexthdr == IPPROTO_FRAGMENT) {
            struct frag6_hdr *fh = c->pos;
            if ((void *)(fh + 1) > c->end)
                goto bad;
            nexthdr = fh->nexthdr;
            c->pos = fh + 1;
            hl += sizeof(*fh);
            p->proto = nexthdr;
            p->l3_hdr_len = hl;
            if (be16_host(fh->frag_off) & 0xfff8)
                return L4_NONFIRST;
        } else {
            p->proto = nexthdr;
            p->l3_hdr_len = hl;
            return L4_OK;
        }
    }
bad:
    p->proto = nexthdr;
    p->l3_hdr_len = hl;
    return L4_BAD;
}

/* Zeek's ICMP counterpart table (shuntd.h); -1 if the type is one-way. */
#define ICMP_CASE(t, cp) case t: return cp;
static __always_inline int icmp4_counterpart(__u8 type)
{
    switch (type) {
    SHUNTD_ICMP4_PAIRED(ICMP_CASE)
    default:
        return -1;
    }
}

static __always_inline int icmp6_counterpart(__u8 type)
{
    switch (type) {
    SHUNTD_ICMP6_PAIRED(ICMP_CASE)
    default:
        return -1;
    }
}

/* TCP, UDP, ICMP, ICMPv6 ports (ICMP types per Zeek); other protocols get ports 0. */
static __always_inline int parse_l4(struct hdr_cursor *c, struct pkt_info *p)
{
    if (p->proto == IPPROTO_TCP) {
        struct tcphdr *th = c->pos;
        if ((void *)(th + 1) > c->end || p->ip_len < p->l3_hdr_len + sizeof(*th))
            return L4_BAD;   /* F1: the IP length must hold the header, not just padding */
        if (th->doff < 5)
            return L4_BAD;
        p->sport = be16_host(th->source);
        p->dport = be16_host(th->dest);
        p->seq = be32_host(th->seq);
        p->ack = be32_host(th->ack_seq);
        p->tcp_flags = ((__u8 *)th)[13];
        p->tcp_hdr_len = th->doff * 4;
        return L4_OK;
    }
    if (p->proto == IPPROTO_UDP) {
        struct udphdr *uh = c->pos;
        if ((void *)(uh + 1) > c->end || p->ip_len < p->l3_hdr_len + sizeof(*uh))
            return L4_BAD;
        p->sport = be16_host(uh->source);
        p->dport = be16_host(uh->dest);
        return L4_OK;
    }
    if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) {
        __u8 *ih = c->pos;
        /* F1: Zeek needs the whole 8-byte ICMP header (truncated_header, no connection) */
        if ((void *)(ih + 8) > c->end || p->ip_len < p->l3_hdr_len + 8)
            return L4_BAD;
        __u8 type = ih[0];
        int cp = p->proto == IPPROTO_ICMP ? icmp4_counterpart(type) : icmp6_counterpart(type);
        p->sport = type;
        if (cp < 0) {
            p->dport = ih[1];
            p->one_way = 1;
        } else {
            p->dport = cp;
        }
        return L4_OK;
    }
    /* Any other IP protocol: Zeek's unknown_transport key (src, 0, dst, 0, proto). */
    return L4_OK;
}

/* memcmp order of two network-order addresses: <0, 0, >0. */
static __always_inline int addr_cmp(const __u32 *a, const __u32 *b)
{
#pragma unroll
    for (int i = 0; i < 4; i++) {
        __u32 x = be32_host(a[i]);
        __u32 y = be32_host(b[i]);
        if (x != y)
            return x < y ? -1 : 1;
    }
    return 0;
}

/* Slot of an address pair in pair_filter (rule in shuntd.h). */
static __always_inline __u32 pair_filter_slot(const __u32 *a, const __u32 *b)
{
    __u32 x = a[0] ^ a[1] ^ a[2] ^ a[3] ^ b[0] ^ b[1] ^ b[2] ^ b[3];
    x ^= x >> 16;
    x *= SHUNTD_PAIR_FILTER_MULT;
    x ^= x >> 16;
    return x & (SHUNTD_PAIR_FILTER_SLOTS - 1);
}

/* Fills the canonical flow key; returns the sender's side (1 or 2). */
static __always_inline __u8 make_flow_key(struct flow_key *k, const struct pkt_info *p,
                                          int acmp)
{
    int swap = 0;
    if (!p->one_way)
        swap = acmp > 0 || (acmp == 0 && p->sport > p->dport);
    if (swap) {
        __builtin_memcpy(k->addr1, p->dst, 16);
        __builtin_memcpy(k->addr2, p->src, 16);
        k->port1 = p->dport;
        k->port2 = p->sport;
    } else {
        __builtin_memcpy(k->addr1, p->src, 16);
        __builtin_memcpy(k->addr2, p->dst, 16);
        k->port1 = p->sport;
        k->port2 = p->dport;
    }
    k->proto = p->proto;
    k->pad0 = 0;
    k->vlan_outer = p->vlan_outer;
    k->vlan_inner = p->vlan_inner;
    k->pad1 = 0;
    return swap ? 2 : 1;
}

/* TCP payload bytes of the packet (0 for other protocols). */
static __always_inline __u32 tcp_payload(const struct pkt_info *p)
{
    __u32 hdrs = p->l3_hdr_len + p->tcp_hdr_len;
    return (p->proto == IPPROTO_TCP && p->ip_len > hdrs) ? p->ip_len - hdrs : 0;
}

/* TCP bookkeeping of a dropped packet of a flow entry (shuntd.h: SHUNT_F_TCP_*, flow_value.tcp):
 * the history letter it would have given (first time only: two atomics, at most four
 * times per entry), and its sequence/ack numbers (plain loads and stores on the entry's
 * line; a race between CPUs on one flow can only lose a step forward, never count a wrap
 * twice in practice). */
static __always_inline void tcp_track(struct flow_value *v, __u8 side,
                                      const struct pkt_info *p)
{
    __u8 f = p->tcp_flags;
    __u32 payload = tcp_payload(p);
    if (!(f & (TCP_FLAG_SYN_BIT | TCP_FLAG_FIN_BIT | TCP_FLAG_RST_BIT)) &&
        (payload || (f & TCP_FLAG_ACK_BIT))) {
        __u32 idx = (side == 1 ? 0 : 2) + (payload ? 0 : 1);
        __u64 bit = 1ULL << (SHUNT_F_TCP_LETTERS_SHIFT + idx);
        if (!(v->flags & bit)) {
            __u64 old = __sync_fetch_and_or(&v->flags, bit);
            if (!(old & bit)) {
                __u64 seen = old >> SHUNT_F_TCP_LETTERS_SHIFT;
                __u64 rank = (seen & 1) + ((seen >> 1) & 1) + ((seen >> 2) & 1) +
                             ((seen >> 3) & 1);
                __sync_fetch_and_or(&v->flags, rank << (SHUNT_F_TCP_RANK_SHIFT + 2 * idx));
            }
        }
    }
    /* Zeek's UpdateSeq/UpdateAckSeq, forward only; a FIN's sequence slot is left to the FIN
     * event (the analyser counts it only when it sees the FIN). */
    struct tcp_side *t = &v->tcp[side == 1 ? 0 : 1];
    __u32 next = (f & TCP_FLAG_RST_BIT) ? p->seq : p->seq + payload;
    __u32 cur = t->next;
    if ((__s32)(next - cur) > 0) {
        if (next < cur)
            t->next_wraps++;
        t->next = next;
    }
    if ((f & (TCP_FLAG_ACK_BIT | TCP_FLAG_RST_BIT)) == TCP_FLAG_ACK_BIT) {
        __u32 ack = t->ack;
        if ((__s32)(p->ack - ack) > 0) {
            if (p->ack < ack)
                t->ack_wraps++;
            t->ack = p->ack;
        }
    }
}

/* Every field of a reserved ring record (shuntd.h, struct shunt_event). */
static __always_inline void fill_event(struct shunt_event *e, struct xdp_md *ctx, __u8 type,
                                       __u8 entry, __u8 side, __u16 letters, __u32 seq,
                                       const struct flow_key *key, const struct pkt_info *p)
{
    e->ts_ns = bpf_ktime_get_ns();
    e->version = SHUNTD_LAYOUT_VERSION;
    e->type = type;
    e->side = side;
    e->tcp_flags = p->tcp_flags;
    e->entry = entry;
    e->pad0 = 0;
    e->tcp_letters = letters;
    e->ip_len = p->ip_len;
    e->payload_len = tcp_payload(p);
    e->seq = p->seq;
    e->ack = p->ack;
    e->ifindex = ctx->ingress_ifindex;
    e->event_seq = seq;
    __builtin_memcpy(&e->key, key, sizeof(struct flow_key));
    e->pad2 = 0;
}

static __always_inline void emit_event(struct xdp_md *ctx, struct flow_value *v, __u8 type,
                                       __u8 entry, __u8 side, const struct flow_key *key,
                                       const struct pkt_info *p)
{
    __u32 seq = (__u32)(__sync_fetch_and_add(&v->event_seq, 1) + 1);
    struct shunt_event *e = events.ringbuf_reserve(sizeof(struct shunt_event));
    if (!e) {
        stat_add(STAT_RINGBUF_RESERVE_FAIL, 1);
        return;
    }
    fill_event(e, ctx, type, entry, side,
               (__u16)(v->flags >> SHUNT_F_TCP_LETTERS_SHIFT) & 0xfff, seq, key, p);
    events.ringbuf_submit(e, 0);
    stat_add(STAT_EVENTS, 1);
}

static __always_inline int pass(const struct pkt_info *p)
{
    stat_add(STAT_PASSED, 1);
    stat_add(STAT_BYTES_PASSED, p->ip_len);
    return XDP_PASS;
}

/* A packet of a shunted entry: drop and count it, unless the lease ran out (fail open). */
static __always_inline int on_hit(struct xdp_md *ctx, const struct shunt_config *cfg,
                                  struct flow_value *v, __u8 entry,
                                  __u8 side, const struct flow_key *key,
                                  const struct flow_key *flow_key, __u8 flow_side,
                                  int tcp_close, const struct pkt_info *p)
{
    __u64 now = map_now(cfg);
    if (now >= v->lease_expiry_ns) {
        if (!(v->flags & SHUNT_F_LEASE_EVENT_SENT)) {
            __u64 old = __sync_fetch_and_or(&v->flags, SHUNT_F_LEASE_EVENT_SENT);
            if (!(old & SHUNT_F_LEASE_EVENT_SENT))
                emit_event(ctx, v, SHUNT_EVENT_LEASE_EXPIRED, entry, side, key, p);
        }
        stat_add(STAT_LEASE_EXPIRED_PASS, 1);
        return pass(p);
    }
    if (side == 1) {
        __sync_fetch_and_add(&v->pkts1, 1);
        __sync_fetch_and_add(&v->bytes1, p->ip_len);
    } else {
        __sync_fetch_and_add(&v->pkts2, 1);
        __sync_fetch_and_add(&v->bytes2, p->ip_len);
    }
    if (v->last_seen_ns != now)
        v->last_seen_ns = now;
    if (entry == SHUNT_ENTRY_FLOW && p->proto == IPPROTO_TCP)
        tcp_track(v, side, p);
    if (tcp_close) {
        __u8 type = (p->tcp_flags & TCP_FLAG_RST_BIT) ? SHUNT_EVENT_TCP_RST : SHUNT_EVENT_TCP_FIN;
        emit_event(ctx, v, type, entry, flow_side, flow_key, p);
    }
    if (entry == SHUNT_ENTRY_FLOW) {
        stat_add(STAT_DROPPED_FLOW, 1);
        stat_add(STAT_BYTES_DROPPED_FLOW, p->ip_len);
    } else {
        stat_add(STAT_DROPPED_PAIR, 1);
        stat_add(STAT_BYTES_DROPPED_PAIR, p->ip_len);
    }
    return XDP_DROP;
}

/* ---------------------------------------------------------------------------------------
 * Early shunts (shuntd.h, "Early shunts"): XDP follows the TLS handshake of a flow that misses
 * `flows` on cfg->early_port and makes the flow entry itself on the packet on which Zeek's
 * analyser raises ssl_established. Only TCP packets with payload (or FIN/RST) to or from that
 * port look at `tls_watch`; payload bytes are read with bpf_xdp_load_bytes() (any offset, also
 * in the fragments of a multi-buffer frame), always bounded by the payload length the IP
 * header gives (never the Ethernet padding).
 */
#define TLS_CT_CCS 20
#define TLS_CT_ALERT 21
#define TLS_CT_HANDSHAKE 22
#define TLS_CT_APPDATA 23
#define TLS_HS_SERVER_HELLO 2
#define TLS_EXT_SUPPORTED_VERSIONS 43
#define TLS_V13 0x0304
#define TLS_MAX_RECORD_LEN 18432   /* 2^14 + 2048: RFC 5246 ciphertext limit */
#define TLS_MAX_RECORDS 16         /* record headers walked in one packet */
#define TLS_MAX_EXTENSIONS 16      /* ServerHello extensions walked for supported_versions */
#define ERR_EXIST 17               /* EEXIST: the flow entry is already there */

/* What one packet did to a watch. */
enum watch_step {
    WATCH_GO_ON = 0,    /* in order, state updated: keep following */
    WATCH_OLD = 1,      /* only old bytes (retransmission) or a SYN: state unchanged */
    WATCH_GIVE_UP = 2,  /* leave the flow to the daemon */
    WATCH_FIRE = 3,     /* this packet completes Zeek's ssl_established record */
};

static __always_inline __u32 be16_at(const __u8 *b)
{
    return ((__u32)b[0] << 8) | b[1];
}

/* The payload starts a handshake record holding a ClientHello: 16 03 0x .. .. 01. */
static __always_inline int starts_client_hello(struct xdp_md *ctx, __u32 base, __u32 n)
{
    __u8 h[6];
    if (n < sizeof(h) || bpf_xdp_load_bytes(ctx, base, h, sizeof(h)))
        return 0;
    return h[0] == TLS_CT_HANDSHAKE && h[1] == 3 && h[2] <= 3 && h[5] == 1;
}

/* Negotiated version from the ServerHello at the start of the payload (`base`, `n` bytes):
 * supported_versions (43) if present, else the legacy version, as tls.py and Zeek's sticky
 * set_version(). 0 if it is not a ServerHello wholly in this packet up to that extension, is
 * malformed, or names a version other than SSL 3.0 .. TLS 1.3. */
static __always_inline __u16 server_hello_version(struct xdp_md *ctx, __u32 base, __u32 n)
{
    /* record header (5), handshake header (4), legacy_version (2) */
    __u8 h[11];
    if (n < 44 || bpf_xdp_load_bytes(ctx, base, h, sizeof(h)))
        return 0;
    if (h[0] != TLS_CT_HANDSHAKE || h[5] != TLS_HS_SERVER_HELLO || h[6] != 0)
        return 0;
    __u32 hs_len = be16_at(h + 7);
    if (hs_len + 4 > be16_at(h + 3))
        return 0;                   /* the ServerHello continues in another record */
    __u32 end = 9 + hs_len;         /* offsets below are relative to base */
    __u32 version = be16_at(h + 9);
    __u8 sid_len;
    if (bpf_xdp_load_bytes(ctx, base + 43, &sid_len, 1) || sid_len > 32)
        return 0;
    __u32 pos = 44 + sid_len + 3;   /* session id, cipher suite, compression method */
    if (pos > end)
        return 0;
    if (pos + 2 <= end) {           /* extensions */
        __u8 e[4];
        if (pos + 2 > n || bpf_xdp_load_bytes(ctx, base + pos, e, 2))
            return 0;
        __u32 ext_end = pos + 2 + be16_at(e);
        if (ext_end > end)
            return 0;
        pos += 2;
        int i;
        for (i = 0; i < TLS_MAX_EXTENSIONS; i++) {
            if (pos + 4 > ext_end)
                break;              /* walked them all: no supported_versions */
            if (pos + 4 > n || bpf_xdp_load_bytes(ctx, base + pos, e, 4))
                return 0;
            __u32 type = be16_at(e);
            __u32 len = be16_at(e + 2);
            pos += 4;
            if (pos + len > ext_end)
                return 0;
            if (type == TLS_EXT_SUPPORTED_VERSIONS) {
                if (len != 2 || pos + 2 > n || bpf_xdp_load_bytes(ctx, base + pos, e, 2))
                    return 0;
                version = be16_at(e);
                break;
            }
            pos += len;
        }
        if (i == TLS_MAX_EXTENSIONS)
            return 0;
    }
    if (version == TLS_V13 || (version >= 0x0300 && version <= 0x0303))
        return (__u16)version;
    return 0;
}

/* Zeek's rule for a record of type t that just completed on side `me`: CCS switches a side
 * to encrypted unless TLS 1.3 (and is not ciphertext itself); in TLS 1.3 a type-23 record
 * in a clear side does and is ciphertext; every record of an encrypted side is. Returns 1
 * for a ciphertext record while the peer is encrypted too: ssl_established. */
static __always_inline int record_done(const struct tls_watch *w, struct watch_side *me,
                                       const struct watch_side *peer, __u8 t)
{
    if (!me->encrypted) {
        if (t == TLS_CT_CCS) {
            if (w->version && w->version != TLS_V13)
                me->encrypted = 1;
            return 0;
        }
        if (t != TLS_CT_APPDATA || w->version != TLS_V13)
            return 0;
        me->encrypted = 1;
    }
    return peer->encrypted;
}

/* One TCP packet of a watched flow, sent by `side`, payload at frame offset `base`, `n`
 * bytes: the condition of shuntd.h step by step (EARLY_SHUNT.md §2). */
static __always_inline int watch_follow(struct xdp_md *ctx, struct tls_watch *w, __u8 side,
                                        const struct pkt_info *p, __u32 base, __u32 n)
{
    struct watch_side *me = side == 1 ? &w->side[0] : &w->side[1];
    struct watch_side *peer = side == 1 ? &w->side[1] : &w->side[0];
    __u8 f = p->tcp_flags;
    if (f & (TCP_FLAG_FIN_BIT | TCP_FLAG_RST_BIT))
        return WATCH_GIVE_UP;
    if ((f & TCP_FLAG_ACK_BIT) && (__s32)(p->ack - me->ack) > 0)
        me->ack = p->ack;
    if ((f & TCP_FLAG_SYN_BIT) || !n)
        return WATCH_OLD;
    if (p->seq != me->next) {
        if ((__s32)(me->next - (p->seq + n)) >= 0)
            return WATCH_OLD;       /* retransmission: bytes the walk has seen already */
        return WATCH_GIVE_UP;       /* a gap or reordering */
    }
    me->next = p->seq + n;
    if (side != w->client && !w->version) {
        /* The server's first record must be a ServerHello that starts this packet. */
        if (me->rec != p->seq)
            return WATCH_GIVE_UP;
        w->version = server_hello_version(ctx, base, n);
        if (!w->version)
            return WATCH_GIVE_UP;
    }
    /* One more round than headers: the last header's record may complete here too. */
    for (int i = 0; i <= TLS_MAX_RECORDS; i++) {
        __u32 off = me->rec - p->seq;
        if (me->pending) {
            if (off > n)
                return WATCH_GO_ON; /* the record in progress continues in a later packet */
            __u8 t = me->pending;
            me->pending = 0;
            if (record_done(w, me, peer, t))
                return WATCH_FIRE;
        }
        if (off >= n)
            return WATCH_GO_ON;
        if (off + 5 > n || i == TLS_MAX_RECORDS)
            return WATCH_GIVE_UP;   /* header split across segments, or too many records */
        __u8 h[5];
        if (bpf_xdp_load_bytes(ctx, base + off, h, sizeof(h)))
            return WATCH_GIVE_UP;
        __u32 len = be16_at(h + 3);
        if (h[0] < TLS_CT_CCS || h[0] > TLS_CT_APPDATA || h[1] != 3 || h[2] > 3 ||
            len > TLS_MAX_RECORD_LEN)
            return WATCH_GIVE_UP;   /* not TLS */
        if (!w->version && h[0] != TLS_CT_ALERT && h[0] != TLS_CT_HANDSHAKE)
            return WATCH_GIVE_UP;   /* e.g. 0-RTT data: safe to leave, never early */
        me->pending = h[0];
        me->rec += 5 + len;
    }
    return WATCH_GIVE_UP;
}

/* ssl_established in XDP: make the flow entry (BPF_NOEXIST) and tell the daemon. The ring
 * record is reserved first, so a full ring or a full map leaves no trace (fail open).
 * Returns 0 if the flow is shunted now. */
static __always_inline int early_fire(struct xdp_md *ctx, const struct shunt_config *cfg,
                                      const struct tls_watch *w, const struct flow_key *fk,
                                      __u8 side, const struct pkt_info *p, __u64 now)
{
    struct shunt_event *e = events.ringbuf_reserve(sizeof(struct shunt_event));
    if (!e) {
        stat_add(STAT_RINGBUF_RESERVE_FAIL, 1);
        stat_add(STAT_EARLY_FULL, 1);
        return -1;
    }
    __u32 zero = 0;
    struct early_scratch *scratch = early_scratch.lookup(&zero);
    if (!scratch) {
        events.ringbuf_discard(e, 0);
        return -1;
    }
    struct flow_value *v = &scratch->value;
    __builtin_memset(v, 0, sizeof(*v));
    v->lease_expiry_ns = now + cfg->early_lease_ns;
    v->flags = SHUNT_F_EARLY;
    v->event_seq = 1;
    v->trigger = cfg->early_trigger;
    v->tcp[0].next = w->side[0].next;
    v->tcp[0].ack = w->side[0].ack;
    v->tcp[1].next = w->side[1].next;
    v->tcp[1].ack = w->side[1].ack;
    /* complete before the insert: a packet on another CPU may hit the entry at once */
    int err = flows.insert(fk, v);
    if (err) {
        events.ringbuf_discard(e, 0);
        /* EEXIST: the daemon's own shunt landed first */
        stat_add(err == -ERR_EXIST ? STAT_EARLY_GAVE_UP : STAT_EARLY_FULL, 1);
        return -1;
    }
    fill_event(e, ctx, SHUNT_EVENT_EARLY, SHUNT_ENTRY_FLOW, side, 0, 1, fk, p);
    events.ringbuf_submit(e, 0);
    stat_add(STAT_EVENTS, 1);
    stat_add(STAT_EARLY_FIRED, 1);
    return 0;
}

/* Arm a watch on a ClientHello: the client's stream starts at this packet, the server's at
 * the ack (its ISN + 1). The packet itself is then walked like any other. */
static __always_inline struct tls_watch *early_arm(const struct flow_key *fk, __u8 side,
                                                   const struct pkt_info *p, __u64 now)
{
    __u32 zero = 0;
    struct early_scratch *scratch = early_scratch.lookup(&zero);
    if (!scratch)
        return 0;
    struct tls_watch *nw = &scratch->watch;
    __builtin_memset(nw, 0, sizeof(*nw));
    struct watch_side *me = side == 1 ? &nw->side[0] : &nw->side[1];
    struct watch_side *peer = side == 1 ? &nw->side[1] : &nw->side[0];
    me->next = p->seq;
    me->rec = p->seq;
    me->ack = p->ack;
    peer->next = p->ack;
    peer->rec = p->ack;
    peer->ack = p->seq;
    nw->armed_ns = now;
    nw->client = side;
    if (tls_watch.update(fk, nw))
        return 0;
    stat_add(STAT_EARLY_ARMED, 1);
    return tls_watch.lookup(fk);
}

/* Early shunt step of a packet that missed `flows` and is passed: arm or follow a watch.
 * Everything but TCP with payload (or FIN/RST) on early_port returns after a few compares. */
static __always_inline void early_step(struct xdp_md *ctx, const struct shunt_config *cfg,
                                       const struct flow_key *fk, __u8 side,
                                       const struct pkt_info *p, __u32 base)
{
    __u16 port = cfg->early_port;
    if (!port || p->proto != IPPROTO_TCP || (p->sport != port && p->dport != port))
        return;
    __u32 n = tcp_payload(p);
    if (!n && !(p->tcp_flags & (TCP_FLAG_FIN_BIT | TCP_FLAG_RST_BIT)))
        return;
    struct tls_watch *w = tls_watch.lookup(fk);
    __u64 now;
    if (w && !w->client)
        return;     /* the daemon ended an early shunt of it as not TLS: never again */
    if (!w) {
        /* A ClientHello is sent TO the port: the analyser needs it from the originator (a
         * ClientHello from the port's side is never followed to an ssl_established). */
        if (!n || p->dport != port || !(p->tcp_flags & TCP_FLAG_ACK_BIT) ||
            !starts_client_hello(ctx, base, n))
            return;
        now = map_now(cfg);
        if (now >= cfg->early_until_ns)
            return;
        w = early_arm(fk, side, p, now);
        if (!w)
            return;
    } else {
        now = map_now(cfg);
    }
    int step = WATCH_GIVE_UP;
    /* stale (older than a lease; signed: a clock recalibration may step back a tick) or
     * early shunts switched off by the dead-man switch */
    if ((__s64)(now - w->armed_ns) <= (__s64)cfg->early_lease_ns && now < cfg->early_until_ns)
        step = watch_follow(ctx, w, side, p, base, n);
    if (step == WATCH_GO_ON || step == WATCH_OLD)
        return;
    if (step == WATCH_FIRE && early_fire(ctx, cfg, w, fk, side, p, now) == 0) {
        tls_watch.delete(fk);
        return;
    }
    if (step != WATCH_FIRE)
        stat_add(STAT_EARLY_GAVE_UP, 1);
    tls_watch.delete(fk);
}

int xdp_shunt(struct xdp_md *ctx)
{
    struct hdr_cursor c = {
        .pos = (void *)(long)ctx->data,
        .end = (void *)(long)ctx->data_end,
        .start = (void *)(long)ctx->data,
        .ctx = ctx,
    };
    struct pkt_info p;
    __builtin_memset(&p, 0, sizeof(p));
    __u32 zero = 0;

    stat_add(STAT_SEEN, 1);
    struct shunt_config *cfg = config.lookup(&zero);
    if (!cfg)
        return XDP_PASS;
    if (cfg->flags & SHUNT_CFG_PASS_ALL) {
        stat_add(STAT_PASS_ALL, 1);
        return pass(&p);
    }

    __be16 ethertype = parse_eth(&c, &p);
    int l4;
    if (ethertype == bpf_htons(ETH_P_IP)) {
        l4 = parse_ipv4(&c, &p);
    } else if (ethertype == bpf_htons(ETH_P_IPV6)) {
        l4 = parse_ipv6(&c, &p);
    } else {
        stat_add(ethertype ? STAT_NOT_IP : STAT_UNPARSEABLE, 1);
        return pass(&p);
    }
    if (l4 < 0) {
        stat_add(STAT_UNPARSEABLE, 1);
        p.ip_len = 0;
        return pass(&p);
    }
    if (l4 == L4_OK)
        l4 = parse_l4(&c, &p);
    if (l4 == L4_NONFIRST)
        stat_add(STAT_FRAG_NONFIRST, 1);
    else if (l4 == L4_BAD)
        stat_add(STAT_L4_UNPARSEABLE, 1);

    if (cfg->flags & SHUNT_CFG_IGNORE_VLANS) {
        p.vlan_outer = 0;
        p.vlan_inner = 0;
    }

    int acmp = addr_cmp(p.src, p.dst);
    struct flow_key fk;
    __u8 fside = 0;
    if (l4 == L4_OK) {
        fside = make_flow_key(&fk, &p, acmp);
        struct flow_value *v = flows.lookup(&fk);
        if (v) {
            if (p.proto == IPPROTO_TCP && (p.tcp_flags & TCP_FLAG_SYN_BIT))
                return pass(&p);   /* a new connection on the same ports, or a handshake */
            int close = p.proto == IPPROTO_TCP &&
                        (p.tcp_flags & (TCP_FLAG_FIN_BIT | TCP_FLAG_RST_BIT));
            return on_hit(ctx, cfg, v, SHUNT_ENTRY_FLOW, fside, &fk, &fk, fside, close, &p);
        }
    } else {
        __builtin_memset(&fk, 0, sizeof(fk));
    }
    if (!cfg->pairs_active)
        goto miss;

    __u32 slot = pair_filter_slot(p.src, p.dst);
    __u32 *maybe = pair_filter.lookup(&slot);
    if (!maybe || !*maybe)
        goto miss;

    struct pair_key pk;
    __u8 pside = acmp > 0 ? 2 : 1;
    if (acmp > 0) {
        __builtin_memcpy(pk.addr1, p.dst, 16);
        __builtin_memcpy(pk.addr2, p.src, 16);
    } else {
        __builtin_memcpy(pk.addr1, p.src, 16);
        __builtin_memcpy(pk.addr2, p.dst, 16);
    }
    pk.vlan_outer = p.vlan_outer;
    pk.vlan_inner = p.vlan_inner;
    struct flow_value *pv = ip_pairs.lookup(&pk);
    if (!pv) {
        stat_add(STAT_PAIR_FILTER_FALSE, 1);
        goto miss;
    }

    /* The record of a pair's lapsed lease carries the pair in flow_key form. */
    struct flow_key pairk;
    __builtin_memset(&pairk, 0, sizeof(pairk));
    __builtin_memcpy(pairk.addr1, pk.addr1, 16);
    __builtin_memcpy(pairk.addr2, pk.addr2, 16);
    pairk.vlan_outer = pk.vlan_outer;
    pairk.vlan_inner = pk.vlan_inner;
    int close = l4 == L4_OK && p.proto == IPPROTO_TCP &&
                (p.tcp_flags & (TCP_FLAG_FIN_BIT | TCP_FLAG_RST_BIT));
    return on_hit(ctx, cfg, pv, SHUNT_ENTRY_PAIR, pside, &pairk, &fk, fside, close, &p);

miss:
    /* No entry: passed. Early shunts may follow it (a few compares unless TCP with payload
     * on early_port). */
    if (l4 == L4_OK)
        early_step(ctx, cfg, &fk, fside, &p, p.l3_off + p.l3_hdr_len + p.tcp_hdr_len);
    return pass(&p);
}

/* Helper program, never attached: the daemon test-runs it to sample jiffies and the kernel
 * clocks together (program.py: calibrate_clock()). */
int xdp_clock_probe(struct xdp_md *ctx)
{
    __u32 zero = 0;
    struct clock_sample *s = clock_probe.lookup(&zero);
    if (s) {
        s->coarse_ns = bpf_ktime_get_coarse_ns();
        s->jiffies = bpf_jiffies64();
        s->mono_ns = bpf_ktime_get_ns();
    }
    return XDP_PASS;
}

/* The word of shunt_config holding flags and pairs_active (shuntd.h: 64-bit atomics only). */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define CFG_FLAGS_SHIFT 0
/* pairs_active is the high half: add delta * 2^32 (a borrow leaves the word, not flags) */
#define CFG_PAIRS_ADDEND(d) ((__u64)(__u32)(d) << 32)
#else
#define CFG_FLAGS_SHIFT 32
/* pairs_active is the low half, kept >= -delta: the sign-extended add never borrows from
 * or carries into flags */
#define CFG_PAIRS_ADDEND(d) ((__u64)(__s64)(d))
#endif

/* Helper program, never attached: the only writer of `config` and `pair_filter` (shuntd.h,
 * struct config_op). XDP_PASS when done, XDP_ABORTED for a short frame or an unknown op. */
int xdp_config_op(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct config_op *op = data;
    if ((void *)(op + 1) > data_end)
        return XDP_ABORTED;
    __u32 zero = 0;
    struct shunt_config *cfg = config.lookup(&zero);
    if (!cfg)
        return XDP_ABORTED;
    __u64 *word = (__u64 *)cfg;
    if (op->op == SHUNT_CONFIG_OP_PAIRS) {
        __s32 delta = op->delta;
        __u32 slot = op->slot;
        if (slot != SHUNT_NO_SLOT) {
            __u32 *count = pair_filter.lookup(&slot);
            if (!count)
                return XDP_ABORTED;
            /* Never below zero: a decrement only follows a counted insert, unless a crash
             * came between an insert and its count (then the slot just stays "maybe"). */
            if (delta >= 0 || *count >= (__u32)(-delta))
                __sync_fetch_and_add(count, delta);
        }
        if (delta < 0 && cfg->pairs_active < (__u32)(-delta))
            delta = -(__s32)cfg->pairs_active;
        __sync_fetch_and_add(word, CFG_PAIRS_ADDEND(delta));
    } else if (op->op == SHUNT_CONFIG_OP_FLAGS) {
        if (op->flags_set)
            __sync_fetch_and_or(word, (__u64)op->flags_set << CFG_FLAGS_SHIFT);
        if (op->flags_clear)
            __sync_fetch_and_and(word, ~((__u64)op->flags_clear << CFG_FLAGS_SHIFT));
    } else if (op->op == SHUNT_CONFIG_OP_CLOCK) {
        cfg->ns_per_jiffy = op->ns_per_jiffy;
        cfg->clock_offset_ns = op->clock_offset_ns;
    } else if (op->op == SHUNT_CONFIG_OP_EARLY) {
        cfg->early_port = op->early_port;
        cfg->early_trigger = op->early_trigger;
        cfg->early_lease_ns = op->early_lease_ns;
        cfg->early_until_ns = op->early_until_ns;
    } else {
        return XDP_ABORTED;
    }
    cfg->layout_version = SHUNTD_LAYOUT_VERSION;
    return XDP_PASS;
}
