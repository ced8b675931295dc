"""Builds the configured volume backend and VMA client from the typed settings (one place, so tests
swap settings)."""

from __future__ import annotations

from exports.conf import nbd_conf

from .cloudstack import CloudStackCompute, CloudStackVolumeBackend
from .compute import ComputeBackend, LocalComputeBackend
from .conf import vma_conf, volume_conf
from .vma_client import VmaClient
from .volumes import LocalVolumeBackend, VolumeBackend


def get_volume_backend() -> VolumeBackend:
    conf = volume_conf()
    if conf.backend == "local":
        return LocalVolumeBackend(conf.root, loop=conf.loop, node=nbd_conf().node, device_root=conf.device_root)
    cs = conf.cloudstack
    return CloudStackVolumeBackend(
        endpoint=cs.endpoint,
        key=cs.key,
        secret=cs.secret,
        zone_id=cs.zone_id,
        disk_offering_id=cs.disk_offering_id,
        oma_vm_id=cs.oma_vm_id,
        job_timeout=cs.job_timeout,
        poll_interval=cs.poll_interval,
        device_root=cs.device_root,
        owner=cs.owner,
    )


def get_compute_backend() -> ComputeBackend:
    """Destination VMs, in the same cloud as the volumes (and with the same credentials and owner tag)."""
    volumes = get_volume_backend()
    if isinstance(volumes, LocalVolumeBackend):
        return LocalComputeBackend(volumes)
    if not isinstance(volumes, CloudStackVolumeBackend):
        raise TypeError(f"no compute backend for volume backend {volumes.name}")
    return CloudStackCompute(volumes, hypervisor=volume_conf().cloudstack.hypervisor)


def get_vma_client() -> VmaClient:
    conf = vma_conf()
    return VmaClient(
        conf.url, conf.token, timeout=conf.timeout, retries=conf.retries, deadline=conf.deadline, ca_file=conf.ca_file
    )
