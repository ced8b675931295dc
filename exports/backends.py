"""Builds the configured NBD server backend from the typed settings (one place, so tests swap settings)."""

from __future__ import annotations

from typing import Any

from .conf import nbd_conf
from .helper_client import SubprocessHelper
from .nbd_servers import NbdBackend, NbdkitBackend, NbdServerBackend


def get_backend() -> NbdBackend:
    conf = nbd_conf()
    helper = SubprocessHelper(conf.helper_command, conf.helper_config)
    common: dict[str, Any] = {"tls": conf.tls, "encrypted": conf.tls_on}
    if conf.backend == "nbd-server":
        return NbdServerBackend(
            helper,
            conf.host,
            conf.port,
            conf.export_root,
            conf.state_dir,
            min_spacing=conf.min_reload_spacing,
            **common,
        )
    return NbdkitBackend(helper, conf.host, conf.port, conf.export_root, conf.state_dir, **common)
