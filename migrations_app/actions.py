"""Every write that matters to migrations: inventory, start, cancel, retry, cleanup.

Each opens its transaction, validates, saves and logs a JobEvent. A started or retried job is pending:
the node's progress follower reserves its attach slots and queues its worker (``follower.py``).
"""

from __future__ import annotations

import logging

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from exports.actions import ExportError, retire_export
from exports.models import normalize_vm_id
from live.outbox import announce

from .backends import get_volume_backend
from .events import record_job_event
from .models import (
    ACTIVE_STATES,
    DestinationVolume,
    IllegalTransition,
    JobDisk,
    JobKind,
    JobState,
    MigrationGroup,
    MigrationJob,
    SourceDisk,
    SourceVM,
)
from .topics import GROUP, INVENTORY
from .vma_client import VmaVM
from .volumes import VolumeError, volume_name_for
from .workflow import start_rollback

log = logging.getLogger(__name__)


class MigrationError(Exception):
    """A request about a migration was refused; the message says why."""


@transaction.atomic(durable=True)
def sync_inventory(vms: list[VmaVM]) -> int:
    """Upsert source VMs and disks as the VMA reports them; returns how many VMs it saw."""
    now = timezone.now()
    for raw in vms:
        vm, _ = SourceVM.objects.update_or_create(
            vm_id=normalize_vm_id(raw["id"]),
            defaults={
                "name": str(raw["name"])[:255],
                "path": str(raw.get("path", ""))[:1024],
                "power_state": str(raw.get("power_state", ""))[:32],
                "guest_os": str(raw.get("guest_os", ""))[:128],
                "cpus": raw.get("cpus"),
                "memory_mib": raw.get("memory_mib"),
                "firmware": raw.get("firmware", ""),
                "disk_controller": raw.get("disk_controller", ""),
                "nics": [
                    {"network": n["network"], "mac": n["mac"], "adapter": n.get("adapter", "")}
                    for n in raw.get("nics", [])
                ],
                "last_seen_at": now,
            },
        )
        for disk in raw.get("disks", []):
            SourceDisk.objects.update_or_create(
                vm=vm,
                unit_number=int(disk["unit_number"]),
                defaults={
                    "key": int(disk["key"]),
                    "label": str(disk.get("label", ""))[:255],
                    "path": str(disk.get("path", ""))[:1024],
                    "capacity_bytes": int(disk["capacity_bytes"]),
                },
            )
    announce(INVENTORY)
    return len(vms)


def _normalized(vm_id: str) -> str:
    try:
        return normalize_vm_id(vm_id)
    except ValidationError as exc:
        raise MigrationError(f"{vm_id!r} is not a VMware instance UUID") from exc


def _vm_for_update(vm_id: str) -> SourceVM:
    """The inventory's VM, row-locked: one request at a time decides what runs on it."""
    vm = SourceVM.objects.select_for_update().filter(vm_id=_normalized(vm_id)).first()
    if vm is None:
        raise MigrationError(f"no VM {vm_id} in the inventory; run discover_vms first")
    return vm


@transaction.atomic(durable=True)
def start_migration(*, vm_id: str, requested_by: str = "system") -> MigrationJob:
    """Create a job for the VM's disks and queue it. A later job of the same VM is an incremental sync:
    each disk starts from the change id its last completed job reported, on the same volume."""
    vm = _vm_for_update(vm_id)
    active = vm.jobs.filter(state__in=ACTIVE_STATES).first()
    if active is not None:
        raise MigrationError(f"{vm.name} already has an active job {active.job_id} ({active.state})")
    if vm.migrated_at is not None:
        raise MigrationError(f"{vm.name} was failed over to CloudStack VM {vm.destination_vm_id}; nothing to sync")
    disks = list(vm.disks.all())
    if not disks:
        raise MigrationError(f"{vm.name} has no disks in the inventory")
    job = MigrationJob(vm=vm, requested_by=requested_by)
    _save_active(job)
    any_incremental = False
    for disk in disks:
        volume, _ = DestinationVolume.objects.get_or_create(source_disk=disk)
        last = (
            JobDisk.objects.filter(source_disk=disk, job__state=JobState.COMPLETED, volume_id=volume.volume_id)
            .exclude(new_change_id="")
            .exclude(volume_id="")
            .order_by("-job__finished_at")
            .first()
        )
        incremental = bool(last and not volume.full_copy_next)
        any_incremental |= incremental
        JobDisk.objects.create(
            job=job,
            source_disk=disk,
            # An incremental sync moves only the changed blocks: its size is what the VMA counts, not the disk.
            bytes_total=0 if incremental else disk.capacity_bytes,
            # An incremental sync only onto the volume that holds the last completed sync (and that no
            # rolled-back VM wrote to since).
            previous_change_id=last.new_change_id if last and incremental else "",
            volume_id=volume.volume_id,
        )
    if any_incremental:
        job.since_sync_at = (
            vm.jobs.filter(kind=JobKind.SYNC, state=JobState.COMPLETED)
            .order_by("-finished_at")
            .values_list("finished_at", flat=True)
        ).first()
        job.save(update_fields=["since_sync_at"])
    kind = "incremental" if any_incremental else "full"
    record_job_event(job, "job.created", message=f"{kind} migration of {vm.name}", actor=requested_by)
    return job


