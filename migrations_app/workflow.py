"""A job's worker steps: provisioning -> attaching -> exporting -> starting the copy.

Every step is short and idempotent (running it twice is harmless) and records its timing, so a job is
resumed from its current step after a retry or after its worker died. No worker waits for a copy: the
replicating step asks the VMA to start copying and returns; the node's progress follower
(``follower.py``) follows the copy and finishes the job. One worker owns a job at a time
(``MigrationJob.runner`` + heartbeat); a blocking external call keeps the heartbeat going from a
background thread, so a slow CloudStack job is never mistaken for a dead worker.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

from django.db import connections, transaction
from django.db.models import Q
from django.utils import timezone

from exports import helper_client
from exports.actions import ExportError, ExportRequest, ensure_exports
from exports.conf import NbdConf, nbd_conf
from exports.helper_client import HelperFailed, SubprocessHelper
from exports.nbd_protocol import NbdConnection, NbdConnectionLost, NbdError, NbdUnavailable

from .backends import get_vma_client, get_volume_backend
from .conf import vma_conf, workflow_conf
from .events import job_event, record_job_event, record_job_events
from .models import (
    ROLLBACK_ON_FAILURE,
    SEQUENCES,
    WORKER_STEPS,
    DestinationVolume,
    JobDisk,
    JobEvent,
    JobKind,
    JobState,
    MigrationJob,
)
from .slots import mark_attached, volumes_for
from .vma_client import ReplicationTarget, VmaError
from .volumes import VolumeBackend, VolumeError, volume_name_for

log = logging.getLogger(__name__)


class StepFailed(Exception):
    """A step could not finish; the message is what the operator reads."""


class LostOwnership(Exception):
    """Another worker took the job over (this one was presumed dead)."""


class Cancelled(Exception):
    pass


class StepRetry(Exception):
    """A step that cannot go on yet (the VMA is unreachable): tried again after a back-off, a few times."""


def stale_before() -> datetime:
    return timezone.now() - timedelta(seconds=workflow_conf().heartbeat_stale_seconds)


def claim(job_pk: int, runner: str) -> MigrationJob | None:
    """Take the job if a worker step is due and nobody alive runs it. A job that is pending (the
    dispatcher has not reserved its slots yet) or whose copy the follower follows is not taken."""
    with transaction.atomic():
        job = MigrationJob.objects.select_for_update().filter(pk=job_pk).first()
        if job is None or job.state not in (JobState.CANCELLING, *WORKER_STEPS):
            return None
        if job.state == JobState.REPLICATING and job.replication_id:
            return None  # the copy runs at the VMA; the follower has it
        if job.retry_at is not None and job.retry_at > timezone.now():
            return None  # an error's back-off: the follower queues it again when it is due
        alive = job.runner and job.runner != runner and job.heartbeat_at and job.heartbeat_at > stale_before()
        if alive:
            return None
        if job.runner and job.runner != runner:
            silent = int((timezone.now() - job.heartbeat_at).total_seconds()) if job.heartbeat_at else None
            record_job_event(
                job,
                "job.recovered",
                step=job.current_step,
                message=f"worker {job.runner} went silent in {job.current_step}"
                + (f" ({silent} s without a heartbeat)" if silent is not None else "")
                + f"; resuming at {job.current_step}",
            )
        job.runner = runner
        job.heartbeat_at = timezone.now()
        job.queued_at = None
        job.retry_at = None
        job.save(update_fields=["runner", "heartbeat_at", "queued_at", "retry_at"])
        return job


def beat(job: MigrationJob, runner: str) -> None:
    """Heartbeat; raises LostOwnership if another worker owns the job now, Cancelled if asked to stop."""
    if not MigrationJob.objects.filter(pk=job.pk, runner=runner).update(heartbeat_at=timezone.now()):
        raise LostOwnership(job.job_id)
    job.refresh_from_db(fields=["state"])
    if job.state == JobState.CANCELLING:
        raise Cancelled(job.job_id)


@contextlib.contextmanager
def heartbeat_kept(job: MigrationJob, runner: str) -> Iterator[None]:
    """Around a blocking external call (a CloudStack job may take minutes): a background thread renews
    the job's heartbeat, a few times per stale period, until the call returns."""
    stop = threading.Event()
    interval = max(0.2, workflow_conf().heartbeat_stale_seconds / 4)

    def keep() -> None:
        try:
            while not stop.wait(interval):
                MigrationJob.objects.filter(pk=job.pk, runner=runner).update(heartbeat_at=timezone.now())
        finally:
            connections.close_all()

    keeper = threading.Thread(target=keep, name=f"heartbeat-{job.job_id}", daemon=True)
    keeper.start()
    try:
        yield
    finally:
        stop.set()
        keeper.join()


