#!/usr/bin/env python3
"""Shunt gain: the highest no-loss rate of the live daemon on a ~88%-TLS mix, shunting off and on.

The mix (`scripts/make-tls-mix`: real TLS, HTTP, DNS, SMTP-like and bulk sessions captured
between two namespaces; four copies of each on their own addresses, flow starts spread over the
loop, each flow a few Mbit/s at the rates reached) is replayed with tcpreplay from a private
namespace into a veth pair; `shuntd --iface` runs on the host side, with a policy that never
shunts and with the default policies (tls, bulk). For each, the offered rate is searched by
bisection (each step `--seconds` long): a step passes when nothing was lost, i.e. the kernel
dropped no captured packet (`shuntd_capture_kernel_drops_total`, from the daemon's metrics) and
every packet tcpreplay sent reached XDP (`shuntd_xdp_seen_packets_total`). A failed step is run
once more before it counts (the machine is shared; a descheduled daemon is noise, not capacity).

Each step runs a fresh daemon (start-up takes a few seconds, less than a step). An overloaded
step leaves tens of thousands of half-open connections in the daemon for minutes (memory, GC,
timers); with one daemon per mode they taxed later steps, and unequally: "on" starts its search
at --floor times the "off" rate, so it overloads first. A fresh daemon makes every step start
from the same empty state in both modes.

The two searches take turns, one step each: the machine's speed drifts (other guests of the
host, memory reclaim; the same code measured 415 and 293 Mbit/s unshunted an hour apart), and
searching one mode after the other measured each at a different speed.

The daemon gets the same fixed CPU budget in both modes, `--cpu-share` of one core (default
0.5) through a cpu cgroup quota in 10 ms periods, so the daemon and not the sender is the
bottleneck: tcpreplay on one core of the 2-core machine this was written on tops out near
2.9 Gbit/s (~320 kpps), which with a whole core for the daemon capped what the bench could show
at ~3.5x whatever the daemon did. If tcpreplay still cannot send faster while nothing is lost,
the rate is a lower bound (">=") and the summary says so. 1.0 = no quota.

Every loop of the replay and every step gets fresh addresses (tcpreplay --unique-ip, and a
per-step offset applied here; both add to one address of a pair what they take from the other,
so checksums stay valid), so each TLS session is a new connection the daemon must recognise.

The daemon runs with its default capture ring (64 MiB in 256 blocks, each handed over after at
most 4 ms: at least 1 s of traffic). It absorbs the daemon's pauses (other load, the quota's
throttling), and an overload shows as drops once it has built that backlog: roughly 20% over
capacity in a 6 s step. The two modes do not gain alike from it: unshunted, a backlog only
delays the same work, so a ~10-15% overload passes a 6 s step; shunting on, a backlog delays
each session's shunt, the session's data then reaches Python as late packets, which adds
load, and near capacity the backlog feeds itself until packets drop. The ratio is therefore
skewed against shunting, not for it (`shuntd_capture_lag_seconds` shows the backlog). Both
modes run the same daemon with `--workers 1`, so they are on equal terms: tcpreplay is pinned
to CPU 0 (with the veth receive path, XDP included), the daemon to CPU 1; tcpreplay's session
autogroup gets --nice -10 and the daemon's cgroup a matching weight, so that other work on the
machine disturbs them less.

    .venv/bin/python bench/shunt_gain.py [--seconds 6] [--floor 4] [--cpu-share 0.5] [--mix PATH]
                                         [--max-backlog SECS]

Prints every step (with the daemon's backlog when the replay ended: a step that passes with a
growing backlog was an overload the ring hid; `--max-backlog` fails such steps too, BACKLOG),
then per mode the no-loss rate, the fraction of packets that reached Python (captured / seen by
XDP) and the daemon's CPU time per packet sent at that rate, and the ratio.
Last line is the summary; exit 1 when the ratio is below --floor (2 on a setup error). Root.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"
DEFAULT_MIX = ROOT / "build" / "bench" / "tls-mix-g400x4.pcap"  # named after --gap, --copies
PCAP_HDR_LEN, REC_HDR_LEN = 24, 16
STEP_OFFSET = 1 << 16   # per-step address shift; tcpreplay's --unique-ip adds the loop number
NEVER_SHUNT = '"""Analyse everything: the benchmark\'s baseline."""\n'


