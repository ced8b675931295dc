"""Lays out a development NBD server under one folder (the embedded default uses var/nbd).

Production installs the same pieces by hand or by package: /etc/oma/nbd-helper.conf (root-owned),
the nbd-server config with ``includedir``, and a systemd unit (see deploy/).
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exports.nbd_servers import HEALTH_EXPORT


@dataclass(frozen=True)
class DevServerLayout:
    root: Path
    backend: str
    host: str
    port: int

    @property
    def helper_config(self) -> Path:
        return self.root / "helper.conf"

    @property
    def server_config(self) -> Path:
        return self.root / "nbd-server.conf"

    @property
    def confd(self) -> Path:
        return self.root / "conf.d"

    @property
    def export_root(self) -> Path:
        return self.root / "exports"

    @property
    def volume_root(self) -> Path:
        return self.root / "volumes"

    @property
    def state_dir(self) -> Path:
        return self.root / "portal"

    @property
    def pidfile(self) -> Path:
        return self.root / "server.pid"

    def settings(self, helper_command: list[str], min_reload_spacing: float = 1.0) -> dict[str, Any]:
        """The OMA_NBD settings that point the portal at this layout."""
        return {
            "BACKEND": self.backend,
            "HOST": self.host,
            "PORT": self.port,
            "HELPER_COMMAND": helper_command,
            "HELPER_CONFIG": str(self.helper_config),
            "EXPORT_ROOT": str(self.export_root),
            "STATE_DIR": str(self.state_dir),
            "MIN_RELOAD_SPACING": min_reload_spacing,
            "SERVE_TIMEOUT": 15.0,
            "NODE": "local",
        }


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="ascii")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_layout(root: Path, backend: str, host: str, port: int) -> DevServerLayout:
    """Create the folders and write the helper and nbd-server configs (dev mode: volumes are files)."""
    layout = DevServerLayout(root.resolve(), backend, host, port)
    for folder in (layout.root, layout.confd, layout.export_root, layout.volume_root, layout.state_dir):
        folder.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("nbdkit" if backend == "nbdkit" else "nbd-server") or f"/usr/bin/{backend}"
    _write(
        layout.helper_config,
        "[helper]\n"
        f"backend = {backend}\n"
        f"export_root = {layout.export_root}\n"
        f"confd = {layout.confd}\n"
        f"server_config = {layout.server_config}\n"
        f"server_exe = {exe}\n"
        f"pidfile = {layout.pidfile}\n"
        f"lock_file = {layout.root / 'helper.lock'}\n"
        f"listen_address = {host}\n"
        f"port = {port}\n"
        f"dev_volume_root = {layout.volume_root}\n",
    )
    # nbd-server refuses to start with no export at all: a tiny read-only probe export keeps it up.
    probe = layout.root / "health-probe.img"
    if not probe.exists():
        probe.write_bytes(bytes(4096))
    # Never maxconnections: nbd-server counts it over the server's lifetime, not concurrently.
    _write(
        layout.server_config,
        "[generic]\n"
        f"    listenaddr = {host}\n"
        f"    port = {port}\n"
        "    allowlist = true\n"
        f"    includedir = {layout.confd}\n"
        f"[{HEALTH_EXPORT}]\n"
        f"    exportname = {probe}\n"
        "    readonly = true\n",
    )
    return layout