def _move(job: MigrationJob, to: str, error: str = "") -> None:
    """Change the job's state (and only the fields a transition owns): never write back a stale copy of
    what others (the follower's progress, an operator's cancel) wrote meanwhile."""
    with transaction.atomic():
        job.refresh_from_db(fields=["state"])
        if job.state == JobState.CANCELLING and to not in (JobState.CANCELLED, JobState.FAILED):
            raise Cancelled(job.job_id)
        job.transition_to(to, error=error)
        job.save(update_fields=TRANSITION_FIELDS)


TRANSITION_FIELDS = ["state", "current_step", "started_at", "finished_at", "error", "attempt", "heartbeat_at"]


def run_job(job_pk: int, runner: str) -> MigrationJob | None:
    """Run the job's worker steps, from its current step on: for a sync up to starting the copy, or, once
    the copy ended, verifying what it wrote and completing the job; a failover's steps around its final
    sync the same way; a rollback. Returns the job, or None if not taken (not due, or run by a live
    worker)."""
    job = claim(job_pk, runner)
    if job is None:
        return None
    try:
        if job.state == JobState.CANCELLING:
            raise Cancelled(job.job_id)
        if job.state == JobState.ROLLING_BACK:
            _enter(job, JobState.ROLLING_BACK, runner)
            finish_rollback(job, _run_step(job, JobState.ROLLING_BACK, runner))
            return job
        steps = SEQUENCES[job.kind]
        finished: JobEvent | None = None  # a step's end, recorded with the next step's start
        for step in steps[steps.index(JobState(job.current_step)) :]:
            _enter(job, step, runner, finished)
            finished = _run_step(job, step, runner)
            if step == JobState.REPLICATING:
                return job  # the copy runs at the VMA now; the follower has the job (replicate let it go)
        if job.kind == JobKind.TEST_FAILOVER:
            _move(job, JobState.TESTING)
            MigrationJob.objects.filter(pk=job.pk).update(runner="")
            testing = job_event(job, "failover.testing", message="the test VM runs; end the test to sync again")
            record_job_events(job, [finished, testing])
        else:
            complete(job, finished)
    except Cancelled:
        finish_cancel(job, runner)
    except LostOwnership:
        log.warning("job %s was taken over by another worker; stopping here", job.job_id)
    except StepFailed as exc:
        fail(job, str(exc))
    except StepRetry as exc:
        step_error(job, runner, str(exc))
    except Exception as exc:  # a bug or an unforeseen system error: recorded, tried again, then a failure
        log.exception("job %s: unexpected error in %s", job.job_id, job.current_step)
        step_error(job, runner, describe_error(exc))
    return job


# An unexpected error in a step is tried again this many times in all, waiting longer each time.
MAX_STEP_ATTEMPTS = 3


def step_error(job: MigrationJob, runner: str, message: str) -> None:
    """Record an unexpected error on the job; try the step again after a back-off, or fail it when it
    failed MAX_STEP_ATTEMPTS times in a row."""
    job.refresh_from_db(fields=["step_errors", "state", "current_step"])
    attempts = job.step_errors + 1
    step = job.current_step
    if attempts >= MAX_STEP_ATTEMPTS or job.state not in WORKER_STEPS:
        fail(job, f"{step}: {message} (failed {attempts} times in a row)")
        return
    wait = workflow_conf().step_retry_seconds * 2 ** (attempts - 1)
    with transaction.atomic():
        MigrationJob.objects.filter(pk=job.pk, runner=runner).update(
            step_errors=attempts, retry_at=timezone.now() + timedelta(seconds=wait), runner=""
        )
        record_job_event(
            job,
            "step.error",
            step=step,
            message=f"{message}; trying {step} again in {wait:g} s (attempt {attempts + 1} of {MAX_STEP_ATTEMPTS})",
        )


