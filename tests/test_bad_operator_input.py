"""Bad operator input, through the real `shuntd` command line as a subprocess.

Each mistake must give a short error naming the problem (no traceback) and a non-zero exit.
Policy files and the datapath have no CLI flag in offline mode yet: they are driven through
their loaders (`policyfile.load`, `open_datapath`) in a subprocess, as the daemon will.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from e1_trace_helpers import pcap_bytes
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

ROOT = Path(__file__).resolve().parents[1]
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").is_dir() else sys.executable


def _frame() -> bytes:
    return bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2, flags="S"))


def _shuntd(*args: str, user: str | None = None, cwd: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
    cmd = [PYTHON, "-m", "shuntd.cli", *args]
    if user is not None:
        cmd = ["runuser", "-u", user, "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd)


def _assert_clean_error(res: subprocess.CompletedProcess[str], *words: str) -> None:
    assert res.returncode != 0, res
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("shuntd:")]
    assert len(errors) == 1, res.stderr           # exactly one error line (argparse: + usage)
    for w in words:
        assert w in errors[0], errors[0]


def _trace(tmp_path: Path, n: int = 3) -> Path:
    f = _frame()
    p = tmp_path / "ok.pcap"
    p.write_bytes(pcap_bytes([(100 + i, 0, f, len(f)) for i in range(n)], 1))
    return p


def test_missing_trace(tmp_path: Path) -> None:
    res = _shuntd("-r", str(tmp_path / "nope.pcap"), "--log-dir", str(tmp_path))
    _assert_clean_error(res, "nope.pcap")
    assert res.returncode == 2


def test_trace_that_is_not_a_pcap(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"this is not a capture file at all\n")
    _assert_clean_error(_shuntd("-r", str(bad), "--log-dir", str(tmp_path)), "bad.pcap")


def test_empty_trace(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(b"")
    _assert_clean_error(_shuntd("-r", str(empty), "--log-dir", str(tmp_path)), "empty.pcap")


def test_truncated_trace_keeps_what_was_read(tmp_path: Path) -> None:
    good = _trace(tmp_path)
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(good.read_bytes()[:-7])        # last record cut in the middle
    out = tmp_path / "logs"
    res = _shuntd("-r", str(cut), "--log-dir", str(out))
    _assert_clean_error(res, "cut.pcap")
    rows = [x for x in (out / "conn.log").read_text().splitlines() if not x.startswith("#")]
    assert len(rows) == 1                          # the SYNs read before the cut: one conn


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None,
                    reason="needs root and runuser to drop to nobody")
def test_unreadable_trace(tmp_path: Path) -> None:
    good = _trace(tmp_path)
    good.chmod(0o600)                              # root's, not nobody's
    logs = tmp_path / "logs"
    logs.mkdir()
    logs.chmod(0o777)
    tmp_path.chmod(0o755)
    res = _shuntd("-r", str(good), "--log-dir", str(logs), user="nobody", cwd=logs)
    _assert_clean_error(res, "ok.pcap")


def test_unwritable_log_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _shuntd("-r", str(_trace(tmp_path)), "--log-dir", str(blocker / "sub"))
    _assert_clean_error(res, "cannot write logs")


@pytest.mark.parametrize("args,word", [
    (["--log-format", "xml"], "--log-format"),
    (["--tcp-inactivity-timeout", "soon"], "--tcp-inactivity-timeout"),
    (["--udp-inactivity-timeout", "-5"], "--udp-inactivity-timeout"),
    (["--icmp-inactivity-timeout", "nan"], "--icmp-inactivity-timeout"),
    (["--port-inactivity-timeouts", "22=x"], "--port-inactivity-timeouts"),
    (["--likely-tcp-ports", "70000"], "--likely-tcp-ports"),
    (["--no-such-flag"], "no-such-flag"),
])
def test_bad_option_values(tmp_path: Path, args: list[str], word: str) -> None:
    res = _shuntd("-r", str(_trace(tmp_path)), "--log-dir", str(tmp_path), *args)
    _assert_clean_error(res, word)
    assert res.returncode == 2
    assert not (tmp_path / "conn.log").exists()


def test_bad_local_nets(tmp_path: Path) -> None:
    res = _shuntd("-r", str(_trace(tmp_path)), "--log-dir", str(tmp_path),
                  "--local-nets", "10.0.0.0/33")
    _assert_clean_error(res, "10.0.0.0/33")


# --------------------------------------------------------------------------------------------
# policy files and the datapath, through their loaders in a subprocess

_LOAD_POLICY = """
import sys
from shuntd.policyfile import PolicyLoadError, load
try:
    load(sys.argv[1], ["connection_established"])
