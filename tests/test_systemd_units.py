"""The systemd units pass systemd's own checks: `verify`, and `security` exposure <= 4.0."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parents[1] / "systemd"
UNITS = sorted(UNIT_DIR.glob("*.service"))
EXPOSURE_LIMIT = 4.0

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


def _installed_copy(unit: Path, tmp_path: Path) -> Path:
    """The unit as `make install` would place it: ExecStart pointing at this venv's shuntd."""
    shuntd = Path(sys.prefix) / "bin" / "shuntd"
    assert shuntd.exists(), "the shuntd console script is not installed in this environment"
    text = unit.read_text().replace("/usr/local/bin/shuntd", str(shuntd))
    out = tmp_path / unit.name
    out.write_text(text)
    return out


def test_units_exist() -> None:
    assert any(u.name == "shuntd@.service" for u in UNITS)


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_verifies(unit: Path, tmp_path: Path) -> None:
    copy = _installed_copy(unit, tmp_path)
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_security_exposure(unit: Path, tmp_path: Path) -> None:
    copy = _installed_copy(unit, tmp_path)
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(copy)],
        capture_output=True, text=True, timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout + proc.stderr)
    assert match, proc.stdout + proc.stderr
    exposure = float(match.group(1))
    print(f"{unit.name}: systemd-analyze security exposure {exposure}")
    assert exposure <= EXPOSURE_LIMIT
