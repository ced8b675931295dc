"""The helper through real ``sudo -n``, as the unprivileged portal user, with the shipped sudoers file:
installed the way the README says, exercised, then removed again. Needs root to install; skipped where
any of the production paths already exists (a real OMA is never touched)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nbd import REPO

HELPER_PATH = Path("/usr/local/libexec/oma/oma-nbd-helper")
MODULE_PATH = HELPER_PATH.with_name("oma_nbd_helper.py")
CONFIG_PATH = Path("/etc/oma/nbd-helper.conf")
SUDOERS_PATH = Path("/etc/sudoers.d/oma-nbd-helper")
USER = "oma"
NAME = "migration-vm-4210aaaa-bbbb-4ccc-8ddd-eeeeffff0000-disk0"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="installing the helper needs root")


@pytest.fixture
def installed(tmp_path: Path) -> Iterator[Path]:
    """The helper, its config and the sudoers file installed as in production, and a portal user."""
    if not (shutil.which("sudo") and shutil.which("visudo")):
        pytest.skip("sudo is not installed")
    if any(p.exists() for p in (HELPER_PATH, MODULE_PATH, CONFIG_PATH, SUDOERS_PATH)):
        pytest.skip("a helper is installed on this machine: not touching it")
    made_user = False
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True)
        made_user = True
    root = tmp_path / "oma"
    for sub in ("exports", "run"):
        (root / sub).mkdir(parents=True)
    root.chmod(0o755)
    tmp_path.chmod(0o755)
    made_dirs = [d for d in (HELPER_PATH.parent, CONFIG_PATH.parent) if not d.exists()]
    try:
        for folder in made_dirs:
            folder.mkdir(parents=True, mode=0o755)
        shutil.copy(REPO / "deploy" / "oma-nbd-helper", HELPER_PATH)
        HELPER_PATH.chmod(0o755)
        shutil.copy(REPO / "deploy" / "oma_nbd_helper.py", MODULE_PATH)
        MODULE_PATH.chmod(0o644)
        CONFIG_PATH.write_text(
            "[helper]\nbackend = nbdkit\n"
            f"export_root = {root / 'exports'}\npidfile = {root / 'run' / 'server.pid'}\n"
            f"lock_file = {root / 'run' / 'helper.lock'}\nport = 1\ndevice_prefixes = /dev/loop\n"
        )
        CONFIG_PATH.chmod(0o644)
        shutil.copy(REPO / "deploy" / "sudoers.d" / "oma-nbd-helper", SUDOERS_PATH)
        SUDOERS_PATH.chmod(0o440)
        subprocess.run(["visudo", "-cf", str(SUDOERS_PATH)], check=True, capture_output=True)
        yield root
    finally:
        for path in (SUDOERS_PATH, CONFIG_PATH, HELPER_PATH, MODULE_PATH):
            path.unlink(missing_ok=True)
        shutil.rmtree(HELPER_PATH.parent / "__pycache__", ignore_errors=True)
        for folder in reversed(made_dirs):
            shutil.rmtree(folder, ignore_errors=True)
        if made_user:
            subprocess.run(["userdel", USER], check=False)


def as_portal(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", **(env or {})}
    return subprocess.run(
        ["runuser", "-u", USER, "--", *argv], capture_output=True, text=True, env=base, timeout=60, check=False
    )


def test_the_portal_user_runs_the_helper_through_sudo_and_nothing_else(installed: Path, tmp_path: Path) -> None:
    status = as_portal("sudo", "-n", str(HELPER_PATH), "status")
    assert status.returncode == 0, status.stdout + status.stderr
    reply = json.loads(status.stdout)
    assert reply["ok"] and reply["export_root"] == str(installed / "exports")
    # The caller cannot point the helper at a config of its own: sudo's env_reset drops the variable.
    evil = tmp_path / "evil.conf"
    evil.write_text("[helper]\nexport_root = /etc\npidfile = /x\nlock_file = /x\n")
    evil.chmod(0o644)
    overridden = as_portal("sudo", "-n", str(HELPER_PATH), "status", env={"OMA_NBD_HELPER_CONFIG": str(evil)})
    assert json.loads(overridden.stdout)["export_root"] == str(installed / "exports")
    # Hostile input through sudo is refused and changes nothing.
    before = sorted(os.listdir(installed / "exports"))
    shadow = as_portal("sudo", "-n", str(HELPER_PATH), "link", NAME, "/etc/shadow")
    assert shadow.returncode == 3 and json.loads(shadow.stdout)["error"] == "device_not_allowed"
    assert sorted(os.listdir(installed / "exports")) == before
    # Nothing but the helper: a shell, or the helper's path with a different program behind it, is refused.
    assert as_portal("sudo", "-n", "/bin/sh", "-c", "id").returncode != 0
    assert as_portal("sudo", "-n", "/usr/bin/python3", str(HELPER_PATH), "status").returncode != 0
    # Without sudo the portal user can run the program, but not as root: it cannot write the links.
    direct = as_portal(str(HELPER_PATH), "link", NAME, "/dev/loop0")
    assert direct.returncode != 0 and sorted(os.listdir(installed / "exports")) == before
