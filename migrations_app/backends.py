"""Builds the configured volume backend and VMA client from settings (one place, so tests swap settings)."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from .cloudstack import CloudStackVolumeBackend
from .vma_client import VmaClient
from .volumes import LocalVolumeBackend, VolumeBackend


def volume_settings() -> dict[str, Any]:
    conf: dict[str, Any] = settings.OMA_VOLUMES
    return conf


def vma_settings() -> dict[str, Any]:
    conf: dict[str, Any] = settings.OMA_VMA
    return conf


def workflow_settings() -> dict[str, Any]:
    conf: dict[str, Any] = settings.OMA_WORKFLOW
    return conf


def get_volume_backend() -> VolumeBackend:
    conf = volume_settings()
    if conf["BACKEND"] == "local":
        return LocalVolumeBackend(conf["ROOT"], loop=bool(conf.get("LOOP")))
    if conf["BACKEND"] == "cloudstack":
        cs = conf["CLOUDSTACK"]
        return CloudStackVolumeBackend(
            endpoint=cs["ENDPOINT"],
            key=cs["KEY"],
            secret=cs["SECRET"],
            zone_id=cs["ZONE_ID"],
            disk_offering_id=cs["DISK_OFFERING_ID"],
            oma_vm_id=cs["OMA_VM_ID"],
            job_timeout=int(cs["JOB_TIMEOUT"]),
            poll_interval=float(cs.get("POLL_INTERVAL", 2.0)),
            device_root=str(cs.get("DEVICE_ROOT", "/dev/disk/by-id")),
        )
    raise ValueError(f"OMA_VOLUMES BACKEND must be local or cloudstack, got {conf['BACKEND']!r}")


def get_vma_client() -> VmaClient:
    conf = vma_settings()
    return VmaClient(conf["URL"], conf["TOKEN"], timeout=float(conf["TIMEOUT"]), retries=int(conf["RETRIES"]))
