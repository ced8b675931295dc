"""Lays out a development NBD server under one folder (the embedded default uses var/nbd).

Production installs the same pieces by hand or by package: /etc/oma/nbd-helper.conf (root-owned),
the nbd-server config with ``includedir``, and a systemd unit (see deploy/).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exports.nbd_protocol import TlsX509
from exports.nbd_servers import HEALTH_EXPORT


@dataclass(frozen=True)
class DevServerLayout:
    root: Path
    backend: str
    host: str
    port: int
    tls: bool = False  # nbdkit: --tls=require with pre-shared keys; nbd-server: force_tls with certificates
    # Volumes shared with other nodes (as a zone's volumes are): by default this layout's own folder.
    shared_volume_root: Path | None = None

    @property
    def psk_file(self) -> Path:
        """The server's key file: every client identity and its key (the helper's psk-* verbs edit it)."""
        return self.root / "nbd.psk"

    @property
    def portal_psk_file(self) -> Path:
        """The portal's own key (its health probes and verification reads)."""
        return self.root / "portal.psk"

    @property
    def vma_psk_file(self) -> Path:
        """The simulated VMA's key, as an operator would install it on a VMA."""
        return self.root / "vma.psk"

    @property
    def x509_dir(self) -> Path:
        """nbd-server: the server's key and certificate and its trusted client certificates (cert-* verbs)."""
        return self.root / "nbd-x509"

    @property
    def portal_tls(self) -> Path:
        """The portal's credentials: its key file (nbdkit) or its certificate folder (nbd-server)."""
        return self.portal_psk_file if self.backend == "nbdkit" else self.root / "portal-x509"

    @property
    def vma_tls(self) -> Path:
        """The simulated VMA's credentials, as an operator installs them on a VMA: a key file or a folder
        with ca-cert.pem, client-cert.pem and client-key.pem (libnbd's tls-certificates)."""
        return self.vma_psk_file if self.backend == "nbdkit" else self.root / "vma-x509"

    def settings_env(self) -> dict[str, str]:
        """The OMA_NBD_TLS_* environment that gives the portal its credentials for this layout."""
        tls = self.tls
        return {
            "OMA_NBD_TLS_PSK_FILE": str(self.portal_tls) if tls and self.backend == "nbdkit" else "",
            "OMA_NBD_TLS_CERT_DIR": str(self.portal_tls) if tls and self.backend != "nbdkit" else "",
        }

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
        return self.shared_volume_root or self.root / "volumes"

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
            "TLS_PSK_FILE": str(self.portal_psk_file) if self.tls and self.backend == "nbdkit" else "",
            "TLS_CERT_DIR": str(self.portal_tls) if self.tls and self.backend != "nbdkit" else "",
            "TLS_IDENTITY": PORTAL_IDENTITY,
        }

    def vma_settings(self) -> dict[str, Any]:
        """The OMA_VMA keys that hand the VMA URLs for this layout."""
        return {"NBD_HOST": self.host, "NBD_PORT": self.port, "NBD_TLS": self.tls, "NBD_IDENTITY": VMA_IDENTITY}


def libnbd_tls_query(credentials: Path) -> str:
    """The libnbd URI query that presents these credentials: a key file or a certificate folder."""
    return f"tls-{'certificates' if credentials.is_dir() else 'psk-file'}={credentials}"


PORTAL_IDENTITY = "oma-portal"
VMA_IDENTITY = "vma"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


TLS_PRIORITY_FILE = Path(__file__).resolve().parent.parent / "deploy" / "etc" / "nbd-tls-priority.conf"


def cpu_has_aes() -> bool:
    """Whether the CPU has AES instructions (x86 and arm64 both list the flag as ``aes``), as
    deploy/install.sh decides whether to install the server's TLS priority file."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return "aes" in value.split()
    except OSError:
        pass
    return False


def _write_keys(layout: DevServerLayout) -> None:
    """Keys for the portal and the simulated VMA, kept across runs: the server's file and one client file
    each (psktool's format), readable by their owner only."""
    keys: dict[str, str] = {}
    if layout.psk_file.exists():
        for line in layout.psk_file.read_text(encoding="ascii").splitlines():
            identity, _, key = line.partition(":")
            keys[identity] = key
    for identity, client_file in ((PORTAL_IDENTITY, layout.portal_psk_file), (VMA_IDENTITY, layout.vma_psk_file)):
        keys.setdefault(identity, secrets.token_hex(32))
        _write(client_file, f"{identity}:{keys[identity]}\n", mode=0o600)
    _write(layout.psk_file, "".join(f"{i}:{k}\n" for i, k in sorted(keys.items())), mode=0o600)


def _helper(layout: DevServerLayout, *args: str) -> dict[str, Any]:
    helper = Path(__file__).resolve().parent.parent / "deploy" / "oma-nbd-helper"
    env = {**os.environ, "OMA_NBD_HELPER_CONFIG": str(layout.helper_config)}
    done = subprocess.run(  # noqa: S603 - this Python, this project's helper
        [sys.executable, "-IS", str(helper), *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    reply: dict[str, Any] = json.loads(done.stdout or "{}")
    if done.returncode != 0 or not reply.get("ok"):
        raise RuntimeError(f"oma-nbd-helper {args[0]} failed: {reply.get('message') or done.stderr.strip()}")
    return reply


def _write_certs(layout: DevServerLayout) -> None:
    """Certificates for the portal and the simulated VMA, kept across runs while the server trusts them."""
    listed = _helper(layout, "cert-list")
    for identity, folder in ((PORTAL_IDENTITY, layout.portal_tls), (VMA_IDENTITY, layout.vma_tls)):
        ca = folder / "ca-cert.pem"
        current = (
            identity in listed["identities"]
            and (folder / "client-key.pem").exists()
            and ca.exists()
            and ca.read_text(encoding="ascii") == listed["server_certificate"]
        )
        if not current:
            verb = "cert-rotate" if identity in listed["identities"] else "cert-add"
            reply = _helper(layout, verb, identity)
            TlsX509.save(folder, reply["certificate"], reply["key"], reply["server_certificate"])


def write_layout(
    root: Path, backend: str, host: str, port: int, tls: bool = True, volume_root: Path | None = None
) -> DevServerLayout:
    """Create the folders and write the helper and nbd-server configs (dev mode: volumes are files).
    TLS (the default) adds the credentials: pre-shared keys with nbdkit, certificates with nbd-server.
    ``volume_root``: volumes shared with other OMA nodes' layouts (each node then links its devices in
    its own folder)."""
    shared = volume_root.resolve() if volume_root else None
    layout = DevServerLayout(root.resolve(), backend, host, port, tls, shared)
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
        f"dev_volume_root = {layout.volume_root}\n"
        + (f"tls_psk_file = {layout.psk_file}\n" if tls and backend == "nbdkit" else "")
        + (f"tls_x509_dir = {layout.x509_dir}\n" if tls and backend != "nbdkit" else "")
        + (f"tls_priority_file = {TLS_PRIORITY_FILE}\n" if tls and cpu_has_aes() else ""),
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
        + (
            f"    certfile = {layout.x509_dir / 'server-cert.pem'}\n"
            f"    keyfile = {layout.x509_dir / 'server-key.pem'}\n"
            f"    cacertfile = {layout.x509_dir / 'clients.pem'}\n"
            "    force_tls = true\n"
            if tls and backend != "nbdkit"
            else ""
        )
        + f"[{HEALTH_EXPORT}]\n"
        f"    exportname = {probe}\n"
        "    readonly = true\n",
    )
    if tls:
        _write_keys(layout) if backend == "nbdkit" else _write_certs(layout)
    return layout
