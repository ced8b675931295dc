"""The migration side's settings, read once from ``settings.OMA_VOLUMES``, ``OMA_VMA`` and
``OMA_WORKFLOW`` into frozen dataclasses (django-q2's ``Conf`` does the same). Read again only when a
test changes one of them."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver

VOLUME_BACKENDS = ("local", "cloudstack")


@dataclass(frozen=True)
class CloudStackConf:
    endpoint: str
    key: str
    secret: str
    zone_id: str
    disk_offering_id: str
    oma_vm_id: str  # the OMA's own CloudStack VM: volumes are attached to it
    job_timeout: int  # seconds an async job may take
    poll_interval: float
    device_root: str  # where the by-id device links appear
    owner: str  # the owner tag on every volume this portal creates; it touches no other volume
    hypervisor: str  # of the destination VMs (a root volume moves only on KVM, XenServer or VMware)


@dataclass(frozen=True)
class VolumeConf:
    backend: str  # "local" (sparse files under the helper's dev volume root) or "cloudstack"
    root: str
    loop: bool  # local volumes as loop devices (root only)
    # Where this node's by-id links appear ("": <root>/by-id). Nodes sharing one root each have their own.
    device_root: str
    cloudstack: CloudStackConf


@dataclass(frozen=True)
class VmaConf:
    url: str
    token: str
    timeout: float
    retries: int
    deadline: float  # seconds one call may take in all
    ca_file: str | None  # a private CA for an https VMA
    # The NBD address the VMA copies to (production: its end of the TLS tunnel).
    nbd_host: str
    nbd_port: int
    nbd_tls: bool  # hand the VMA nbds:// URLs (TLS with its pre-shared key)
    nbd_identity: str  # the PSK identity the VMA holds

    def nbd_url(self, export_name: str) -> str:
        if self.nbd_tls:
            return f"nbds://{self.nbd_identity}@{self.nbd_host}:{self.nbd_port}/{export_name}"
        return f"nbd://{self.nbd_host}:{self.nbd_port}/{export_name}"


@dataclass(frozen=True)
class WorkflowConf:
    max_active_jobs: int
    attach_slots: int  # volumes one node attaches at most (a KVM guest takes about 25 data disks)
    poll_interval: float  # seconds between two progress polls of the VMA
    heartbeat_stale_seconds: float  # a running job whose worker is silent this long is resumed by another
    step_retry_seconds: float  # the first back-off after an unexpected step error (doubling after)
    verify_writes: bool  # re-read what the VMA wrote and compare it with its digest before completing
    outage_window_seconds: float  # how long a copy rides out an outage (resuming) before it fails


@functools.cache
def volume_conf() -> VolumeConf:
    raw: dict[str, Any] = settings.OMA_VOLUMES
    if raw["BACKEND"] not in VOLUME_BACKENDS:
        raise ImproperlyConfigured(f"OMA_VOLUMES BACKEND must be one of {VOLUME_BACKENDS}, got {raw['BACKEND']!r}")
    cs: dict[str, Any] = raw.get("CLOUDSTACK", {})
    return VolumeConf(
        backend=str(raw["BACKEND"]),
        root=str(raw.get("ROOT", "")),
        loop=bool(raw.get("LOOP", False)),
        device_root=str(raw.get("DEVICE_ROOT", "")),
        cloudstack=CloudStackConf(
            endpoint=str(cs.get("ENDPOINT", "")),
            key=str(cs.get("KEY", "")),
            secret=str(cs.get("SECRET", "")),
            zone_id=str(cs.get("ZONE_ID", "")),
            disk_offering_id=str(cs.get("DISK_OFFERING_ID", "")),
            oma_vm_id=str(cs.get("OMA_VM_ID", "")),
            job_timeout=int(cs.get("JOB_TIMEOUT", 300)),
            poll_interval=float(cs.get("POLL_INTERVAL", 2.0)),
            device_root=str(cs.get("DEVICE_ROOT", "/dev/disk/by-id")),
            owner=str(cs.get("OWNER", "")),
            hypervisor=str(cs.get("HYPERVISOR", "KVM")),
        ),
    )


@functools.cache
def vma_conf() -> VmaConf:
    raw: dict[str, Any] = settings.OMA_VMA
    return VmaConf(
        url=str(raw["URL"]),
        token=str(raw["TOKEN"]),
        timeout=float(raw.get("TIMEOUT", 10)),
        retries=int(raw.get("RETRIES", 3)),
        deadline=float(raw.get("DEADLINE", 30)),
        ca_file=str(raw["CA_FILE"]) if raw.get("CA_FILE") else None,
        nbd_host=str(raw["NBD_HOST"]),
        nbd_port=int(raw["NBD_PORT"]),
        nbd_tls=bool(raw.get("NBD_TLS", False)),
        nbd_identity=str(raw.get("NBD_IDENTITY") or "vma"),
    )


@functools.cache
def workflow_conf() -> WorkflowConf:
    raw: dict[str, Any] = settings.OMA_WORKFLOW
    return WorkflowConf(
        max_active_jobs=int(raw["MAX_ACTIVE_JOBS"]),
        attach_slots=int(raw.get("ATTACH_SLOTS", raw.get("MAX_ATTACHED_VOLUMES", 25))),
        poll_interval=float(raw["POLL_INTERVAL"]),
        heartbeat_stale_seconds=float(raw["HEARTBEAT_STALE_SECONDS"]),
        step_retry_seconds=float(raw.get("STEP_RETRY_SECONDS", 5.0)),
        verify_writes=bool(raw.get("VERIFY_WRITES", True)),
        outage_window_seconds=float(raw.get("OUTAGE_WINDOW_SECONDS", 600)),
    )


_READERS = {"OMA_VOLUMES": volume_conf, "OMA_VMA": vma_conf, "OMA_WORKFLOW": workflow_conf}


@receiver(setting_changed)
def _reread(setting: str, **kwargs: Any) -> None:
    if setting in _READERS:
        _READERS[setting].cache_clear()
