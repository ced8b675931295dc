"""Builds the configured NBD server backend from settings (one place, so tests can swap settings)."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from .helper_client import SubprocessHelper
from .nbd_servers import NbdBackend, NbdkitBackend, NbdServerBackend

BACKEND_NAMES = ("nbdkit", "nbd-server")


def nbd_settings() -> dict[str, Any]:
    conf: dict[str, Any] = settings.OMA_NBD
    return conf


def get_backend() -> NbdBackend:
    conf = nbd_settings()
    helper = SubprocessHelper(conf["HELPER_COMMAND"], conf.get("HELPER_CONFIG"))
    common = {
        "host": conf["HOST"],
        "port": int(conf["PORT"]),
        "export_root": conf["EXPORT_ROOT"],
        "state_dir": conf["STATE_DIR"],
    }
    if conf["BACKEND"] == "nbdkit":
        return NbdkitBackend(helper, **common)
    if conf["BACKEND"] == "nbd-server":
        return NbdServerBackend(helper, min_spacing=float(conf["MIN_RELOAD_SPACING"]), **common)
    raise ValueError(f"OMA_NBD BACKEND must be one of {BACKEND_NAMES}, got {conf['BACKEND']!r}")
