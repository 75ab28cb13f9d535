"""Network lab for tests: namespaces, veth pairs, packet taps, with guaranteed cleanup.

Everything lives in a `Lab` that records what it made and removes it in reverse order in
`close()` (also on failure: use it as a context manager or through the `lab` fixture). Names carry
a prefix and the pid, so parallel test runs never collide, and interface names stay <= 15 bytes.

In a test module: ``from lab import lab_fixture  # noqa: F401`` provides the ``lab`` fixture
(prefix from the module's ``LAB_PREFIX``). Typical use::

    with Lab("d2") as lab:
        pair = lab.veth_to_netns()            # host side in the root ns, peer in a new netns
        with lab.sniffer(pair.host) as tap:    # AF_PACKET tap on the host side (after XDP)
            lab.send_frames(pair, [frame])     # injected from the peer, received on pair.host
            frames = tap.collect(0.2)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ETH_P_ALL = 0x0003
CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/var/run/netns")
PIN_ROOT = Path("/sys/fs/bpf/shuntd")


def is_root() -> bool:
    return os.geteuid() == 0


requires_root = pytest.mark.skipif(not is_root(), reason="needs root (netns, veth, BPF)")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def inside_netns(name: str) -> Iterator[None]:
    """Run the block with the calling thread in netns ``name``; sockets opened inside keep
    living in that namespace after the block. Restores the thread's previous namespace."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(NETNS_RUN_DIR / name, os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(back)
    finally:
        os.close(target)
        os.close(back)


@dataclass(frozen=True)
class VethPair:
    host: str  # in the root namespace
    peer: str  # in ``netns`` (or the root namespace if netns is None)
    netns: str | None
    host_index: int
    host_mac: str
    peer_mac: str