def describe_error(exc: BaseException) -> str:
    """An error in words: an OSError by its errno's name and text (never a bare 'error 28')."""
    if isinstance(exc, OSError) and exc.errno:
        name = errno.errorcode.get(exc.errno, f"errno {exc.errno}")
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or os.strerror(exc.errno)} [{name}]{where}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def complete(job: MigrationJob, finished: JobEvent | None = None) -> None:
    """The job is done: a sync (verified, when verification is on) with its volumes marked used now (the
    least recently used idle volume is the first detached); a live failover with its VM running.
    ``finished``: its last step's end, recorded with the completion."""
    with transaction.atomic():
        locked = MigrationJob.objects.select_for_update().get(pk=job.pk)
        if locked.state not in (JobState.REPLICATING, JobState.VERIFYING, JobState.STARTING_VM):
            record_job_events(locked, [finished])
            return
        locked.transition_to(JobState.COMPLETED)
        locked.runner = ""
        locked.save(update_fields=[*TRANSITION_FIELDS, "runner"])
        if locked.kind == JobKind.SYNC:
            DestinationVolume.objects.filter(source_disk__job_disks__job=locked).update(
                last_used_at=timezone.now(), full_copy_next=False
            )
            done = job_event(locked, "job.completed")
        else:
            locked.vm.destination_vm_id = locked.destination_vm_id
            locked.vm.migrated_at = timezone.now()
            locked.vm.save(update_fields=["destination_vm_id", "migrated_at"])
            done = job_event(
                locked,
                "failover.completed",
                message=f"{locked.vm.name} runs as CloudStack VM {locked.destination_vm_id}",
            )
        record_job_events(locked, [finished, done])
    job.refresh_from_db()


def fail(job: MigrationJob, error: str) -> None:
    """The step failed for good. A failover step that may have changed something (the source shut down,
    a VM created, volumes moved) puts everything back instead: rolling back, with the error kept."""
    job.refresh_from_db(fields=["state", "current_step", "kind"])
    if job.kind != JobKind.SYNC and job.current_step in ROLLBACK_ON_FAILURE and job.state != JobState.ROLLING_BACK:
        start_rollback(job, error)
        return
    _move(job, JobState.FAILED, error=error)
    MigrationJob.objects.filter(pk=job.pk).update(runner="")
    record_job_event(job, "step.failed", step=job.current_step, message=error)


def start_rollback(job: MigrationJob, why: str, actor: str = "system") -> None:
    """Put a failover back (a worker runs the rollback step): from a failed step, a cancel, the end of a
    test, or an operator's request."""
    with transaction.atomic():
        locked = MigrationJob.objects.select_for_update().get(pk=job.pk)
        if locked.state == JobState.ROLLING_BACK:
            return
        failed_in = locked.current_step
        locked.transition_to(JobState.ROLLING_BACK, error=why if locked.kind == JobKind.LIVE_FAILOVER else "")
        # Due now: the node's follower queues a worker for it on its next tick.
        locked.runner = ""
        locked.queued_at = None
        locked.step_errors = 0
        locked.retry_at = timezone.now()
        locked.save(update_fields=[*TRANSITION_FIELDS, "runner", "queued_at", "step_errors", "retry_at"])
        record_job_event(
            locked,
            "failover.rolling_back",
            step=failed_in,
            message=why,
            actor=actor,
        )
    job.refresh_from_db()


