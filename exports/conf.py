"""The NBD side's settings, read once from ``settings.OMA_NBD`` into a frozen dataclass (django-q2's
``Conf`` does the same). Read again only when a test changes the setting."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver

from .nbd_protocol import Tls, TlsPsk, TlsX509

BACKENDS = ("nbdkit", "nbd-server")


@dataclass(frozen=True)
class NbdConf:
    backend: str  # "nbdkit" (default, zero reloads) or "nbd-server" (conf.d + coalesced SIGHUP reloads)
    host: str
    port: int
    # Production: sudo -n /usr/local/libexec/oma/oma-nbd-helper. Dev runs the same program directly.
    helper_command: tuple[str, ...]
    # Passed to the helper only in dev mode (the helper ignores it under sudo).
    helper_config: str | None
    export_root: str  # the link folder (read-only for the portal)
    state_dir: str
    # Minimum seconds between two SIGHUPs to nbd-server (3.24 corrupts memory on rapid reloads).
    min_reload_spacing: float
    # How long a new export may take to appear before ensure_export gives up.
    serve_timeout: float
    node: str  # this OMA node's name (OMA_NODE_NAME)
    tls_psk_file: str | None  # nbdkit: the portal's own NBD TLS key file
    tls_identity: str
    # nbd-server: the portal's own certificate folder (ca-cert.pem, client-cert.pem, client-key.pem).
    # Neither set: the server speaks plain NBD.
    tls_cert_dir: str | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def tls_on(self) -> bool:
        return bool(self.tls_psk_file or self.tls_cert_dir)

    def tls(self) -> Tls | None:
        """The portal's credentials, read at each call (a rotation takes effect without a restart)."""
        if self.tls_cert_dir:
            return TlsX509.from_dir(self.tls_cert_dir, self.tls_identity)
        return TlsPsk.from_file(self.tls_psk_file, self.tls_identity) if self.tls_psk_file else None


def _build(raw: dict[str, Any]) -> NbdConf:
    backend = str(raw["BACKEND"])
    if backend not in BACKENDS:
        raise ImproperlyConfigured(f"OMA_NBD BACKEND must be one of {BACKENDS}, got {backend!r}")
    if raw.get("TLS_PSK_FILE") and backend != "nbdkit":
        raise ImproperlyConfigured("OMA_NBD TLS_PSK_FILE is for nbdkit; nbd-server takes TLS_CERT_DIR")
    if raw.get("TLS_CERT_DIR") and backend != "nbd-server":
        raise ImproperlyConfigured("OMA_NBD TLS_CERT_DIR is for nbd-server; nbdkit takes TLS_PSK_FILE")
    return NbdConf(
        backend=backend,
        host=str(raw["HOST"]),
        port=int(raw["PORT"]),
        helper_command=tuple(str(part) for part in raw["HELPER_COMMAND"]),
        helper_config=str(raw["HELPER_CONFIG"]) if raw.get("HELPER_CONFIG") else None,
        export_root=str(raw["EXPORT_ROOT"]),
        state_dir=str(raw["STATE_DIR"]),
        min_reload_spacing=float(raw.get("MIN_RELOAD_SPACING", 2.0)),
        serve_timeout=float(raw.get("SERVE_TIMEOUT", 15.0)),
        node=str(raw.get("NODE", "local")),
        tls_psk_file=str(raw["TLS_PSK_FILE"]) if raw.get("TLS_PSK_FILE") else None,
        tls_identity=str(raw.get("TLS_IDENTITY") or "oma-portal"),
        tls_cert_dir=str(raw["TLS_CERT_DIR"]) if raw.get("TLS_CERT_DIR") else None,
    )


@functools.cache
def nbd_conf() -> NbdConf:
    return _build(settings.OMA_NBD)


@receiver(setting_changed)
def _reread(setting: str, **kwargs: Any) -> None:
    if setting == "OMA_NBD":
        nbd_conf.cache_clear()
