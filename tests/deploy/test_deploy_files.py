"""The files an installer copies to a production OMA are valid and agree with the helper."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.nbd import REPO, load_helper_module

DEPLOY = REPO / "deploy"


def test_sudoers_file_passes_visudo() -> None:
    visudo = shutil.which("visudo") or "/usr/sbin/visudo"
    if not Path(visudo).exists():
        pytest.skip("visudo is not installed (Debian package sudo)")
    proc = subprocess.run([visudo, "-cf", str(DEPLOY / "sudoers.d" / "oma-nbd-helper")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sudoers_allows_only_the_helper_path() -> None:
    rules = [
        line
        for line in (DEPLOY / "sudoers.d" / "oma-nbd-helper").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "Defaults"))
    ]
    assert rules == ["oma ALL=(root) NOPASSWD: /usr/local/libexec/oma/oma-nbd-helper"]


def test_example_helper_config_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    helper = load_helper_module()
    config_file = tmp_path / "nbd-helper.conf"
    shutil.copy(DEPLOY / "etc" / "nbd-helper.conf", config_file)
    config_file.chmod(0o644)
    monkeypatch.setenv("OMA_NBD_HELPER_CONFIG", str(config_file))
    config = helper.load_config()
    assert config.backend == "nbdkit" and config.dev_volume_root is None
    assert str(config.export_root) == "/var/lib/oma/nbd/exports"


@pytest.mark.parametrize(
    ("unit", "backend"), [("oma-nbdkit.service", "nbdkit"), ("oma-nbd-server.service", "nbd-server")]
)
def test_systemd_units_start_the_server_the_way_the_helper_verifies_it(
    unit: str, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    helper = load_helper_module()
    config_file = tmp_path / "nbd-helper.conf"
    text = (DEPLOY / "etc" / "nbd-helper.conf").read_text().replace("backend = nbdkit", f"backend = {backend}")
    if backend == "nbd-server":  # no pre-shared keys there
        text = text.replace("tls_psk_file = ", "# tls_psk_file = ").replace("tls_group = ", "# tls_group = ")
    config_file.write_text(text)
    monkeypatch.setenv("OMA_NBD_HELPER_CONFIG", str(config_file))
    argv = helper._server_argv(helper.load_config())
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read(DEPLOY / "systemd" / unit)
    assert parser["Service"]["ExecStart"].split() == argv
    assert parser["Service"]["PIDFile"] == "/run/oma-nbd/server.pid"
    if backend == "nbd-server":
        assert parser["Service"]["KillMode"] == "process", "children must outlive a main restart"


def test_nbd_server_example_config_never_sets_maxconnections() -> None:
    text = (DEPLOY / "etc" / "nbd-server.config").read_text()
    assert "maxconnections" not in text.replace("Never set maxconnections", "")
    assert "includedir = /etc/nbd-server/conf.d" in text


def production_env(tmp_path: Path) -> dict[str, str]:
    """The shipped production environment file, with this machine's paths for what must exist."""
    env: dict[str, str] = {}
    for line in (DEPLOY / "etc" / "portal.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    env["OMA_VAR_DIR"] = str(tmp_path / "var")
    env.pop("DATABASE_URL")  # checking needs no database
    return env


def test_check_deploy_is_clean_with_the_production_environment(tmp_path: Path) -> None:
    import os
    import sys

    env = {"PATH": os.environ["PATH"], **production_env(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "DEBUG"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and "no issues" in proc.stdout, proc.stdout + proc.stderr
    # The secret key was made for this installation, readable by its owner only; none is shipped.
    key_file = tmp_path / "var" / "secret_key"
    assert key_file.stat().st_mode & 0o077 == 0 and len(key_file.read_text().strip()) >= 50
    assert "SECRET_KEY" not in (DEPLOY / "etc" / "portal.env").read_text().replace("DJANGO_SECRET_KEY only", "")


def test_debug_is_off_unless_asked(tmp_path: Path) -> None:
    import os
    import sys

    code = "from django.conf import settings; print(settings.DEBUG)"
    base = {"PATH": os.environ["PATH"], "OMA_VAR_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "omaportal.settings"}
    for extra, expected in (({}, "False"), ({"DJANGO_DEBUG": "1"}, "True")):
        out = subprocess.run(
            [sys.executable, "-c", f"import django; django.setup(); {code}"],
            capture_output=True, text=True, cwd=REPO, env={**base, **extra}, timeout=60, check=True,
        )  # fmt: skip
        assert out.stdout.strip() == expected