def finish_rollback(job: MigrationJob, finished: JobEvent | None = None) -> None:
    """The rollback step is done (``finished``: its end): a test failover ends completed (syncs go on), a
    live one rolled back."""
    with transaction.atomic():
        locked = MigrationJob.objects.select_for_update().get(pk=job.pk)
        if locked.state != JobState.ROLLING_BACK:
            record_job_events(locked, [finished])
            return
        # A test that ran ends completed; a failover (or a test) that failed on its way is rolled back.
        ran = locked.kind == JobKind.TEST_FAILOVER and locked.test_ends_at is not None
        to = JobState.COMPLETED if ran else JobState.ROLLED_BACK
        locked.transition_to(to)
        locked.runner = ""
        locked.save(update_fields=[*TRANSITION_FIELDS, "runner"])
        kind = "failover.test_ended" if to == JobState.COMPLETED else "failover.rolled_back"
        back = job_event(locked, kind, message="the volumes are back with the OMA; syncs can go on")
        record_job_events(locked, [finished, back])
    job.refresh_from_db()


STEP_FUNCTIONS: dict[str, Callable[[MigrationJob, str], None]] = {}


def _enter(job: MigrationJob, step: str, runner: str, finished: JobEvent | None = None) -> None:
    """Start a step: in one transaction the job moves to it (unless it is there, resumed), its heartbeat
    is renewed, and the step's start is recorded (after ``finished``, the previous step's end). The
    write is conditional on this worker still owning the job in the state it last saw: a cancel or
    another worker's takeover meanwhile is never overwritten (LostOwnership, Cancelled)."""
    was = job.state
    with transaction.atomic():
        if job.state != step:
            job.transition_to(step)
            fields = {name: getattr(job, name) for name in TRANSITION_FIELDS}
        else:
            fields = {"heartbeat_at": timezone.now()}
        mine = MigrationJob.objects.filter(pk=job.pk, runner=runner, state=was).update(**fields)
        record_job_events(job, [finished, job_event(job, "step.started", step=step) if mine else None])
    if not mine:
        _why_not_mine(job, runner)


def _why_not_mine(job: MigrationJob, runner: str) -> None:
    """Raise what a conditional write of the job found: another worker owns it, or it is being cancelled."""
    job.refresh_from_db(fields=["state", "runner"])
    if job.runner == runner and job.state == JobState.CANCELLING:
        raise Cancelled(job.job_id)
    raise LostOwnership(job.job_id)


def _run_step(job: MigrationJob, step: str, runner: str) -> JobEvent | None:
    """Run the step; its end (with its duration), to be recorded with what comes next. The copy's step
    ends when the copy does: the follower records that."""
    started = time.monotonic()
    try:
        STEP_FUNCTIONS[step](job, runner)
    except (VolumeError, ExportError, VmaError) as exc:
        raise StepFailed(f"{step}: {exc}") from exc
    if job.step_errors:
        MigrationJob.objects.filter(pk=job.pk).update(step_errors=0, retry_at=None)
        job.step_errors = 0
    if step == JobState.REPLICATING:
        return None
    return job_event(job, "step.finished", step=step, duration_ms=int((time.monotonic() - started) * 1000))


def _disks(job: MigrationJob) -> list[JobDisk]:
    return list(job.disks.select_related("source_disk", "mapping").order_by("source_disk__unit_number"))


def provision(job: MigrationJob, runner: str) -> None:
    backend = get_volume_backend()
    disks = _disks(job)
    reused: list[JobDisk] = []
    for disk, volume in zip(disks, volumes_for(job, disks), strict=True):
        with heartbeat_kept(job, runner):
            existing = backend.get_volume(volume.volume_id) if volume.volume_id else None
        if existing is not None:
            capacity = disk.source_disk.capacity_bytes
            if existing.size_bytes < capacity:
                # The source disk grew since the last sync: the volume grows first (its export serves on).
                with heartbeat_kept(job, runner):
                    grown = backend.resize_volume(existing.id, capacity)
                record_job_event(
                    job,
                    "volume.grown",
                    step=JobState.PROVISIONING,
                    message=f"disk {disk.source_disk.unit_number}: the source disk grew to {capacity >> 20} MiB; "
                    f"its volume grew from {existing.size_bytes >> 20} MiB to {grown.size_bytes >> 20} MiB",
                )
            # A full copy moves the whole disk; an incremental's size is what the VMA counts as changed.
            disk.volume_id = volume.volume_id
            disk.bytes_total = disk.bytes_total if disk.previous_change_id else capacity
            reused.append(disk)
            continue
        _create_volume(job, runner, backend, disk, volume)
        beat(job, runner)
    JobDisk.objects.bulk_update(reused, ["volume_id", "bytes_total"])  # the volumes kept: one write


