"""Fixtures of the export tests: an unmounted loop device, for the helper's block-device rules."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def loop_device(tmp_path: Path) -> object:
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("loop devices need root and losetup")
    image = tmp_path / "loop.img"
    image.write_bytes(bytes(8 << 20))
    proc = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"losetup failed here: {proc.stderr.strip()}")
    device = proc.stdout.strip()
    yield device
    subprocess.run(["umount", device], capture_output=True, check=False)
    subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