def _save_active(job: MigrationJob) -> None:
    """Save a job that is (again) active. The database allows one active job per VM; a request that
    lost a race with another for the same VM is refused in words, not with an IntegrityError."""
    try:
        with transaction.atomic():
            job.save()
    except IntegrityError as exc:
        other = job.vm.jobs.filter(state__in=ACTIVE_STATES).exclude(pk=job.pk).first()
        running = f" {other.job_id} ({other.state})" if other else ""
        raise MigrationError(f"{job.vm.name} already has an active job{running}") from exc


def _job_for_update(job_id: str) -> MigrationJob:
    try:
        return MigrationJob.objects.select_for_update().get(job_id=job_id)
    except MigrationJob.DoesNotExist as exc:
        raise MigrationError(f"no job {job_id!r}") from exc


@transaction.atomic(durable=True)
def cancel_job(*, job_id: str, actor: str = "system") -> MigrationJob:
    """Pending: cancelled at once. Running: cancelling; the worker asks the VMA to stop and keeps
    volumes and exports for a retry."""
    job = _job_for_update(job_id)
    try:
        job.transition_to(job.cancel_target)
    except IllegalTransition as exc:
        raise MigrationError(f"{job.job_id} is {job.state}; only a pending or running job can be cancelled") from exc
    job.save()
    record_job_event(job, "job.cancel_requested", step=job.current_step, actor=actor)
    return job


@transaction.atomic(durable=True)
def retry_job(*, job_id: str, actor: str = "system") -> MigrationJob:
    """A failed or cancelled job goes back to pending and resumes from the step it stopped in; after a
    cleanup (its volumes deleted) from provisioning, with a full copy for each disk that lost its volume.
    A job a newer job of its VM superseded is not retried: that would copy into the newer job's volumes."""
    job = _job_for_update(job_id)
    # The VM's row lock orders this retry with start_migration and with another retry of the same VM.
    SourceVM.objects.select_for_update().filter(pk=job.vm_id).first()
    ended = attempt_summary(job)
    try:
        job.transition_to(JobState.PENDING)
    except IllegalTransition as exc:
        raise MigrationError(f"{job.job_id} is {job.state}; only a failed or cancelled job can be retried") from exc
    other = job.vm.jobs.filter(state__in=ACTIVE_STATES).exclude(pk=job.pk).first()
    if other is not None:
        raise MigrationError(f"{job.vm.name} already has an active job {other.job_id} ({other.state}); not retrying")
    newer = job.vm.jobs.filter(created_at__gt=job.created_at).order_by("-created_at").first()
    if newer is not None:
        raise MigrationError(
            f"{job.job_id} was superseded by {newer.job_id} ({newer.state}); start a new migration of "
            f"{job.vm.name} instead"
        )
    if job.current_step == JobState.VERIFYING:
        # What it wrote did not check out (or its device went): every step again, from a volume that
        # exists and is attached, to a new copy (nothing it confirmed counts).
        job.current_step = JobState.PROVISIONING
        job.disks.update(checkpoint="", checkpoint_bytes=0)
    if job.cleanup_requested:
        # The cleanup removed its exports and volumes: everything is provisioned again, and a disk whose
        # volume went gets a full copy.
        job.current_step = JobState.PROVISIONING
        job.cleanup_requested = False
        job.disks.filter(volume_id="").update(
            previous_change_id="", new_change_id="", bytes_done=0, mapping=None, checkpoint="", checkpoint_bytes=0
        )
    job.runner = ""
    job.step_errors = 0
    job.retry_at = None
    _save_active(job)
    record_job_event(job, "job.attempt_ended", step=job.current_step, message=ended)
    record_job_event(job, "job.retried", step=job.current_step, message=f"attempt {job.attempt}", actor=actor)
    return job