def _create_volume(
    job: MigrationJob, runner: str, backend: VolumeBackend, disk: JobDisk, volume: DestinationVolume
) -> None:
    """Create the disk's volume (a new one, or one replacing a volume that is gone) and record it."""
    name = volume_name_for(job.vm.vm_id, disk.source_disk.unit_number)
    with heartbeat_kept(job, runner):
        created = backend.create_volume(name, disk.source_disk.capacity_bytes)
    with transaction.atomic():
        replaced = bool(volume.volume_id)
        # A new volume holds none of the earlier syncs: it is attached afresh and gets a full copy.
        DestinationVolume.objects.filter(pk=volume.pk).update(
            volume_id=created.id,
            device_path="",
            state=DestinationVolume.State.RESERVED if volume.node_id else DestinationVolume.State.DETACHED,
        )
        JobDisk.objects.filter(pk=disk.pk).update(volume_id=created.id, device_path="", previous_change_id="")
        if replaced:
            record_job_event(
                job,
                "volume.replaced",
                step=JobState.PROVISIONING,
                message=f"disk {disk.source_disk.unit_number}: volume {volume.volume_id} is gone; "
                f"{name} ({created.id}) replaces it and gets a full copy",
            )
        else:
            record_job_event(job, "volume.ready", step=JobState.PROVISIONING, message=f"{name} ({created.id})")
    volume.volume_id = created.id


def prepare_volumes(job_pk: int, runner: str) -> str:
    """Create the volumes a pending sync still lacks while it waits for attach slots (on CloudStack a
    volume takes seconds to create): its slots are then held from its attach on, not through the
    creation. The job is claimed as a step is (its runner and heartbeat), so the dispatcher does not
    place it until this is done; the provisioning step then finds the volumes made. A failure here is
    not the job's: provisioning creates what is missing, and says why if it cannot."""
    with transaction.atomic():
        taken = (
            MigrationJob.objects.filter(pk=job_pk, state=JobState.PENDING, kind=JobKind.SYNC)
            .filter(Q(runner="") | Q(heartbeat_at__isnull=True) | Q(heartbeat_at__lt=stale_before()))
            .update(runner=runner, heartbeat_at=timezone.now())
        )
    if not taken:
        return "not needed: placed, ended or being prepared already"
    job = MigrationJob.objects.select_related("vm").get(pk=job_pk)
    made = 0
    try:
        backend = get_volume_backend()
        disks = _disks(job)
        for disk, volume in zip(disks, volumes_for(job, disks), strict=True):
            if not volume.volume_id:
                _create_volume(job, runner, backend, disk, volume)
                made += 1
    except VolumeError as exc:
        log.warning("job %s: creating its volumes ahead failed (provisioning tries again): %s", job.job_id, exc)
        return f"{made} volume(s) made ahead, then: {exc}"
    finally:
        MigrationJob.objects.filter(pk=job_pk, runner=runner).update(runner="")
    return f"{made} volume(s) made ahead"


