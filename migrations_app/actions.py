"""Every write that matters to migrations: inventory, start, cancel, retry.

Each opens its transaction, validates, saves, logs a JobEvent, and schedules the worker with
``transaction.on_commit``, so a task never runs against a row that was rolled back.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from exports.actions import ExportError, retire_export
from exports.models import normalize_vm_id
from live.outbox import announce

from .backends import get_volume_backend
from .events import record_job_event
from .live import INVENTORY
from .models import ACTIVE_STATES, IllegalTransition, JobDisk, JobState, MigrationJob, SourceDisk, SourceVM
from .vma_client import VmaVM
from .volumes import VolumeError, volume_name_for


class MigrationError(Exception):
    """A request about a migration was refused; the message says why."""


def schedule_job(job: MigrationJob) -> None:
    """Queue the job for a worker once the current transaction commits."""
    from django_q.tasks import async_task

    job_pk = job.pk
    transaction.on_commit(lambda: async_task("migrations_app.tasks.run_job_task", job_pk, task_name=job.job_id))


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


@transaction.atomic(durable=True)
def start_migration(*, vm_id: str, requested_by: str = "system") -> MigrationJob:
    """Create a job for the VM's disks and queue it. A later job of the same VM is an incremental sync:
    each disk starts from the change id its last completed job reported, on the same volume."""
    try:
        normalized = normalize_vm_id(vm_id)
    except ValidationError as exc:
        raise MigrationError(f"{vm_id!r} is not a VMware instance UUID") from exc
    vm = SourceVM.objects.select_for_update().filter(vm_id=normalized).first()
    if vm is None:
        raise MigrationError(f"no VM {vm_id} in the inventory; run discover_vms first")
    active = vm.jobs.filter(state__in=ACTIVE_STATES).first()
    if active is not None:
        raise MigrationError(f"{vm.name} already has an active job {active.job_id} ({active.state})")
    disks = list(vm.disks.all())
    if not disks:
        raise MigrationError(f"{vm.name} has no disks in the inventory")
    job = MigrationJob.objects.create(vm=vm, requested_by=requested_by)
    for disk in disks:
        last = (
            JobDisk.objects.filter(source_disk=disk, job__state=JobState.COMPLETED)
            .exclude(new_change_id="")
            .order_by("-job__finished_at")
            .first()
        )
        JobDisk.objects.create(
            job=job,
            source_disk=disk,
            bytes_total=disk.capacity_bytes,
            previous_change_id=last.new_change_id if last else "",
            volume_id=last.volume_id if last else "",
        )
    kind = "incremental" if any(d.previous_change_id for d in job.disks.all()) else "full"
    record_job_event(job, "job.created", message=f"{kind} migration of {vm.name}", actor=requested_by)
    schedule_job(job)
    return job


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
    """A failed or cancelled job goes back to pending and resumes from the step it stopped in."""
    job = _job_for_update(job_id)
    try:
        job.transition_to(JobState.PENDING)
    except IllegalTransition as exc:
        raise MigrationError(f"{job.job_id} is {job.state}; only a failed or cancelled job can be retried") from exc
    job.runner = ""
    job.save()
    record_job_event(job, "job.retried", step=job.current_step, message=f"attempt {job.attempt}", actor=actor)
    schedule_job(job)
    return job


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
    unrecorded: dict[str, str] | None = None
    for disk in job.disks.select_related("source_disk", "mapping"):
        volume_id = disk.volume_id
        if not volume_id:
            # A create that timed out here may still have finished in the cloud: find it by its name.
            if unrecorded is None:
                try:
                    unrecorded = {v.name: v.id for v in backend.list_volumes()}
                except VolumeError as exc:
                    done.append(f"could not list volumes: {exc}")
                    unrecorded = {}
            volume_id = unrecorded.get(volume_name_for(job.vm.vm_id, disk.source_disk.unit_number), "")
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
        except (ExportError, VolumeError) as exc:
            done.append(f"disk {disk.source_disk.unit_number}: not cleaned: {exc}")
    record_job_event(job, "job.cleaned_up", message="; ".join(done), actor=actor)
    return done
