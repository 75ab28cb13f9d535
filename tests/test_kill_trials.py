"""SIGKILL at random moments, 10 trials in one run, on a veth pair with the default policies.

Each trial kills a running shuntd while TLS-like sessions and a bulk transfer are in random
phases (mid-handshake, shunted mid-data), then checks that:

* the interface fails open at once (the bpf_link dies with the process): a frame of a shunted
  connection reaches the host stack (a tap after XDP sees it), well within one lease;
* the next start adopts the pinned map: every entry becomes a shunt.log record with reason
  `orphaned` and exactly the counters of the frames XDP dropped before the kill;
* for every connection and direction, packets and IP bytes sent (counted by the sender, from
  the frames it built) = analysed before the kill + dropped by XDP before the kill (orphaned)
  + passed while no shuntd ran (seen by the tap) + analysed and shunted by the next run
  (its conn.log row).

What a SIGKILL does lose, by nature, is the analysed part of the connections open at the kill:
it lived only in the killed process's memory (Zeek loses it the same way). The test predicts
it from the sender's side (frames sent before the shunt point, which it waits for by watching
the pinned map with bpftool, not through shuntd) and counts it as such, so a packet lost
anywhere else (a dropped frame counted nowhere, a counter lost on adoption) fails the test.

The runs are chained: run k+1 adopts run k's map, finishes trial k's connections, and is the
one killed in trial k+1; 11 starts for 10 trials.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import subprocess
import time
from collections import Counter
from pathlib import Path

from e3_payloads import CCS, appdata, client_hello, encrypted_handshake, server_hello, tls_record
from lab import Lab, VethPair, lab_fixture, xdp_prog_id  # noqa: F401
from test_live_daemon import Daemon

LAB_PREFIX = "kt"
TRIALS = 10
A, B = "10.79.0.1", "10.79.0.2"
LEASE = "2"
TLS_PER_TRIAL = 3
TLS_DATA = 12          # appdata records each way after the handshake
BULK_BYTES = 1_000_000  # the shipped bulk policy's threshold (IP bytes of one direction)
BULK_AFTER = 40         # segments after the shunt


class Conv:
    """One conversation's frames: `pre` (until the policy shunts), `post`, `fin`."""

    def __init__(self, pair: VethPair, sport: int, dport: int) -> None:
        self.pair, self.sport, self.dport = pair, sport, dport
        self.seq = {A: 1000, B: 50000}
        self.pre: list[bytes] = []
        self.post: list[bytes] = []
        self.fin: list[bytes] = []

    def tcp(self, src: str, flags: str, payload: bytes = b"") -> bytes:
        dst = B if src == A else A
        sp, dp = (self.sport, self.dport) if src == A else (self.dport, self.sport)
        f = tcp_frame(self.pair, src, dst, sp, dp, flags, self.seq[src], self.seq[dst], payload)
        self.seq[src] += len(payload) + (1 if "S" in flags or "F" in flags else 0)
        return f

    def handshake(self) -> list[bytes]:
        return [self.tcp(A, "S"), self.tcp(B, "SA"), self.tcp(A, "A")]

    def close(self) -> list[bytes]:
        # No last ACK: with --tcp-close-delay 0 it would open a second connection.
        return [self.tcp(A, "FA"), self.tcp(B, "FA")]


