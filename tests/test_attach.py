"""bpf_link attach, modes, refusal cases, prerequisites and pin directories.

Uses a trivial bcc XDP program (not the shunting program) so these checks do not depend on the
program's layout; the shunting program itself is exercised in test_datapath_veth.py.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from lab import Lab, is_root, lab_fixture, requires_root, xdp_prog_id  # noqa: F401
from shuntd.datapath import prereq
from shuntd.datapath.attach import attach_xdp
from shuntd.datapath.errors import (
    BtfMissingError,
    InterfaceDownError,
    InterfaceMissingError,
    KernelHeadersMissingError,
    KernelTooOldError,
    MtuTooLargeError,
    NotPrivilegedError,
    PinError,
    XdpAlreadyAttachedError,
)
from shuntd.datapath.iface import XdpMode

LAB_PREFIX = "d2"

PASS_PROG = r"""
BPF_ARRAY(hits, u64, 1);
int xdp_count(struct xdp_md *ctx) {
    int k = 0;
    u64 *v = hits.lookup(&k);
    if (v) __sync_fetch_and_add(v, 1);
    return XDP_PASS;
}
"""


@pytest.fixture(scope="module")
def pass_prog():
    if not is_root():
        pytest.skip("needs root")
    from bcc import BPF

    b = BPF(text=PASS_PROG)
    fn = b.load_func("xdp_count", BPF.XDP)
    yield fn.fd
    b.cleanup()


# -- prerequisites: pure checks, run anywhere ----------------------------------------------

def test_parse_release():
    assert prereq.parse_release("6.18.0-1-amd64") == (6, 18)
    assert prereq.parse_release("5.4.0") == (5, 4)
    assert prereq.parse_release("4.19") == (4, 19)


def test_old_kernel_is_refused_with_version_in_message():
    with pytest.raises(KernelTooOldError, match=r"5\.4\.0.*5\.14"):
        prereq.check_kernel_version("5.4.0-150-generic")
    prereq.check_kernel_version("6.1.0")


def test_missing_privileges_message_names_caps():
    with pytest.raises(NotPrivilegedError, match="CAP_BPF and CAP_NET_ADMIN"):
        prereq.check_privileges(caps=0)
    with pytest.raises(NotPrivilegedError):
        prereq.check_privileges(caps=1 << prereq.CAP_BPF)  # no NET_ADMIN
    prereq.check_privileges(caps=(1 << prereq.CAP_BPF) | (1 << prereq.CAP_NET_ADMIN))


def test_missing_headers_say_make_deps(tmp_path: Path):
    with pytest.raises(KernelHeadersMissingError, match="sudo make deps"):
        prereq.check_kernel_headers("6.18.0-test", modules=str(tmp_path))


def test_missing_btf(tmp_path: Path):
    with pytest.raises(BtfMissingError, match="CONFIG_DEBUG_INFO_BTF"):
        prereq.check_btf(str(tmp_path / "vmlinux"))


@requires_root
def test_this_host_passes_all_checks():
    prereq.check_all()


# -- interfaces ----------------------------------------------------------------------------

@requires_root
def test_missing_interface_is_a_clear_error(pass_prog):
    with pytest.raises(InterfaceMissingError, match="d2nosuch.*does not exist"):
        attach_xdp(pass_prog, f"d2nosuch{os.getpid() % 1000}")


def test_interface_down_is_a_clear_error(lab: Lab, pass_prog):
    pair = lab.veth_to_netns(up=False)
    with pytest.raises(InterfaceDownError, match=f"{pair.host}.*ip link set {pair.host} up"):
        attach_xdp(pass_prog, pair.host)
    assert xdp_prog_id(pair.host) == 0


@pytest.mark.parametrize("mode, expected", [("native", XdpMode.NATIVE),
                                            ("generic", XdpMode.GENERIC),
                                            ("auto", XdpMode.NATIVE)])
def test_attach_reports_mode_and_detaches(lab: Lab, pass_prog, mode, expected):
    pair = lab.veth_to_netns()
    att = attach_xdp(pass_prog, pair.host, mode=mode)
    lab.on_close(att.detach)
    assert att.mode is expected
    assert att.prog_id == xdp_prog_id(pair.host) != 0
    att.detach()
    assert xdp_prog_id(pair.host) == 0
    att.detach()  # idempotent


def test_second_attach_is_refused(lab: Lab, pass_prog):
    pair = lab.veth_to_netns()
    with attach_xdp(pass_prog, pair.host) as first:
        with pytest.raises(XdpAlreadyAttachedError, match=rf"id {first.prog_id}.*bpftool"):
            attach_xdp(pass_prog, pair.host)
    assert xdp_prog_id(pair.host) == 0


def test_jumbo_mtu_native_without_frags_names_the_limit(lab: Lab, pass_prog):
    pair = lab.veth_to_netns(mtu=9000)
    with pytest.raises(MtuTooLargeError, match=r"MTU 9000.*3506.*frags"):
        attach_xdp(pass_prog, pair.host, mode="native")
    assert xdp_prog_id(pair.host) == 0
    with attach_xdp(pass_prog, pair.host, mode="generic") as att:  # generic linearises
        assert att.mode is XdpMode.GENERIC


# -- pins ----------------------------------------------------------------------------------

def test_pin_dir_is_root_only_and_unpin_removes_it(lab: Lab):
    from shuntd.datapath import pins

    ifname = lab.name("x")
    path = lab.pin_dir(ifname)
    old = os.umask(0o022)
    try:
        made = pins.prepare_pin_dir(ifname)
    finally:
        os.umask(old)
    assert made == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert stat.S_IMODE(pins.PIN_ROOT.stat().st_mode) == 0o700
    pins.unpin_all(ifname)
    assert not path.exists()
    pins.unpin_all(ifname)  # idempotent


def test_pin_of_another_layout_is_refused(lab: Lab):
    from bcc import BPF
    from shuntd.datapath import pins

    ifname = lab.name("x")
    path = pins.prepare_pin_dir(ifname)
    lab.pin_dir(ifname)
    b = BPF(text=f'BPF_TABLE_PINNED("hash", u32, u64, flows, 8, "{path}/flows");\n'
                 "int f(void *ctx) { return 0; }")
    b.cleanup()
    assert pins.check_pin(path / "flows", pins.MapLayout(4, 8, 8))
    assert not pins.check_pin(path / "other", pins.MapLayout(4, 8, 8))
    with pytest.raises(PinError, match="remove .*to start with empty maps"):
        pins.check_pin(path / "flows", pins.MapLayout(44, 64, 8))


# -- crash safety ----------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time
    from bcc import BPF
    from shuntd.datapath.attach import attach_xdp
    pin, ifname = sys.argv[1], sys.argv[2]
    # counts only frames of the local-experimental ethertype 0x88b5 the test sends, not the
    # IPv6 router solicitations / MLD reports the peer emits on its own
    b = BPF(text='BPF_TABLE_PINNED("array", int, u64, hits, 1, "' + pin + '");'
                 'int xdp_count(struct xdp_md *ctx) {'
                 ' void *d = (void *)(long)ctx->data, *e = (void *)(long)ctx->data_end;'
                 ' if (d + 14 > e || *(u16 *)(d + 12) != htons(0x88b5)) return XDP_PASS;'
                 ' int k = 0; u64 *v = hits.lookup(&k);'
                 ' if (v) __sync_fetch_and_add(v, 1); return XDP_PASS; }')
    fn = b.load_func("xdp_count", BPF.XDP)
    att = attach_xdp(fn.fd, ifname)
    print("attached", att.prog_id, flush=True)
    time.sleep(60)
    """
)