# -- the replayed file --------------------------------------------------------------------------

def load_frames(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:4] != bytes.fromhex("d4c3b2a1") or int.from_bytes(data[20:24], "little") != 1:
        raise SystemExit(f"shunt_gain: {path}: not a little-endian Ethernet pcap")
    return data


def shifted(data: bytes, offset: int) -> bytes:
    """The pcap with every IPv4 pair moved apart by `offset`: the larger address + offset, the
    smaller - offset (checksum neutral: the pair's one's-complement sum is unchanged)."""
    buf = bytearray(data)
    off = PCAP_HDR_LEN
    n = len(buf)
    while off + REC_HDR_LEN <= n:
        incl = int.from_bytes(buf[off + 8:off + 12], "little")
        f = off + REC_HDR_LEN
        if incl >= 34 and buf[f + 12:f + 14] == b"\x08\x00":
            src = int.from_bytes(buf[f + 26:f + 30], "big")
            dst = int.from_bytes(buf[f + 30:f + 34], "big")
            if src > dst:
                src, dst = src + offset, dst - offset
            else:
                src, dst = src - offset, dst + offset
            buf[f + 26:f + 30] = (src & 0xFFFFFFFF).to_bytes(4, "big")
            buf[f + 30:f + 34] = (dst & 0xFFFFFFFF).to_bytes(4, "big")
        off = f + incl
    return bytes(buf)


def mix_summary(data: bytes) -> tuple[int, int]:
    """(frames, bytes) of one loop."""
    frames = total = 0
    off = PCAP_HDR_LEN
    while off + REC_HDR_LEN <= len(data):
        incl = int.from_bytes(data[off + 8:off + 12], "little")
        frames += 1
        total += incl
        off += REC_HDR_LEN + incl
    return frames, total


# -- the lab ------------------------------------------------------------------------------------

def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


@dataclass
class Lab:
    ns: str
    host: str
    peer: str

    @classmethod
    def create(cls) -> Lab:
        tag = str(os.getpid())
        lab = cls(f"sgns{tag}", f"sgh{tag}", f"sgp{tag}")
        run("ip", "netns", "add", lab.ns)
        try:
            run("ip", "link", "add", lab.host, "type", "veth", "peer", "name", lab.peer,
                "netns", lab.ns)
            run("sysctl", "-qw", f"net.ipv6.conf.{lab.host}.disable_ipv6=1")
            run("ip", "netns", "exec", lab.ns, "sysctl", "-qw",
                f"net.ipv6.conf.{lab.peer}.disable_ipv6=1")
            run("ip", "link", "set", lab.host, "up")
            run("ip", "-n", lab.ns, "link", "set", lab.peer, "up")
            subprocess.run(["ethtool", "-K", lab.host, "gro", "off"], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except BaseException:
            lab.close()
            raise
        return lab

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.host], check=False, stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "netns", "del", self.ns], check=False, stderr=subprocess.DEVNULL)
        pins = Path("/sys/fs/bpf/shuntd") / self.host
        if pins.is_dir():
            for f in pins.iterdir():
                f.unlink()
            pins.rmdir()