def attach(job: MigrationJob, runner: str) -> None:
    """Attach each volume to this node (its slot was reserved when the job was dispatched). A volume
    that is attached already costs nothing; one detached to free a slot is attached again. What was
    attached is recorded in one transaction, also when a later volume's attach fails: the node's slots
    are counted from these rows."""
    backend = get_volume_backend()
    disks = _disks(job)
    attached: list[tuple[DestinationVolume, str]] = []
    try:
        for disk, volume in zip(disks, volumes_for(job, disks), strict=True):
            if volume.state == DestinationVolume.State.ATTACHED and volume.device_path:
                disk.device_path = volume.device_path
                continue
            with heartbeat_kept(job, runner):
                disk.device_path = backend.attach_volume(volume.volume_id)
            attached.append((volume, disk.device_path))
    finally:
        with transaction.atomic():
            mark_attached(attached)
            JobDisk.objects.bulk_update(disks, ["device_path"])
    beat(job, runner)


def export(job: MigrationJob, runner: str) -> None:
    disks = _disks(job)
    requests = [ExportRequest(job.vm.vm_id, job.vm.name, d.source_disk.unit_number, d.device_path) for d in disks]
    with heartbeat_kept(job, runner):
        mappings = ensure_exports(requests, actor=job.job_id)
    with transaction.atomic():
        for disk, mapping in zip(disks, mappings, strict=True):
            disk.mapping = mapping
        JobDisk.objects.bulk_update(disks, ["mapping"])
        record_job_event(
            job, "exports.ready", step=JobState.EXPORTING, message=", ".join(m.export_name for m in mappings)
        )


def replicate(job: MigrationJob, runner: str) -> None:
    """Ask the VMA to copy every disk into its export, and return: the follower follows the copy. The
    replication id names the attempt, so asking again (a worker that died here) starts nothing new."""
    replication_id = f"{job.job_id}-{job.attempt}"
    # A retried job continues from what its earlier attempt confirmed written (none: from the start).
    targets = replication_targets(_disks(job), resume=True)
    vma = get_vma_client()
    try:
        with heartbeat_kept(job, runner):
            vma.start_replication(replication_id, job.vm.vm_id, targets)
    finally:
        vma.close()
    with transaction.atomic():
        # The hand-off to the follower is this one write: from the moment the follower can see the copy,
        # no worker holds the job. A short copy may end, and the follower claim the job to verify it,
        # before this worker's task has even returned.
        if not MigrationJob.objects.filter(pk=job.pk, runner=runner).update(
            replication_id=replication_id, runner="", step_errors=0, retry_at=None
        ):
            raise LostOwnership(job.job_id)
        record_job_event(job, "replication.started", step=JobState.REPLICATING, message=replication_id)
    job.runner, job.step_errors, job.retry_at = "", 0, None  # nothing more is written by this worker


def replication_targets(disks: list[JobDisk], resume: bool = False) -> list[ReplicationTarget]:
    """What the VMA is asked to copy: each disk into its export, from its previous change id; resumed,
    from the checkpoint the VMA last confirmed."""
    conf = vma_conf()
    targets: list[ReplicationTarget] = []
    for disk in disks:
        if disk.mapping is None:
            raise StepFailed(f"disk {disk.source_disk.unit_number} has no export to copy into")
        target: ReplicationTarget = {
            "unit_number": disk.source_disk.unit_number,
            "nbd_url": conf.nbd_url(disk.mapping.export_name),
            "previous_change_id": disk.previous_change_id,
        }
        if resume and disk.checkpoint:
            target["resume_from"] = disk.checkpoint
        targets.append(target)
    return targets


def finish_cancel(job: MigrationJob, runner: str = "") -> None:
    """A cancel that no copy is left to stop: the job is cancelled, its volumes and exports kept. A
    failover cancelled after it changed something is put back instead."""
    job.refresh_from_db()
    if job.state != JobState.CANCELLING:
        return
    if job.kind != JobKind.SYNC and job.current_step in ROLLBACK_ON_FAILURE:
        start_rollback(job, f"cancelled in {job.current_step}")
        return
    _move(job, JobState.CANCELLED)
    MigrationJob.objects.filter(pk=job.pk).update(runner="")
    record_job_event(job, "job.cancelled", step=job.current_step, message="volumes and exports kept for a retry")