@transaction.atomic(durable=True)
def start_failover(
    *, vm_id: str, kind: str, allow_power_off: bool = False, requested_by: str = "system"
) -> MigrationJob:
    """Queue a live or test failover of the VM. Its first step checks readiness again (things change
    between the page and the worker); a live failover's final sync follows the source's shutdown."""
    if kind not in (JobKind.LIVE_FAILOVER, JobKind.TEST_FAILOVER):
        raise MigrationError(f"{kind!r} is not a failover")
    vm = _vm_for_update(vm_id)
    if vm.migrated_at is not None:
        raise MigrationError(f"{vm.name} was failed over already (CloudStack VM {vm.destination_vm_id})")
    if not vm.jobs.filter(kind=JobKind.SYNC, state=JobState.COMPLETED).exists():
        raise MigrationError(f"{vm.name} has no completed sync: migrate it before a failover")
    job = MigrationJob(vm=vm, kind=kind, requested_by=requested_by, allow_power_off=allow_power_off)
    _save_active(job)
    last = {
        d.source_disk_id: d
        for d in JobDisk.objects.filter(job__vm=vm, job__kind=JobKind.SYNC, job__state=JobState.COMPLETED)
        .exclude(new_change_id="")
        .order_by("job__finished_at")
    }
    for disk in vm.disks.all():
        volume, _ = DestinationVolume.objects.get_or_create(source_disk=disk)
        previous = last.get(disk.pk)
        incremental = bool(previous and previous.volume_id == volume.volume_id and not volume.full_copy_next)
        JobDisk.objects.create(
            job=job,
            source_disk=disk,
            bytes_total=0 if incremental else disk.capacity_bytes,
            # The final sync carries only what changed since the last one, onto the same volume.
            previous_change_id=previous.new_change_id
            if previous and previous.volume_id == volume.volume_id and not volume.full_copy_next
            else "",
            volume_id=volume.volume_id,
        )
    what = "live failover" if kind == JobKind.LIVE_FAILOVER else "test failover"
    power = " (power-off allowed)" if allow_power_off and kind == JobKind.LIVE_FAILOVER else ""
    record_job_event(job, "job.created", message=f"{what} of {vm.name}{power}", actor=requested_by)
    return job


def _failover_job(vm_id: str) -> MigrationJob:
    job = (
        MigrationJob.objects.filter(vm__vm_id=_normalized(vm_id))
        .exclude(kind=JobKind.SYNC)
        .order_by("-created_at", "-id")
        .first()
    )
    if job is None:
        raise MigrationError(f"VM {vm_id} has no failover")
    return job


def end_test_failover(*, vm_id: str, actor: str = "system") -> MigrationJob:
    """End the VM's running test failover: its test VM goes and syncing can go on."""
    job = _failover_job(vm_id)
    if not job.can_end_test:
        raise MigrationError(f"{job.job_id} is {job.get_state_display().lower()}; no test failover runs")
    start_rollback(job, "the operator ended the test", actor=actor)
    return job


def rollback_failover(*, vm_id: str, actor: str = "system") -> MigrationJob:
    """Put the VM's last failover back: the destination VM goes, the volumes return to the OMA, the
    source is powered on again if it was on."""
    job = _failover_job(vm_id)
    if job.can_end_test:
        return end_test_failover(vm_id=vm_id, actor=actor)
    if not job.can_roll_back:
        raise MigrationError(f"{job.job_id} is {job.get_state_display().lower()}; nothing to roll back")
    newer = job.vm.jobs.filter(created_at__gt=job.created_at).exists()
    if newer:
        raise MigrationError(f"{job.vm.name} has newer jobs than {job.job_id}; it cannot be rolled back")
    start_rollback(job, "the operator asked for a rollback", actor=actor)
    return job