def prioritise(pid: int, nice: int) -> None:
    """Give `pid`'s scheduling autogroup (its own session) the niceness `nice`: with autogroup
    scheduling a process's own nice value only counts against its session's other processes,
    while the machine's other sessions (other users' jobs) get equal shares whatever it says."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    except OSError:
        pass  # no autogroup scheduling: the nice value given on the command line applies


class CpuBudget:
    """A cpu cgroup holding the daemon to `share` of one CPU, in 10 ms periods (so it is
    throttled in small slices, which the capture ring absorbs). cgroup v1 `cpu` if mounted,
    else cgroup2 with the cpu controller; created here, removed by close()."""

    PERIOD_US = 10_000

    def __init__(self, share: float):
        self.path: Path | None = None
        if share >= 1.0:
            return
        quota = max(1000, int(share * self.PERIOD_US))
        v1, v2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/unified")
        name = f"shunt_gain.{os.getpid()}"
        if (v1 / "cpu.cfs_quota_us").exists():
            self.path = v1 / name
            self.path.mkdir()
            (self.path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
            (self.path / "cpu.shares").write_text("10240")  # like --nice -10 against others
        elif "cpu" in (v2 / "cgroup.controllers").read_text(errors="replace").split():
            self.path = v2 / name
            self.path.mkdir()
            (self.path / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
            (self.path / "cpu.weight").write_text("1000")
        else:
            raise SystemExit("shunt_gain: no cpu cgroup controller for --cpu-share < 1")

    def enter(self) -> None:
        """Move the calling process into the cgroup (run in the daemon's child before exec)."""
        if self.path is not None:
            (self.path / "cgroup.procs").write_text("0")

    def close(self) -> None:
        if self.path is not None:
            for _ in range(50):
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    time.sleep(0.1)  # the last daemon is still leaving


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """`shuntd --iface` on the lab's host side, metrics on a free loopback port."""

    def __init__(self, lab: Lab, log_dir: Path, policies: list[str], args: argparse.Namespace,
                 budget: CpuBudget):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.err_path = log_dir / "stderr.txt"
        pin = ["taskset", "-c", "1"] if args.pin and (os.cpu_count() or 1) > 1 else []
        cmd = ["nice", "-n", str(args.nice), *pin, str(PYTHON), "-m", "shuntd.cli", "--iface",
               lab.host, "--log-dir", str(log_dir), "--metrics-addr", f"127.0.0.1:{self.port}",
               "--ring-blocks", str(args.ring_blocks)]
        for p in policies:
            cmd += ["--policy", p]
        with self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True, preexec_fn=budget.enter)
        prioritise(self.proc.pid, args.nice)
        deadline = time.monotonic() + 60
        while "running on" not in self.stderr():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"shunt_gain: daemon did not start: {self.stderr()[-2000:]}")
            time.sleep(0.1)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Each metric summed over its labels (and the flows/ip_pairs tables)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                base = name.split("{", 1)[0]
                out[base] = out.get(base, 0.0) + float(value)
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU time of the daemon so far (all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# -- one step -----------------------------------------------------------------------------------

SEEN = "shuntd_xdp_seen_packets_total"
CAPTURED = "shuntd_capture_packets_total"
DROPS = "shuntd_capture_kernel_drops_total"
SHUNTED = "shuntd_xdp_shunted_packets_total"
LAG = "shuntd_capture_lag_seconds"


@dataclass
class Step:
    offered_mbps: float
    sent: int
    sent_mbps: float
    sent_pps: float
    seen: int
    captured: int
    drops: int
    cpu: float   # daemon CPU seconds from just before the replay until it settled
    lag_end: float = 0.0  # seconds the daemon was behind when the replay ended (its backlog)
    max_backlog: float = float("inf")  # --max-backlog: a bigger backlog fails the step

    @property
    def lost(self) -> int:
        return self.drops + max(0, self.sent - self.seen)

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.lost == 0 and self.lag_end <= self.max_backlog

    @property
    def verdict(self) -> str:
        return "ok" if self.ok else "LOSS" if self.lost or not self.sent else "BACKLOG"

    @property
    def cpu_per_kpkt(self) -> float:
        """Daemon CPU seconds per thousand packets sent (what the analyser pays per packet)."""
        return self.cpu / self.sent * 1e3 if self.sent else 0.0

    @property
    def to_python(self) -> float:
        return (self.captured - self.drops) / self.seen if self.seen else 0.0


def settle(d: Daemon, quiet: float = 0.6, limit: float = 15.0) -> dict[str, float]:
    """Metrics once capture counters stopped moving (the daemon has taken what it will take)."""
    last = d.metrics()
    still_since = time.monotonic()
    deadline = still_since + limit
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = d.metrics()
        if (now.get(SEEN), now.get(CAPTURED)) != (last.get(SEEN), last.get(CAPTURED)):
            still_since = time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            return now
        last = now
    return last


def replay(lab: Lab, pcap: Path, mbps: float, args: argparse.Namespace) -> tuple[int, float, float]:
    """tcpreplay for --seconds at `mbps`; (packets sent, achieved Mbit/s, achieved pps)."""
    pin = ["taskset", "-c", "0"] if args.pin else []
    cmd = ["ip", "netns", "exec", lab.ns, "nice", "-n", str(args.nice), *pin, "tcpreplay", "-q",
           "-i", lab.peer, "-K", "--mbps", f"{mbps:.3f}", "--loop", "0", "--unique-ip",
           "--duration", str(int(args.seconds)), "--no-flow-stats", str(pcap)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    prioritise(p.pid, args.nice)
    try:
        out, _ = p.communicate(timeout=args.seconds + 120)
    except BaseException:  # its own session: Ctrl-C does not reach it
        p.kill()
        p.communicate()
        raise
    sent = re.search(r"Actual: (\d+) packets", out)
    rated = re.search(r"Rated: [\d.]+ Bps, ([\d.]+) Mbps, ([\d.]+) pps", out)
    if p.returncode != 0 or sent is None or rated is None:
        raise SystemExit(f"shunt_gain: tcpreplay failed ({p.returncode}): {out[-1500:]}")
    return int(sent.group(1)), float(rated.group(1)), float(rated.group(2))


class Runner:
    """Steps of one mode, each on a fresh daemon with its own address offset (never reused
    across modes)."""

    def __init__(self, lab: Lab, base: bytes, work: Path, args: argparse.Namespace,
                 budget: CpuBudget):
        self.lab, self.base, self.work, self.args, self.budget = lab, base, work, args, budget
        self.step_no = 0
        self.notes: dict[str, list[str]] = {}   # per mode: the daemons' warnings, errors, slow GCs

    def step(self, policies: list[str], mbps: float, mode: str = "") -> Step:
        self.step_no += 1
        pcap = self.work / "step.pcap"
        pcap.write_bytes(shifted(self.base, self.step_no * STEP_OFFSET))
        log_dir = self.work / f"logs-{self.step_no}"
        d = Daemon(self.lab, log_dir, policies, self.args, self.budget)
        try:
            before = settle(d)
            cpu0 = d.cpu_seconds()
            sent, sent_mbps, sent_pps = replay(self.lab, pcap, mbps, self.args)
            lag_end = d.metrics().get(LAG, 0.0)
            after = settle(d)
            cpu = d.cpu_seconds() - cpu0
        finally:
            d.stop()
            self.notes.setdefault(mode, []).extend(
                f"step {self.step_no}: {ln}" for ln in d.stderr().splitlines()
                if "WARNING" in ln or "ERROR" in ln or "garbage collection" in ln)
            shutil.rmtree(log_dir, ignore_errors=True)

        def delta(name: str) -> int:
            return int(after.get(name, 0) - before.get(name, 0))

        return Step(mbps, sent, sent_mbps, sent_pps, delta(SEEN), delta(CAPTURED), delta(DROPS),
                    cpu, lag_end, self.args.max_backlog)

    def trial(self, policies: list[str], mode: str, mbps: float) -> Step:
        label = f"shunting {mode}"
        s = self.step(policies, mbps, mode)
        self.show(label, s)
        if not s.ok:  # one repeat before a failure counts: the machine is shared
            s = self.step(policies, mbps, mode)
            self.show(label + " (again)", s)
        return s

    @staticmethod
    def show(label: str, s: Step) -> None:
        print(f"  {label:<16} offered {s.offered_mbps:8.1f} Mbit/s  sent {s.sent_mbps:8.1f} "
              f"Mbit/s {s.sent_pps / 1e3:7.1f} kpps  capture drops {s.drops:7d}  "
              f"lost before XDP {max(0, s.sent - s.seen):6d}  to Python {s.to_python:6.1%}  "
              f"daemon CPU {s.cpu_per_kpkt * 1e3:5.1f} us/pkt  backlog {s.lag_end * 1e3:5.0f} ms  "
              f"{s.verdict}", flush=True)

    def bisection(self, start: float) -> Generator[float, Step, tuple[Step | None, bool]]:
        """Bisection on offered Mbit/s: yields the next rate to try, is sent that trial's step;
        returns (best passing step, sender-limited?)."""
        lo: Step | None = None
        hi: float | None = None
        rate = start
        limited = False
        for _ in range(self.args.max_steps):
            s = yield rate
            if s.ok:
                if lo is None or s.sent_mbps > lo.sent_mbps:
                    lo = s
                if s.sent_mbps < 0.9 * rate:  # tcpreplay cannot send faster: no ceiling found
                    limited = True
                    break
                rate = rate * 2 if hi is None else (rate * hi) ** 0.5
            else:
                hi = rate
                rate = rate / 2 if lo is None else (lo.offered_mbps * hi) ** 0.5
            if lo and hi and hi / lo.offered_mbps <= 1 + self.args.tolerance:
                break
            if rate < 0.5:
                break
        return lo, limited

    def interleaved(self, modes: dict[str, tuple[list[str], float]]
                    ) -> dict[str, tuple[Step | None, bool]]:
        """Both searches at once, one step of each in turn: the machine's speed drifts (other
        guests of the host, memory reclaim), and searching one mode after the other measured
        them at different speeds; taking turns spreads any drift over both alike."""
        results: dict[str, tuple[Step | None, bool]] = {}
        active: dict[str, tuple[Generator[float, Step, tuple[Step | None, bool]], float]] = {}
        for mode, (_, start) in modes.items():
            gen = self.bisection(start)
            active[mode] = (gen, next(gen))
            self.notes[mode] = []
        while active:
            for mode in list(active):
                gen, rate = active[mode]
                policies = modes[mode][0]
                try:
                    active[mode] = (gen, gen.send(self.trial(policies, mode, rate)))
                except StopIteration as done:
                    results[mode] = done.value
                    del active[mode]
        return results


# -- main ---------------------------------------------------------------------------------------

def ensure_mix(args: argparse.Namespace) -> Path:
    path: Path = args.mix
    if path.exists() and not args.regenerate:
        return path
    print(f"shunt_gain: capturing the traffic mix into {path} (scripts/make-tls-mix)", flush=True)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make-tls-mix"), str(path),
                    "--gap", "400", "--copies", "4"], check=True)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="length of each step")
    ap.add_argument("--floor", type=float, default=4.0, help="minimum no-loss rate ratio")
    ap.add_argument("--mix", type=Path, default=DEFAULT_MIX,
                    help="the pcap (made with scripts/make-tls-mix if missing)")
    ap.add_argument("--regenerate", action="store_true", help="capture the mix again")
    ap.add_argument("--start-mbps", type=float, default=100.0,
                    help="first rate tried with shunting off (on: this times --floor)")
    ap.add_argument("--max-steps", type=int, default=10, help="bisection steps per mode")
    ap.add_argument("--tolerance", type=float, default=0.1, help="stop when hi/lo <= 1 + this")
    ap.add_argument("--ring-blocks", type=int, default=64, help="daemon capture ring, MiB")
    ap.add_argument("--max-backlog", type=float, default=float("inf"), metavar="SECS",
                    help="also fail a step whose backlog when the replay ended is longer "
                         "(default: none, only losses fail)")
    ap.add_argument("--cpu-share", type=float, default=0.5,
                    help="CPU the daemon may use, as a share of one core (1.0: no quota)")
    ap.add_argument("--nice", type=int, default=-10,
                    help="niceness of the daemon and tcpreplay (less disturbed by other load)")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="do not pin tcpreplay to CPU 0 and the daemon to CPU 1")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("shunt_gain: needs root (netns, veth, XDP)", file=sys.stderr)
        return 2
    for tool in ("tcpreplay", "taskset", "ethtool"):
        if shutil.which(tool) is None:
            print(f"shunt_gain: {tool} not found", file=sys.stderr)
            return 2
    base = load_frames(ensure_mix(args))
    frames, nbytes = mix_summary(base)
    print(f"mix: {args.mix} ({frames} frames, {nbytes / 1e6:.1f} MB a loop); steps of "
          f"{args.seconds:.0f} s; ring {args.ring_blocks} MiB; machine load "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (shared: expect noise); both modes: "
          "one daemon process (--workers 1), default ring and timers, a fresh daemon each step, "
          f"daemon CPU share {args.cpu_share:g} of a core"
          f"{' (no quota)' if args.cpu_share >= 1 else ' (cgroup quota, 10 ms periods)'}",
          flush=True)

    results: dict[str, tuple[Step | None, bool]] = {}
    with tempfile.TemporaryDirectory(prefix="shunt_gain.") as tmp:
        work = Path(tmp)
        never = work / "never_shunt.py"
        never.write_text(NEVER_SHUNT)
        never.chmod(0o644)
        budget = CpuBudget(args.cpu_share)
        try:
            lab = Lab.create()
        except BaseException:
            budget.close()
            raise
        try:
            runner = Runner(lab, base, work, args, budget)
            print(f"steps of both modes in turn; shunting off: policy never_shunt, from "
                  f"{args.start_mbps:g} Mbit/s; shunting on: policies tls, bulk, from "
                  f"{args.start_mbps * args.floor:g} Mbit/s", flush=True)
            results = runner.interleaved({
                "off": ([str(never)], args.start_mbps),
                "on": (["tls", "bulk"], args.start_mbps * args.floor)})
            # What disturbed the daemons (pauses, ring trouble) explains odd steps.
            for mode, notes in runner.notes.items():
                for ln in notes[:8]:
                    print(f"  daemon ({mode}): {ln}", flush=True)
                if len(notes) > 8:
                    print(f"  daemon ({mode}): ... {len(notes) - 8} more", flush=True)
        finally:
            lab.close()
            budget.close()

    off, on = results["off"], results["on"]
    for mode, (best, limited) in results.items():
        if best is None:
            print(f"shunting {mode}: no rate without loss")
            continue
        print(f"shunting {mode}: no-loss rate {'>= ' if limited else ''}{best.sent_mbps:.1f} "
              f"Mbit/s ({best.sent_pps / 1e3:.1f} kpps); packets that reached Python "
              f"{best.to_python:.1%}; daemon CPU {best.cpu_per_kpkt * 1e3:.1f} us per packet sent")
    if off[0] is None or on[0] is None:
        print("shunt_gain: FAILED: no loss-free rate found in one mode (see the steps above)")
        return 1
    ratio = on[0].sent_mbps / off[0].sent_mbps
    bound = ">= " if on[1] and not off[1] else ""
    if on[1]:
        print(f"shunt_gain: tcpreplay's ceiling reached with shunting on: the daemon was not the "
              f"bottleneck, the ratio is a lower bound (a smaller --cpu-share than "
              f"{args.cpu_share:g} measures it)")
    ok = ratio >= args.floor
    rate = ("no-loss rate" if args.max_backlog == float("inf")
            else f"rate without loss or a backlog over {args.max_backlog:g} s")
    print(f"shunt_gain: {rate} {off[0].sent_mbps:.1f} Mbit/s unshunted, "
          f"{bound}{on[0].sent_mbps:.1f} Mbit/s with tls+bulk shunting: {bound}{ratio:.1f}x "
          f"({'ok' if ok else 'BELOW FLOOR'} >= {args.floor:g}x); Python saw "
          f"{off[0].to_python:.0%} / {on[0].to_python:.1%} of packets, daemon CPU "
          f"{off[0].cpu_per_kpkt * 1e3:.1f} / {on[0].cpu_per_kpkt * 1e3:.1f} us per packet; "
          f"daemon CPU share {args.cpu_share:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
