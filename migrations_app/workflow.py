"""Runs one migration job through its steps: provisioning -> attaching -> exporting -> replicating.

Every step is idempotent (running it twice is harmless) and records its timing, so a job can be
resumed from its current step after a retry or after its worker died. One worker owns a job at a
time (``MigrationJob.runner`` + heartbeat); a worker that loses ownership stops touching it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from exports.actions import ExportError, ExportRequest, ensure_exports
from live.outbox import announce

from .backends import get_vma_client, get_volume_backend
from .conf import vma_conf, workflow_conf
from .events import record_job_event
from .live import PROGRESS
from .models import STEPS, JobDisk, JobState, MigrationJob
from .vma_client import DiskProgress, VmaClient, VmaError, VmaUnavailable
from .volumes import VolumeError, volume_name_for

log = logging.getLogger(__name__)
# Consecutive failed progress polls before the VMA counts as gone.
MAX_UNREACHABLE_POLLS = 5
PROGRESS_WRITE_INTERVAL = 0.5


class StepFailed(Exception):
    """A step could not finish; the message is what the operator reads."""


class LostOwnership(Exception):
    """Another worker took the job over (this one was presumed dead)."""


class Cancelled(Exception):
    pass


def claim(job_pk: int, runner: str) -> MigrationJob | None:
    """Take the job if it is runnable and nobody alive runs it."""
    stale = timezone.now() - timedelta(seconds=workflow_conf().heartbeat_stale_seconds)
    with transaction.atomic():
        job = MigrationJob.objects.select_for_update().filter(pk=job_pk).first()
        if job is None or job.state not in (JobState.PENDING, JobState.CANCELLING, *STEPS):
            return None
        alive = job.runner and job.runner != runner and job.heartbeat_at and job.heartbeat_at > stale
        if alive:
            return None
        if job.runner and job.runner != runner:
            record_job_event(job, "job.recovered", step=job.current_step, message=f"previous worker {job.runner} lost")
        job.runner = runner
        job.heartbeat_at = timezone.now()
        job.save(update_fields=["runner", "heartbeat_at"])
        return job


def beat(job: MigrationJob, runner: str) -> None:
    """Heartbeat; raises LostOwnership if another worker owns the job now, Cancelled if asked to stop."""
    now = timezone.now()
    if not MigrationJob.objects.filter(pk=job.pk, runner=runner).update(heartbeat_at=now):
        raise LostOwnership(job.job_id)
    job.refresh_from_db(fields=["state"])
    if job.state == JobState.CANCELLING:
        raise Cancelled(job.job_id)


def _capacity_problem(job: MigrationJob) -> str | None:
    """Why the job must wait, or None. Limits: active jobs, and volumes attached to this OMA (a KVM
    guest takes about 25 data disks; each migrated disk stays attached for its later syncs)."""
    flow = workflow_conf()
    running = MigrationJob.objects.filter(state__in=STEPS).exclude(pk=job.pk).count()
    if running >= flow.max_active_jobs:
        return f"{running} jobs are active, the maximum is {flow.max_active_jobs}"
    attached = set(JobDisk.objects.exclude(device_path="").exclude(volume_id="").values_list("volume_id", flat=True))
    mine = list(job.disks.values_list("volume_id", flat=True))
    needed = sum(1 for volume_id in mine if not volume_id or volume_id not in attached)
    limit = flow.max_attached_volumes
    if needed and len(attached) + needed > limit:
        return f"{len(attached)} volumes are attached and this job needs {needed} more; the maximum is {limit}"
    return None


def _move(job: MigrationJob, to: str, **kwargs: str) -> None:
    with transaction.atomic():
        job.refresh_from_db(fields=["state"])
        if job.state == JobState.CANCELLING and to not in (JobState.CANCELLED, JobState.FAILED):
            raise Cancelled(job.job_id)
        job.transition_to(to, **kwargs)
        job.save()


def run_job(job_pk: int, runner: str) -> MigrationJob | None:
    """Run (or resume) the job from its current step to the end. Returns the job, or None if not taken."""
    job = claim(job_pk, runner)
    if job is None:
        return None
    waiting = _capacity_problem(job) if job.state == JobState.PENDING else None
    if waiting:
        # Stays pending; the periodic recovery task offers it to a worker again.
        record_job_event(job, "job.queued", message=f"waiting: {waiting}")
        MigrationJob.objects.filter(pk=job.pk).update(runner="")
        return job
    try:
        if job.state == JobState.CANCELLING:
            raise Cancelled(job.job_id)
        resume = job.current_step or JobState.PROVISIONING
        if job.state == JobState.PENDING:
            _move(job, resume)
            record_job_event(job, "job.started", step=resume, message=f"attempt {job.attempt}")
        for index in range(STEPS.index(JobState(job.current_step)), len(STEPS)):
            step = STEPS[index]
            if job.state != step:
                _move(job, step)
            _run_step(job, step, runner)
        _move(job, JobState.COMPLETED)
        record_job_event(job, "job.completed")
    except Cancelled:
        _finish_cancel(job)
    except LostOwnership:
        log.warning("job %s was taken over by another worker; stopping here", job.job_id)
    except StepFailed as exc:
        _move(job, JobState.FAILED, error=str(exc))
        record_job_event(job, "step.failed", step=job.current_step, message=str(exc))
    return job


STEP_FUNCTIONS: dict[str, Callable[[MigrationJob, str], None]] = {}


def _run_step(job: MigrationJob, step: str, runner: str) -> None:
    started = time.monotonic()
    record_job_event(job, "step.started", step=step)
    beat(job, runner)
    try:
        STEP_FUNCTIONS[step](job, runner)
    except (VolumeError, ExportError, VmaError) as exc:
        raise StepFailed(f"{step}: {exc}") from exc
    record_job_event(job, "step.finished", step=step, duration_ms=int((time.monotonic() - started) * 1000))


def _disks(job: MigrationJob) -> list[JobDisk]:
    return list(job.disks.select_related("source_disk", "mapping").order_by("source_disk__unit_number"))


def provision(job: MigrationJob, runner: str) -> None:
    backend = get_volume_backend()
    for disk in _disks(job):
        if disk.volume_id and backend.get_volume(disk.volume_id) is not None:
            continue
        name = volume_name_for(job.vm.vm_id, disk.source_disk.unit_number)
        volume = backend.create_volume(name, disk.source_disk.capacity_bytes)
        JobDisk.objects.filter(pk=disk.pk).update(volume_id=volume.id)
        record_job_event(job, "volume.ready", step=JobState.PROVISIONING, message=f"{name} ({volume.id})")
        beat(job, runner)


def attach(job: MigrationJob, runner: str) -> None:
    backend = get_volume_backend()
    for disk in _disks(job):
        device = backend.attach_volume(disk.volume_id)
        JobDisk.objects.filter(pk=disk.pk).update(device_path=device)
        beat(job, runner)


def export(job: MigrationJob, runner: str) -> None:
    disks = _disks(job)
    requests = [ExportRequest(job.vm.vm_id, job.vm.name, d.source_disk.unit_number, d.device_path) for d in disks]
    mappings = ensure_exports(requests, actor=job.job_id)
    with transaction.atomic():
        for disk, mapping in zip(disks, mappings, strict=True):
            JobDisk.objects.filter(pk=disk.pk).update(mapping=mapping)
        record_job_event(
            job, "exports.ready", step=JobState.EXPORTING, message=", ".join(m.export_name for m in mappings)
        )


def replicate(job: MigrationJob, runner: str) -> None:
    conf, flow = vma_conf(), workflow_conf()
    vma = get_vma_client()
    replication_id = f"{job.job_id}-{job.attempt}"
    disks = {d.source_disk.unit_number: d for d in _disks(job)}
    try:
        vma.start_replication(
            replication_id,
            job.vm.vm_id,
            [
                {
                    "unit_number": unit,
                    "nbd_url": f"nbd://{conf.nbd_host}:{conf.nbd_port}/{disk.mapping.export_name}",  # type: ignore[union-attr]
                    "previous_change_id": disk.previous_change_id,
                }
                for unit, disk in disks.items()
            ],
        )
        unreachable = 0
        last_beat = last_write = 0.0
        written: dict[int, tuple[int, int, int, str]] = {}
        while True:
            now = time.monotonic()
            if now - last_beat >= PROGRESS_WRITE_INTERVAL:
                last_beat = now
                try:
                    beat(job, runner)
                except Cancelled:
                    vma.cancel(replication_id)
                    _wait_stopped(vma, replication_id, job, runner)
                    raise
            try:
                state = vma.replication(replication_id)
                unreachable = 0
            except VmaUnavailable:
                unreachable += 1
                if unreachable >= MAX_UNREACHABLE_POLLS:
                    raise
                time.sleep(flow.poll_interval)
                continue
            final = state["state"] != "running"
            # Poll often (to notice the end quickly) but write progress at most twice a second: a fast
            # copy must not flood the database, nor the live view behind it.
            if final or now - last_write >= PROGRESS_WRITE_INTERVAL:
                last_write = now
                _write_progress(job, disks, state["disks"], written)
            if state["state"] == "completed":
                return
            if state["state"] in ("failed", "cancelled"):
                raise StepFailed(f"the VMA reports the replication {state['state']}: {state.get('error') or '-'}")
            time.sleep(flow.poll_interval)
    finally:
        vma.close()


SPARKLINE_SAMPLES = 40


def _write_progress(
    job: MigrationJob,
    disks: dict[int, JobDisk],
    reported: list[DiskProgress],
    written: dict[int, tuple[int, int, int, str]],
) -> None:
    """Per-disk progress, one throughput sample for the sparkline and a live update, in one
    transaction (one write lock on SQLite); nothing at all when the VMA reports no change."""
    changes = {}
    for item in reported:
        disk = disks[item["unit_number"]]
        values = (
            item["bytes_done"],
            item["bytes_total"] or disk.bytes_total,
            item["throughput_bps"],
            item.get("change_id", ""),
        )
        if written.get(item["unit_number"]) != values:
            changes[disk.pk] = values
            written[item["unit_number"]] = values
    if not changes:
        return
    with transaction.atomic():
        for pk, (done, total, rate, change_id) in changes.items():
            JobDisk.objects.filter(pk=pk).update(
                bytes_done=done, bytes_total=total, throughput_bps=rate, new_change_id=change_id
            )
        samples = MigrationJob.objects.filter(pk=job.pk).values_list("throughput_samples", flat=True).first() or []
        rate = sum(int(item.get("throughput_bps") or 0) for item in reported)
        MigrationJob.objects.filter(pk=job.pk).update(throughput_samples=[*samples, rate][-SPARKLINE_SAMPLES:])
        announce(PROGRESS, job.pk)


def _wait_stopped(vma: VmaClient, replication_id: str, job: MigrationJob, runner: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if vma.replication(replication_id)["state"] not in ("running", "cancelling"):
            return
        MigrationJob.objects.filter(pk=job.pk, runner=runner).update(heartbeat_at=timezone.now())
        time.sleep(0.2)


def _finish_cancel(job: MigrationJob) -> None:
    job.refresh_from_db()
    if job.state == JobState.CANCELLING:
        _move(job, JobState.CANCELLED)
        record_job_event(job, "job.cancelled", step=job.current_step, message="volumes and exports kept for a retry")


STEP_FUNCTIONS.update(
    {
        JobState.PROVISIONING: provision,
        JobState.ATTACHING: attach,
        JobState.EXPORTING: export,
        JobState.REPLICATING: replicate,
    }
)


def stale_jobs() -> list[MigrationJob]:
    """Active jobs whose worker stopped beating (or pending jobs nobody picked up)."""
    stale = timezone.now() - timedelta(seconds=workflow_conf().heartbeat_stale_seconds)
    active = [JobState.PENDING, JobState.CANCELLING, *STEPS]
    return list(
        MigrationJob.objects.filter(state__in=active).filter(Q(heartbeat_at__lt=stale) | Q(heartbeat_at__isnull=True))
    )
