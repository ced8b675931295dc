"""Real NBD servers for tests: a dev layout under a temporary folder, started through the real helper."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from devtools.devserver import VMA_IDENTITY, DevServerLayout, free_port, libnbd_tls_query, write_layout
from exports.nbd_protocol import NbdConnection, Tls, list_exports, tls_from_path

REPO = Path(__file__).resolve().parents[2]


# The program (as sudo runs it) and the module it imports, the helper itself.
HELPER = REPO / "deploy" / "oma-nbd-helper"
HELPER_MODULE = REPO / "deploy" / "oma_nbd_helper.py"


BACKENDS = ["nbdkit", "nbd-server"]


class RunningServer:
    """A started NBD server laid out under a temporary folder, plus the helper calls made so far."""

    def __init__(self, layout: DevServerLayout, call_log: Path) -> None:
        self.layout = layout
        self.call_log = call_log

    @property
    def backend(self) -> str:
        return self.layout.backend

    def helper(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return run_helper(self.layout, *args, env=env)

    def helper_calls(self) -> list[str]:
        if not self.call_log.exists():
            return []
        return self.call_log.read_text().split()

    def volume(self, name: str, size: int = 16 << 20, fill: bytes | None = None) -> str:
        path = self.layout.volume_root / name
        with open(path, "wb") as fh:
            fh.truncate(size)
            if fill:
                fh.write(fill)
        return str(path)

    def tls(self) -> Tls | None:
        """The portal's key when this server requires TLS (what a test's own client must present)."""
        return tls_from_path(self.layout.portal_tls) if self.layout.tls else None

    def list_exports(self) -> list[str]:
        return list_exports("127.0.0.1", self.layout.port, tls=self.tls())

    def connect(self) -> NbdConnection:
        return NbdConnection("127.0.0.1", self.layout.port, tls=self.tls())

    def url(self, name: str, identity: str = "oma-portal") -> str:
        """A libnbd URI for nbdcopy/nbdinfo: nbds:// with the portal's key file when TLS is on."""
        if not self.layout.tls:
            return f"nbd://127.0.0.1:{self.layout.port}/{name}"
        return f"nbds://{identity}@127.0.0.1:{self.layout.port}/{name}?{libnbd_tls_query(self.layout.portal_tls)}"

    def vma_url(self, name: str) -> str:
        """The URL the portal hands the VMA for export ``name``."""
        if not self.layout.tls:
            return f"nbd://127.0.0.1:{self.layout.port}/{name}"
        return f"nbds://{VMA_IDENTITY}@127.0.0.1:{self.layout.port}/{name}"

    def main_pid(self) -> int:
        return int(self.layout.pidfile.read_text().strip())

    def snapshot(self) -> dict[str, str]:
        """Every link and file under the export root and conf.d, plus the server and helper configs."""
        found: dict[str, str] = {
            str(path): path.read_text() for path in (self.layout.server_config, self.layout.helper_config)
        }
        for folder in (self.layout.export_root, self.layout.confd):
            for entry in sorted(folder.iterdir()):
                if entry.is_symlink():
                    found[str(entry)] = "-> " + os.readlink(entry)
                else:
                    found[str(entry)] = entry.read_text(errors="replace")
        return found


def run_helper(
    layout: DevServerLayout, *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "OMA_NBD_HELPER_CONFIG": str(layout.helper_config), **(env or {})}
    return subprocess.run(
        [sys.executable, "-IS", str(HELPER), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        check=False,
        input=stdin,
    )


def _counting_helper(tmp_path: Path) -> tuple[list[str], Path]:
    """The real helper behind a two-line wrapper that logs each verb, so tests can count helper calls."""
    log = tmp_path / "helper-calls.log"
    wrapper = tmp_path / "helper-wrapper.sh"
    wrapper.write_text(f'#!/bin/sh\necho "$1" >> "{log}"\nexec "{sys.executable}" -IS "{HELPER}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return [str(wrapper)], log


def _kill_layout_processes(layout: DevServerLayout) -> None:
    marker = str(layout.root)
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if marker in cmdline and proc.pid != os.getpid():
            with contextlib.suppress(psutil.Error):
                proc.kill()


def start_server(
    tmp_path: Path, backend: str, volume_root: Path | None = None
) -> tuple[DevServerLayout, list[str], Path]:
    layout = write_layout(tmp_path / "nbd", backend, "127.0.0.1", free_port(), volume_root=volume_root)
    command, log = _counting_helper(tmp_path)
    result = run_helper(layout, "start")
    assert result.returncode == 0, result.stdout + result.stderr
    return layout, command, log


def serve_nbd(tmp_path: Path, settings: object, backend: str) -> Iterator[RunningServer]:
    layout, command, log = start_server(tmp_path, backend)
    settings.OMA_NBD = layout.settings(command, min_reload_spacing=0.2)  # type: ignore[attr-defined]
    try:
        yield RunningServer(layout, log)
    finally:
        run_helper(layout, "stop")
        _kill_layout_processes(layout)


def load_helper_module() -> Any:
    spec = importlib.util.spec_from_file_location("oma_nbd_helper", HELPER_MODULE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run a program as the unprivileged 'nobody' account, with no supplementary groups."""
    cmd = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