except PolicyLoadError as exc:
    print(f"shuntd: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def _load_policy(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-c", _LOAD_POLICY, str(path)], capture_output=True,
                          text=True, timeout=60)


def test_policy_with_syntax_error(tmp_path: Path) -> None:
    p = tmp_path / "broken.py"
    p.write_text("def connection_established(c):\n    return (\n")
    p.chmod(0o644)
    res = _load_policy(p)
    _assert_clean_error(res, "broken.py", "line")


def test_world_writable_policy(tmp_path: Path) -> None:
    p = tmp_path / "open.py"
    p.write_text("def connection_established(c):\n    pass\n")
    p.chmod(0o666)
    assert p.stat().st_mode & stat.S_IWOTH
    _assert_clean_error(_load_policy(p), "open.py")


def test_missing_policy(tmp_path: Path) -> None:
    _assert_clean_error(_load_policy(tmp_path / "gone.py"), "gone.py")


def _policy(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    p.chmod(0o644)
    return p


def test_bad_early_shunt_declarations(tmp_path: Path) -> None:
    """EARLY_SHUNT must name a trigger, come with an ssl_established, and agree between files
    (`shuntd --check-config`: one line, exit 2); the shipped tls policy's passes."""
    shunts = ("from shuntd.policy import shunt\n\n"
              "def ssl_established(conn):\n    shunt(conn, 'ssl')\n")
    not_str = _policy(tmp_path, "num.py", "EARLY_SHUNT = 5\n" + shunts)
    res = _shuntd("--check-config", "--policy", str(not_str))
    _assert_clean_error(res, "num.py", "EARLY_SHUNT")
    no_handler = _policy(tmp_path, "bare.py", "EARLY_SHUNT = 'ssl'\n")
    res = _shuntd("--check-config", "--policy", str(no_handler))
    _assert_clean_error(res, "bare.py", "ssl_established")
    other = _policy(tmp_path, "other.py", "EARLY_SHUNT = 'mine'\n" + shunts)
    res = _shuntd("--check-config", "--policy", "tls",
                  "--policy", str(other))
    _assert_clean_error(res, "different EARLY_SHUNT", "other.py")
    res = _shuntd("--check-config", "--policy", "tls",
                  "--policy", "bulk")
    assert res.returncode == 0, res.stderr


_OPEN_DATAPATH = """
import sys
from shuntd.datapath.errors import DatapathError
from shuntd.datapath.loader import open_datapath
try:
    open_datapath("lo", pin=False)
except DatapathError as exc:
    print(f"shuntd: {exc}", file=sys.stderr)
    sys.exit(2)
print("shuntd: loaded the datapath without privileges?", file=sys.stderr)
sys.exit(3)
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None,
                    reason="needs root and runuser to drop to nobody")
def test_datapath_as_nobody(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    res = subprocess.run(["runuser", "-u", "nobody", "--", PYTHON, "-c", _OPEN_DATAPATH],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    _assert_clean_error(res)
    assert res.returncode == 2, res.stderr
    msg = res.stderr.lower()
    assert "root" in msg or "cap_" in msg or "privilege" in msg or "permission" in msg, msg
