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
            env[key] = value.strip('"')  # as systemd's EnvironmentFile= and bash read it
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


UNITS = sorted(p.name for p in (DEPLOY / "systemd").glob("*.service"))
HELPER_INSTALLED = "/usr/local/libexec/oma/oma-nbd-helper"


def unit_for_here(unit: str, tmp_path: Path) -> Path:
    """The unit with the install prefix and the helper pointed at this checkout (verify checks that
    every program it runs exists)."""
    text = (DEPLOY / "systemd" / unit).read_text()
    text = text.replace("/opt/oma", str(REPO)).replace(HELPER_INSTALLED, str(DEPLOY / "oma-nbd-helper"))
    path = tmp_path / unit
    path.write_text(text)
    return path


@pytest.mark.parametrize("unit", UNITS)
def test_every_unit_passes_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    import os

    for other in UNITS:  # its dependencies (Requires=, After=) resolve among the shipped units
        unit_for_here(other, tmp_path)
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / unit)],
        capture_output=True, text=True, check=False, env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
    )  # fmt: skip
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_every_unit_scores_4_or_below_in_systemd_analyze_security(unit: str, tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit_for_here(unit, tmp_path))],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    import re

    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout)
    assert match, proc.stdout[-500:] + proc.stderr
    assert float(match[1]) <= 4.0, f"{unit} scores {match[1]}"


def test_the_nginx_site_passes_nginx_t(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists() or not shutil.which("openssl"):
        pytest.skip("nginx or openssl is not installed")
    cert, key = tmp_path / "portal.crt", tmp_path / "portal.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=oma",
         "-keyout", str(key), "-out", str(cert)],
        capture_output=True, check=True,
    )  # fmt: skip
    site = (DEPLOY / "nginx" / "oma.conf").read_text()
    site = site.replace("/etc/oma/tls/portal.crt", str(cert)).replace("/etc/oma/tls/portal.key", str(key))
    (tmp_path / "site.conf").write_text(site)
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{ access_log off; include {tmp_path}/site.conf; }}\n"
    )
    proc = subprocess.run([nginx, "-t", "-c", str(main)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Upgrade $http_upgrade" in site and "/var/lib/oma/staticfiles/" in site


def test_install_lays_out_every_file_with_its_mode(tmp_path: Path) -> None:
    import os
    import stat

    if os.geteuid() != 0:
        pytest.skip("install.sh runs as root")
    root = tmp_path / "root"
    proc = subprocess.run(
        ["bash", str(DEPLOY / "install.sh"), "--files-only", "--root", str(root)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    modes = {
        "usr/local/libexec/oma/oma-nbd-helper": 0o755,
        "usr/local/libexec/oma/oma_nbd_helper.py": 0o644,
        "etc/oma/nbd-helper.conf": 0o644,
        "etc/sudoers.d/oma-nbd-helper": 0o440,
        "etc/oma/portal.env": 0o600,
        "etc/oma": 0o750,
        "etc/tmpfiles.d/oma.conf": 0o644,
        "etc/udev/rules.d/60-oma-nbd.rules": 0o644,
        "etc/nginx/sites-available/oma.conf": 0o644,
        **{f"etc/systemd/system/{unit}": 0o644 for unit in UNITS},
    }
    for path, mode in modes.items():
        assert stat.S_IMODE((root / path).stat().st_mode) == mode, path
    libexec = root / "usr/local/libexec/oma"
    assert (libexec / "oma-nbd-helper").read_bytes() == (DEPLOY / "oma-nbd-helper").read_bytes()
    assert (libexec / "oma_nbd_helper.py").read_bytes() == (DEPLOY / "oma_nbd_helper.py").read_bytes()
    # Compiled at install, by the system's Python (the one the program's first line names).
    assert list((libexec / "__pycache__").glob("oma_nbd_helper.cpython-*.pyc")), "the module was not compiled"
    assert (root / "opt/oma/manage.py").exists() and not (root / "opt/oma/.git").exists()
    assert os.readlink(root / "etc/nginx/sites-enabled/oma.conf") == "../sites-available/oma.conf"
    # Run again (an upgrade): an edited config and environment are kept.
    (root / "etc/oma/portal.env").write_text("OMA_NODE_NAME=edited\n")
    again = subprocess.run(
        ["bash", str(DEPLOY / "install.sh"), "--files-only", "--root", str(root)], capture_output=True, check=False
    )
    assert again.returncode == 0 and (root / "etc/oma/portal.env").read_text() == "OMA_NODE_NAME=edited\n"
    # --root alone would half-install a system: refused.
    assert (
        subprocess.run(["bash", str(DEPLOY / "install.sh"), "--root", str(root)], capture_output=True).returncode == 2
    )
