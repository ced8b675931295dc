"""Typed settings: read once, checked, and read again when the setting changes."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured

from exports.conf import nbd_conf
from migrations_app.conf import volume_conf, workflow_conf


def test_settings_are_read_once_and_again_after_a_change(settings: object) -> None:
    first = nbd_conf()
    assert nbd_conf() is first
    settings.OMA_NBD = {**settings.OMA_NBD, "PORT": 12345}  # type: ignore[attr-defined]
    assert nbd_conf() is not first and nbd_conf().port == 12345 and nbd_conf().address.endswith(":12345")
    settings.OMA_WORKFLOW = {**settings.OMA_WORKFLOW, "MAX_ACTIVE_JOBS": "7"}  # type: ignore[attr-defined]
    assert workflow_conf().max_active_jobs == 7


def test_an_unknown_backend_is_a_configuration_error(settings: object) -> None:
    settings.OMA_NBD = {**settings.OMA_NBD, "BACKEND": "nbd-sever"}  # type: ignore[attr-defined]
    with pytest.raises(ImproperlyConfigured, match="nbd-sever"):
        nbd_conf()
    settings.OMA_VOLUMES = {**settings.OMA_VOLUMES, "BACKEND": "ceph"}  # type: ignore[attr-defined]
    with pytest.raises(ImproperlyConfigured, match="ceph"):
        volume_conf()