_FLAGS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10}


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_frame(pair: VethPair, src: str, dst: str, sport: int, dport: int, flags: str,
              seq: int, ack: int, payload: bytes) -> bytes:
    """Ethernet/IPv4/TCP with correct checksums, by RFC 791/793 (fast: ~750 per trial)."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    bits = sum(_FLAGS[f] for f in flags)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4,
                      bits, 65535, 0, 0) + payload
    pseudo = s + d + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, s, d)
    ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
    mac = bytes.fromhex(pair.host_mac.replace(":", "")) + \
        bytes.fromhex(pair.peer_mac.replace(":", ""))
    return mac + b"\x08\x00" + ip + tcp


def tls_conv(pair: VethPair, sport: int) -> Conv:
    c = Conv(pair, sport, 443)
    c.pre = c.handshake() + [
        c.tcp(A, "PA", tls_record(22, client_hello(), 0x0301)),
        c.tcp(B, "PA", tls_record(22, server_hello())),
        c.tcp(A, "PA", CCS + encrypted_handshake()),
        c.tcp(B, "PA", CCS + encrypted_handshake()),
    ]
    for _ in range(TLS_DATA):
        c.post += [c.tcp(A, "PA", appdata(200)), c.tcp(B, "PA", appdata(1200))]
    c.fin = c.close()
    return c


def bulk_conv(pair: VethPair, sport: int) -> Conv:
    c = Conv(pair, sport, 9000)
    c.pre = c.handshake()
    block = b"d" * 1400
    sent = 80  # IP bytes of SYN and ACK
    i = 0
    while sent < BULK_BYTES:  # `pre` ends with the segment that crosses the threshold
        c.pre.append(c.tcp(A, "PA", block))
        sent += 1440
        i += 1
        if i % 50 == 0:
            c.pre.append(c.tcp(B, "A"))
    for _ in range(BULK_AFTER):
        c.post.append(c.tcp(A, "PA", block))
    c.post.append(c.tcp(B, "A"))
    c.fin = c.close()
    return c


def totals(frames: list[bytes]) -> Counter:
    """(sender, 'pkts'|'bytes') -> count, read from the frames themselves."""
    out: Counter = Counter()
    for f in frames:
        src = A if f[26:30] == bytes(map(int, A.split("."))) else B
        out[(src, "pkts")] += 1
        out[(src, "bytes")] += struct.unpack_from("!H", f, 16)[0]
    return out


def flow_entries(pin: Path) -> int:
    """Entries in the pinned flows map, read with bpftool (not through shuntd)."""
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(pin / "flows")],
                         capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        return -1
    return len(json.loads(out.stdout or "[]"))


def client_port(row: dict[str, str]) -> int:
    """The client's port of a log row (orphans name the key's endpoints in map order, and a
    conversation resumed mid-stream may be logged with the roles flipped)."""
    p1, p2 = int(row["id.orig_p"]), int(row["id.resp_p"])
    return p2 if p1 in (443, 9000) else p1


def by_sender(row: dict[str, str], pkts: str, nbytes: str) -> Counter:
    """A log row's per-side columns as (sender address, 'pkts'|'bytes') counts."""
    out: Counter = Counter()
    for side, addr in (("orig", row["id.orig_h"]), ("resp", row["id.resp_h"])):
        out[(addr, "pkts")] += int(row[pkts.format(side)])
        out[(addr, "bytes")] += int(row[nbytes.format(side)])
    return out


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_sigkill_at_random_moments_fails_open_and_loses_no_shunted_packet(lab: Lab,
                                                                           tmp_path: Path):
    seed = int(os.environ.get("KILL_TRIALS_SEED") or random.randrange(1 << 30))  # to replay
    rng = random.Random(seed)
    pair = lab.veth_to_netns()
    pin = lab.pin_dir(pair.host)
    tap = lab.sniffer(pair.host)
    args = ("--lease", LEASE, "--tcp-close-delay", "0")
    run = Daemon(lab, pair, tmp_path / "run0", *args)
    killed_with_entries = 0
    for trial in range(TRIALS):
        where = f"trial {trial} (seed {seed})"
        base = 20000 + trial * 100
        convs = [tls_conv(pair, base + i) for i in range(TLS_PER_TRIAL)]
        convs.append(bulk_conv(pair, base + 50))
        # A random cut per conversation, in its handshake or after its shunt; the first one
        # is always cut after its shunt, so every trial kills with an entry in the map.
        cuts = [rng.randrange(len(c.pre) + 1, len(c.pre) + len(c.post)) if i == 0 or
                rng.random() < 0.6 else rng.randrange(1, len(c.pre))
                for i, c in enumerate(convs)]
        entries = 0
        for c, cut in zip(convs, cuts, strict=True):
            lab.send_frames(pair, c.pre[:cut])
            if cut > len(c.pre):
                entries += 1
                wait_for(lambda n=entries: flow_entries(pin) == n, 10,
                         f"{where}: shunt of port {c.sport}")
                lab.send_frames(pair, c.post[:cut - len(c.pre)])
        time.sleep(rng.uniform(0, 0.15))      # the kill lands anywhere in the daemon's work
        run.proc.send_signal(signal.SIGKILL)
        run.proc.wait(10)
        run.err.close()
        killed_with_entries += entries
        # Fail open: detached at once, a frame of the shunted first conversation passes.
        assert xdp_prog_id(pair.host) == 0, where
        assert flow_entries(pin) == entries, where  # the pins (and counters) survive
        tap.drain()
        c0, cut0 = convs[0], cuts[0]
        probe = c0.post[cut0 - len(c0.pre)]
        lab.send_frames(pair, [probe])
        seen: list[bytes] = []
        deadline = time.monotonic() + 1.0
        while probe not in seen and time.monotonic() < deadline:
            seen += tap.collect(0.02)
        assert probe in seen, f"{where}: a shunted flow's frame did not pass after the kill"

        run = Daemon(lab, pair, tmp_path / f"run{trial + 1}", *args)
        orphans = {client_port(r): r for r in run.log("shunt")}
        assert len(orphans) == entries, f"{where}: {run.log('shunt')}"
        assert all(r["end_reason"] == "orphaned" for r in orphans.values()), where
        assert flow_entries(pin) == 0, where
        # The rest of every conversation, through the new run.
        rests = []
        for i, (c, cut) in enumerate(zip(convs, cuts, strict=True)):
            frames = c.pre + c.post
            skip = 1 if i == 0 else 0     # the probe was already sent
            rest = frames[cut + skip:] + c.fin
            rests.append(rest)
            lab.send_frames(pair, rest)
        ports = {c.sport for c in convs}
        wait_for(lambda d=run, want=ports: want <= {client_port(r) for r in d.log("conn")},
                 15, f"{where}: conn.log rows of the next run")
        time.sleep(0.3)  # a resumed conversation may end as two records: let both land
        rows = [r for r in run.log("conn") if client_port(r) in ports]
        for i, (c, cut) in enumerate(zip(convs, cuts, strict=True)):
            sent = totals(c.pre + c.post + c.fin)
            lost = totals(c.pre[:cut])                       # analysed before the kill
            dropped = totals(c.post[:max(0, cut - len(c.pre))])  # XDP, before the kill
            passed = totals([probe]) if i == 0 else Counter()
            o = orphans.get(c.sport)
            orphaned = Counter()
            if o is not None:
                orphaned = by_sender(o, "{}_shunted_pkts", "{}_shunted_bytes")
            assert orphaned == dropped, f"{where} port {c.sport}: orphaned counters"
            # The next run may log a resumed conversation as more than one connection (e.g.
            # a lone FIN from each side): its records add up.
            later = Counter()
            for r in rows:
                if client_port(r) == c.sport:
                    later += by_sender(r, "{}_pkts", "{}_ip_bytes")
                    later += by_sender(r, "{}_shunted_pkts", "{}_shunted_bytes")
            assert later == totals(rests[i]), f"{where} port {c.sport}: next run's row"
            assert lost + orphaned + passed + later == sent, f"{where} port {c.sport}"
    assert run.stop() == 0, run.stderr()
    assert killed_with_entries >= TRIALS