def test_sigkill_detaches_and_leaves_pins(lab: Lab):
    from bcc import BPF
    from shuntd.datapath import pins

    pair = lab.veth_to_netns()
    pin_dir = pins.prepare_pin_dir(pair.host)
    lab.pin_dir(pair.host)
    pin = f"{pin_dir}/hits"
    child = subprocess.Popen([sys.executable, "-c", CHILD, pin, pair.host],
                             stdout=subprocess.PIPE, text=True)
    lab.on_close(lambda: child.poll() is None and child.kill())
    line = child.stdout.readline()
    assert line.startswith("attached"), line
    assert xdp_prog_id(pair.host) == int(line.split()[1])
    # 3 frames through the attached program, counted in the pinned array
    frame = bytes.fromhex(pair.host_mac.replace(":", "")) + bytes(6) + b"\x88\xb5" + bytes(50)
    lab.send_frames(pair, [frame] * 3)
    time.sleep(0.1)
    child.kill()
    child.wait(timeout=10)
    deadline = time.monotonic() + 5
    while xdp_prog_id(pair.host) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert xdp_prog_id(pair.host) == 0, "program outlived its process"
    b = BPF(text=f'BPF_TABLE_PINNED("array", int, u64, hits, 1, "{pin}");\n'
                 "int f(void *ctx) { return 0; }")
    try:
        assert b["hits"][0].value == 3
    finally:
        b.cleanup()


@requires_root
def test_unprivileged_process_gets_the_clear_error():
    """A real process without capabilities (uid nobody), not a faked capability mask."""
    code = ("from shuntd.datapath.errors import DatapathError\n"
            "from shuntd.datapath import prereq\n"
            "try:\n    prereq.check_all()\nexcept DatapathError as e:\n"
            "    print(type(e).__name__, e)\n")
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
         sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, cwd="/")
    assert out.stdout.startswith("NotPrivilegedError shuntd needs root, or CAP_BPF"), (
        out.stdout + out.stderr)


def test_auto_falls_back_to_generic_where_the_driver_has_no_native_xdp(lab: Lab, pass_prog):
    from shuntd.datapath.errors import AttachError

    ifname = lab.portless_bridge()
    with pytest.raises(AttachError, match=f"native XDP attach on '{ifname}' failed"):
        attach_xdp(pass_prog, ifname, mode="native")
    with attach_xdp(pass_prog, ifname, mode="auto") as att:
        assert att.mode is XdpMode.GENERIC
        assert xdp_prog_id(ifname) == att.prog_id
    assert xdp_prog_id(ifname) == 0