def attempt_summary(job: MigrationJob) -> str:
    """One line that keeps an attempt's numbers once a retry starts the next one."""
    moved = sum(job.disks.values_list("bytes_done", flat=True))
    samples = [int(v) for v in job.throughput_samples or [] if v]
    took = (job.finished_at - job.started_at).total_seconds() if job.started_at and job.finished_at else None
    parts = [f"attempt {job.attempt} {job.state} in {job.current_step or 'pending'}", f"{moved >> 20} MiB moved"]
    if took is not None:
        parts.append(f"{took:.0f} s")
    if samples:
        parts.append(f"{sum(samples) // len(samples) * 8 // 1_000_000} Mbit/s on average")
    return ", ".join(parts)


def cleanup_job(*, job_id: str, actor: str = "system") -> list[str]:
    """Remove what a failed or cancelled job provisioned: its exports, and its volumes, except a volume
    that also holds a completed migration of the VM (an incremental sync's volume): that one is kept.
    Returns what was done, line by line."""
    with transaction.atomic(durable=True):
        job = _job_for_update(job_id)
        if job.state not in (JobState.FAILED, JobState.CANCELLED):
            raise MigrationError(f"{job.job_id} is {job.state}; only a failed or cancelled job can be cleaned up")
        job.cleanup_requested = True
        job.save(update_fields=["cleanup_requested"])
    backend = get_volume_backend()
    done: list[str] = []
    for disk in job.disks.select_related("source_disk", "mapping"):
        volume_id = disk.volume_id
        if not volume_id:
            # A create that timed out here may still have finished in the cloud: find it by its name.
            try:
                found = backend.find_volume(volume_name_for(job.vm.vm_id, disk.source_disk.unit_number))
            except VolumeError as exc:
                done.append(f"disk {disk.source_disk.unit_number}: could not look for its volume: {exc}")
                found = None
            volume_id = found.id if found else ""
            if volume_id:
                done.append(f"disk {disk.source_disk.unit_number}: found volume {volume_id}, created after a timeout")
        keeps_data = (
            volume_id
            and JobDisk.objects.filter(volume_id=volume_id, job__state=JobState.COMPLETED).exclude(job=job).exists()
        )
        if keeps_data:
            done.append(f"disk {disk.source_disk.unit_number}: kept volume {volume_id} (holds a completed sync)")
            continue
        try:
            # The export goes first: never detach a volume an export still points at.
            if disk.mapping is not None:
                retire_export(vm_id=job.vm.vm_id, disk_unit=disk.source_disk.unit_number, actor=actor)
                done.append(f"disk {disk.source_disk.unit_number}: retired export {disk.mapping.export_name}")
            if volume_id:
                backend.detach_volume(volume_id)
                backend.delete_volume(volume_id)
                done.append(f"disk {disk.source_disk.unit_number}: deleted volume {volume_id}")
                JobDisk.objects.filter(pk=disk.pk).update(volume_id="", device_path="")
                # The VM disk has no volume now (its next job makes one) and the attach slot is free.
                DestinationVolume.objects.filter(source_disk=disk.source_disk, volume_id=volume_id).update(
                    volume_id="", device_path="", node=None, state=DestinationVolume.State.NEW
                )
        except (ExportError, VolumeError) as exc:
            done.append(f"disk {disk.source_disk.unit_number}: not cleaned: {exc}")
    record_job_event(job, "job.cleaned_up", message="; ".join(done), actor=actor)
    return done


@transaction.atomic(durable=True)
def save_group(
    *,
    group: MigrationGroup | None,
    name: str,
    sync_interval_minutes: int,
    max_concurrent: int,
    enabled: bool,
    vm_ids: list[str],
    actor: str = "system",
) -> MigrationGroup:
    """Create or change a migration group and set its members (a VM belongs to one group at most: one
    chosen here leaves its old group). Its warm syncs follow from the next follower tick."""
    if group is None:
        group = MigrationGroup()
    group.name = name.strip()
    group.sync_interval_minutes = sync_interval_minutes
    group.max_concurrent = max_concurrent
    group.enabled = enabled
    try:
        group.full_clean()
    except ValidationError as exc:
        raise MigrationError("; ".join(exc.messages)) from exc
    group.save()
    members = set(SourceVM.objects.filter(vm_id__in=vm_ids).values_list("pk", flat=True))
    SourceVM.objects.filter(group=group).exclude(pk__in=members).update(group=None)
    SourceVM.objects.filter(pk__in=members).update(group=group)
    log.info("group %s saved by %s: %d members", group.name, actor, len(members))
    announce(GROUP, group.pk)
    return group