# A job whose ranges add up to at most this many bytes is read back through its exports, on the connections
# that check they are served: over TLS that costs about 4.5 ms a MiB, a helper process about 1.4 ms a MiB
# plus its start (100 ms and more while the node is busy). An incremental sync's few changed blocks go
# this way; a full copy's whole disks are hashed locally by the helper.
READ_BACK_THROUGH_NBD = 8 << 20
# ... and in at most this many ranges (each is an NBD round trip; a VMA's changed extents are merged).
READ_BACK_THROUGH_NBD_RANGES = 1024


def verify(job: MigrationJob, runner: str) -> None:
    """Before a sync counts: each disk's device is still there and is the volume this job provisioned,
    its export is served and is as large as its source, and the ranges the VMA says it wrote read back
    with the VMA's digest. Anything else fails the job, saying which disk and why.

    A few MiB (an incremental sync) are read through the exports themselves, on the NBD connections (over
    TLS, as the VMA reaches them) that check they are served. More is read locally: the helper hashes the
    device each export's link points at (what the NBD server serves), so it costs a disk read and a
    sha256, not a second TLS transfer of every byte (through NBD over TLS a full copy's read-back took as
    long as the copy itself); a job's disks are read in one helper call, side by side."""
    conf = nbd_conf()
    checked: list[tuple[JobDisk, int, str]] = []
    disks = _disks(job)
    volume_ids = dict(
        DestinationVolume.objects.filter(source_disk__in=[d.source_disk_id for d in disks]).values_list(
            "source_disk", "volume_id"
        )
    )
    for disk in disks:
        unit = disk.source_disk.unit_number
        if volume_ids.get(disk.source_disk_id) != disk.volume_id:
            raise StepFailed(f"verifying: disk {unit}: its volume was replaced during the sync; sync it again")
        if not os.path.exists(disk.device_path):
            raise StepFailed(
                f"verifying: disk {unit}: its device {disk.device_path} is gone (the volume was deleted or "
                "detached during the copy); nothing it wrote can be trusted: retry to provision it again"
            )
        if disk.mapping is None:
            raise StepFailed(f"verifying: disk {unit} has no export to read back")
        checked.append((disk, unit, disk.mapping.export_name))
    through_nbd = _small_read_back([disk.digest["ranges"] if disk.digest else [] for disk, _, _ in checked])
    to_read: list[tuple[JobDisk, int, str, list[list[int]]]] = []
    unverified = []
    matched: list[int] = []
    problems: list[StepFailed | StepRetry] = []
    for disk, unit, name in checked:
        ranges = disk.digest["ranges"] if disk.digest else None
        try:
            value = _check_served(conf, disk, unit, name, ranges if through_nbd else None)
        except (StepFailed, StepRetry) as exc:
            problems.append(exc)  # the other disks are still read: each one that matches is marked
            continue
        if ranges is None:
            unverified.append(unit)
        elif value is not None:
            _compare(disk, unit, value, matched, problems)
        else:
            to_read.append((disk, unit, name, ranges))
    if to_read:
        helper = SubprocessHelper(conf.helper_command, conf.helper_config)
        with heartbeat_kept(job, runner):
            for (disk, unit, _, _), result in zip(to_read, _read_back(helper, to_read), strict=True):
                if isinstance(result, HelperFailed):
                    if result.refused:  # no such export, its device is gone, or ranges past its end
                        problems.append(StepFailed(f"verifying: disk {unit}: cannot read it back: {result.message}"))
                    else:
                        problems.append(StepRetry(f"verifying: disk {unit}: cannot read it back yet: {result.message}"))
                    continue
                _compare(disk, unit, result["sha256"], matched, problems)
    message = f"{len(matched)} disk(s) read back and matched the VMA's digests"
    if unverified:
        message += f"; disk(s) {', '.join(map(str, unverified))}: the VMA sent no digest, not compared"
    with transaction.atomic():
        JobDisk.objects.filter(pk__in=matched).update(verified_at=timezone.now())  # each disk that matched
        if not problems:
            record_job_event(job, "sync.verified", step=JobState.VERIFYING, message=message)
    if problems:
        raise problems[0]