class Tap:
    """AF_PACKET socket on one interface; sees what the stack receives (i.e. after XDP)."""

    def __init__(self, ifname: str, bufsize: int = 4 << 20):
        self.ifname = ifname
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
        self.sock.bind((ifname, 0))
        self.sock.setblocking(False)

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                self.sock.recv(65536)

    def collect(self, seconds: float, incoming_only: bool = True) -> list[bytes]:
        """Every frame received within ``seconds`` (outgoing copies skipped by default)."""
        frames: list[bytes] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                continue
            with contextlib.suppress(BlockingIOError):
                while True:
                    data, addr = self.sock.recvfrom(65536)
                    if incoming_only and addr[2] == socket.PACKET_OUTGOING:
                        continue
                    frames.append(data)
        return frames

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Lab:
    """Owner of every namespace, link and pin a test creates."""

    prefix: str = "lab"
    _count: int = 0
    _netns: list[str] = field(default_factory=list)
    _links: list[str] = field(default_factory=list)
    _pins: list[Path] = field(default_factory=list)
    _cleanups: list[Callable[[], None]] = field(default_factory=list)

    def name(self, kind: str) -> str:
        """A unique name of at most 15 bytes: <prefix><kind><pid>-<n> (the dash keeps pid 12
        name 34 apart from pid 123 name 4). Keep the prefix to 3 characters."""
        self._count += 1
        base = f"{self.prefix}{kind}{os.getpid()}-{self._count}"
        if len(base) > 15:
            raise ValueError(f"name {base!r} too long for an interface")
        return base

    # -- resources ------------------------------------------------------------------------
    def netns(self) -> str:
        from pyroute2 import netns

        name = self.name("n")
        netns.create(name)
        self._netns.append(name)
        return name

    def veth_to_netns(
        self,
        netns: str | None = None,
        mtu: int | None = None,
        host_addr: str | None = None,
        peer_addr: str | None = None,
        prefixlen: int = 24,
        up: bool = True,
    ) -> VethPair:
        """A veth pair: host side in the root ns, peer in ``netns`` (a new one if None).

        Both sides are brought up (unless ``up`` is False, which leaves the host side down).
        Addresses are optional: tests that inject frames with AF_PACKET need none.
        """
        from pyroute2 import IPRoute, NetNS

        ns = netns or self.netns()
        host, peer = self.name("h"), self.name("p")
        with IPRoute() as ipr:
            ipr.link("add", ifname=host, kind="veth", peer={"ifname": peer})
            self._links.append(host)
            peer_idx = ipr.link_lookup(ifname=peer)[0]
            ipr.link("set", index=peer_idx, net_ns_fd=ns)
            host_idx = ipr.link_lookup(ifname=host)[0]
            if mtu:
                ipr.link("set", index=host_idx, mtu=mtu)
            if host_addr:
                ipr.addr("add", index=host_idx, address=host_addr, prefixlen=prefixlen)
            ipr.link("set", index=host_idx, state="up" if up else "down")
            host_mac = ipr.link("get", index=host_idx)[0].get_attr("IFLA_ADDRESS")
        with NetNS(ns) as nsr:
            idx = nsr.link_lookup(ifname=peer)[0]
            if mtu:
                nsr.link("set", index=idx, mtu=mtu)
            if peer_addr:
                nsr.addr("add", index=idx, address=peer_addr, prefixlen=prefixlen)
            nsr.link("set", index=idx, state="up")
            lo = nsr.link_lookup(ifname="lo")[0]
            nsr.link("set", index=lo, state="up")
            peer_mac = nsr.link("get", index=idx)[0].get_attr("IFLA_ADDRESS")
        return VethPair(host, peer, ns, host_idx, host_mac, peer_mac)

    def veth_between(self, ns_a: str, ns_b: str, addr_a: str | None = None,
                     addr_b: str | None = None, prefixlen: int = 24) -> tuple[str, str]:
        """A veth pair with one end in each namespace, both up; returns (name_a, name_b).
        Real sockets opened in ns_a / ns_b (``inside_netns``) talk across it."""
        from pyroute2 import IPRoute, NetNS

        name_a, name_b = self.name("a"), self.name("b")
        with IPRoute() as ipr:
            ipr.link("add", ifname=name_a, kind="veth", peer={"ifname": name_b})
            self._links.append(name_a)  # until moved; deleting the netns removes it then
            ipr.link("set", index=ipr.link_lookup(ifname=name_a)[0], net_ns_fd=ns_a)
            ipr.link("set", index=ipr.link_lookup(ifname=name_b)[0], net_ns_fd=ns_b)
        for ns, name, addr in ((ns_a, name_a, addr_a), (ns_b, name_b, addr_b)):
            with NetNS(ns) as nsr:
                idx = nsr.link_lookup(ifname=name)[0]
                if addr:
                    nsr.addr("add", index=idx, address=addr, prefixlen=prefixlen)
                nsr.link("set", index=idx, state="up")
                nsr.link("set", index=nsr.link_lookup(ifname="lo")[0], state="up")
        return name_a, name_b

    def portless_bridge(self, up: bool = True) -> str:
        """An empty bridge in the root namespace: a device without native XDP (exercises the
        generic fallback). The kernel here has no `dummy` module; a portless bridge carries no
        traffic either."""
        from pyroute2 import IPRoute

        name = self.name("b")
        with IPRoute() as ipr:
            ipr.link("add", ifname=name, kind="bridge")
            self._links.append(name)
            if up:
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
        return name

    def set_link(self, ifname: str, **kwargs: object) -> None:
        """pyroute2 `link set` on a root-namespace interface (state=, mtu=, ...)."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], **kwargs)

    def pin_dir(self, ifname: str) -> Path:
        """Register /sys/fs/bpf/shuntd/<ifname> for removal at close."""
        path = PIN_ROOT / ifname
        self._pins.append(path)
        return path

    def on_close(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    # -- traffic ---------------------------------------------------------------------------
    def sniffer(self, ifname: str) -> Tap:
        tap = Tap(ifname)
        self._cleanups.append(tap.close)
        return tap

    def send_frames(self, pair: VethPair, frames: list[bytes]) -> None:
        """Send raw Ethernet frames out of the peer; they arrive on ``pair.host``."""
        ctx = inside_netns(pair.netns) if pair.netns else contextlib.nullcontext()
        with ctx:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        with s:
            s.bind((pair.peer, 0))
            for frame in frames:
                s.send(frame)

    def run_in_netns(self, netns: str, fn: Callable[[], object]) -> threading.Thread:
        """Start ``fn`` on a thread that lives in ``netns`` (e.g. a TCP server)."""

        def body() -> None:
            fd = os.open(NETNS_RUN_DIR / netns, os.O_RDONLY)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            fn()

        t = threading.Thread(target=body, daemon=True)
        t.start()
        return t

    # -- cleanup ---------------------------------------------------------------------------
    def close(self) -> None:
        """Remove everything, newest first; keep going past individual failures."""
        from pyroute2 import IPRoute, netns

        errors: list[str] = []
        for fn in reversed(self._cleanups):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - cleanup must go on
                errors.append(f"cleanup {fn}: {exc}")
        self._cleanups.clear()
        with IPRoute() as ipr:
            for link in reversed(self._links):
                idx = ipr.link_lookup(ifname=link)
                if idx:
                    try:
                        ipr.link("del", index=idx[0])
                    except Exception as exc:  # noqa: BLE001
                        errors.append(f"link {link}: {exc}")
        self._links.clear()
        for ns in reversed(self._netns):
            try:
                netns.remove(ns)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"netns {ns}: {exc}")
        self._netns.clear()
        for pin in reversed(self._pins):
            if pin.exists():
                try:
                    for f in pin.iterdir():
                        f.unlink()
                    pin.rmdir()
                except OSError as exc:
                    errors.append(f"pin {pin}: {exc}")
        self._pins.clear()
        if errors:
            raise RuntimeError("lab cleanup incomplete: " + "; ".join(errors))

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def xdp_prog_id(ifname: str, netns: str | None = None) -> int:
    """Id of the XDP program attached to ``ifname`` (0 if none), read over netlink."""
    from pyroute2 import IPRoute, NetNS

    with (NetNS(netns) if netns else IPRoute()) as ipr:
        link = ipr.link("get", index=ipr.link_lookup(ifname=ifname)[0])[0]
    nla = link.get_attr("IFLA_XDP")
    if not nla:
        return 0
    for name in ("IFLA_XDP_PROG_ID", "IFLA_XDP_DRV_PROG_ID", "IFLA_XDP_SKB_PROG_ID"):
        if nla.get_attr(name):
            return int(nla.get_attr(name))
    return 0


@pytest.fixture(name="lab")
def lab_fixture(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """A Lab whose prefix is the test module's ``LAB_PREFIX`` (default "lab")."""
    if not is_root():
        pytest.skip("needs root (netns, veth, BPF)")
    with Lab(getattr(request.module, "LAB_PREFIX", "lab")) as the_lab:
        yield the_lab
