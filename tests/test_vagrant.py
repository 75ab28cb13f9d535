"""The Vagrant lab's Vagrantfile passes `vagrant validate` (Debian's vagrant package)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

VAGRANTFILE = Path(__file__).resolve().parents[1] / "Vagrantfile"


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant not installed")
def test_vagrantfile_validates(tmp_path: Path) -> None:
    # Validate a copy so vagrant's .vagrant/ state lands in a temporary directory. No VM
    # provider (VirtualBox, libvirt) is installed on CI, so provider blocks are not checked.
    shutil.copy(VAGRANTFILE, tmp_path / "Vagrantfile")
    env = dict(os.environ, VAGRANT_CWD=str(tmp_path), VAGRANT_CHECKPOINT_DISABLE="1")
    proc = subprocess.run(
        ["vagrant", "validate", "--ignore-provider"],
        capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "validated successfully" in proc.stdout


def test_vagrant_provisions_with_the_install_step() -> None:
    text = VAGRANTFILE.read_text()
    assert "scripts/install-deps" in text