def _small_read_back(per_disk: list[object]) -> bool:
    """Whether the disks' digest ranges are few enough bytes in few enough ranges to be read through the
    exports, and all [offset, length] pairs of integers at least 0 (the helper refuses others, saying why)."""
    count = total = 0
    for ranges in per_disk:
        if not isinstance(ranges, list):
            return False
        for pair in ranges:
            if not (isinstance(pair, list) and len(pair) == 2 and all(type(n) is int and n >= 0 for n in pair)):
                return False
            count += 1
            total += pair[1]
    return total <= READ_BACK_THROUGH_NBD and count <= READ_BACK_THROUGH_NBD_RANGES


def _compare(disk: JobDisk, unit: int, value: str, matched: list[int], problems: list[StepFailed | StepRetry]) -> None:
    sent = str((disk.digest or {}).get("value"))
    if value != sent:
        problems.append(
            StepFailed(
                f"verifying: disk {unit}: what the volume holds differs from what the VMA sent "
                f"(sha256 {value[:12]}... read back, {sent[:12]}... sent); sync it again"
            )
        )
    else:
        matched.append(disk.pk)


def _read_back(
    helper: SubprocessHelper, to_read: list[tuple[JobDisk, int, str, list[list[int]]]]
) -> list[helper_client.DigestResult | HelperFailed]:
    """Every disk's read-back in one helper call (its devices read side by side). When that call fails,
    each disk is read alone, so the error says which disk it is about."""
    if not to_read:
        return []
    try:
        return list(helper_client.digest(helper, {name: ranges for _, _, name, ranges in to_read}))
    except HelperFailed as exc:
        if len(to_read) == 1:
            return [exc]
    results: list[helper_client.DigestResult | HelperFailed] = []
    for _, _, name, ranges in to_read:
        try:
            results += helper_client.digest(helper, {name: ranges})
        except HelperFailed as exc:
            results.append(exc)
    return results


# What one NBD read of a read-back asks for (nbdkit and nbd-server take 32 MiB requests).
READ_BACK_CHUNK = 4 << 20


def _check_served(
    conf: NbdConf, disk: JobDisk, unit: int, export_name: str, ranges: list[list[int]] | None = None
) -> str | None:
    """The export answers an NBD handshake (over TLS, as the VMA reaches it) with at least the source's
    size; with ``ranges``, the sha256 of what it serves there (read in order, as the VMA's digest)."""
    try:
        with NbdConnection(conf.host, conf.port, timeout=30, tls=conf.tls()) as conn:
            size = conn.open(export_name).size
            if size < disk.source_disk.capacity_bytes:
                raise StepFailed(
                    f"verifying: disk {unit}: the volume holds {size} bytes, the source "
                    f"{disk.source_disk.capacity_bytes}: it must be grown first"
                )
            if ranges is None:
                return None
            hasher = hashlib.sha256()
            for offset, length in ranges:
                end = offset + length
                if end > size:
                    raise StepFailed(
                        f"verifying: disk {unit}: cannot read it back: the VMA's digest covers bytes "
                        f"{offset}-{end}, the export serves {size}"
                    )
                while offset < end:
                    count = min(READ_BACK_CHUNK, end - offset)
                    hasher.update(conn.pread(offset, count))
                    offset += count
            return hasher.hexdigest()
    except (NbdUnavailable, NbdConnectionLost, OSError) as exc:
        # The node's NBD server is down or restarting (its supervisor brings it back): read again
        # after a back-off; the copy is not in doubt, only the reading.
        raise StepRetry(f"verifying: disk {unit}: cannot reach its export to read it back: {exc}") from exc
    except NbdError as exc:
        raise StepFailed(f"verifying: disk {unit}: cannot read it back through its export: {exc}") from exc


STEP_FUNCTIONS.update(
    {
        JobState.PROVISIONING: provision,
        JobState.ATTACHING: attach,
        JobState.EXPORTING: export,
        JobState.REPLICATING: replicate,
        JobState.VERIFYING: verify,
    }
)

# The failover's steps register themselves (they build on this module).
from . import failover  # noqa: E402, F401
