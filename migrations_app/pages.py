"""What the operator pages show, built once for both readers: the views (a whole page or an htmx
fragment) and the live pages in ``live.py`` (fragments over the websocket). Reads only."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.db.models import Count, OuterRef, Prefetch, Q, QuerySet, Subquery, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from exports.models import NbdServerState

from .groups import members
from .models import (
    ACTIVE_STATES,
    SEQUENCES,
    WORKER_STEPS,
    JobDisk,
    JobEvent,
    JobKind,
    JobState,
    MigrationGroup,
    MigrationJob,
    SourceVM,
)

RECENT_EVENTS = 12


RECENT_JOBS = 8


ACTIVE_ON_DASHBOARD = 50


LATEST_JOB_OF_VM = Subquery(
    MigrationJob.objects.filter(vm=OuterRef("vm")).order_by("-created_at", "-id").values("job_id")[:1]
)


def attach_progress(jobs: Iterable[MigrationJob]) -> None:
    """Attach ``job.progress`` (done, total, rate, percent) from prefetched disks."""
    for job in jobs:
        disks = list(job.disks.all())
        done = sum(d.bytes_done for d in disks)
        total = sum(d.bytes_total for d in disks)
        rate = sum(d.throughput_bps for d in disks) if job.state == JobState.REPLICATING else 0
        samples = [int(v) for v in job.throughput_samples or [] if v]
        job.progress = {  # type: ignore[attr-defined]
            "done": done,
            "total": total,
            "rate": rate,
            "average_rate": sum(samples) // len(samples) if samples else 0,
            "percent": int(done * 100 / total) if total else 0,
            **story(job, disks),
        }


def story(job: MigrationJob, disks: list[JobDisk]) -> dict[str, Any]:
    """What kind of copy the job is: a full one, or an incremental since the VM's last completed sync
    (shown with that sync's time, recorded when the job was made)."""
    if job.kind != JobKind.SYNC:
        return {"kind": job.get_kind_display(), "since": None}
    if not any(d.previous_change_id for d in disks):
        return {"kind": "Full", "since": None}
    return {"kind": "Incremental", "since": job.since_sync_at}


def with_disks(queryset: QuerySet[MigrationJob]) -> QuerySet[MigrationJob]:
    return (
        queryset.select_related("vm", "node")
        .prefetch_related(
            Prefetch(
                "disks", JobDisk.objects.select_related("source_disk", "mapping").order_by("source_disk__unit_number")
            )
        )
        .annotate(latest_job_id=LATEST_JOB_OF_VM)
    )


def dashboard_context(operator: bool) -> dict[str, Any]:
    day_ago = timezone.now() - timedelta(days=1)
    counts = MigrationJob.objects.aggregate(
        active=Count("pk", filter=Q(state__in=[*WORKER_STEPS, JobState.CANCELLING])),
        queued=Count("pk", filter=Q(state=JobState.PENDING)),
        completed=Count("pk", filter=Q(state=JobState.COMPLETED, finished_at__gte=day_ago)),
        failed=Count("pk", filter=Q(state=JobState.FAILED, finished_at__gte=day_ago)),
    )
    active_jobs = list(
        with_disks(MigrationJob.objects.filter(state__in=ACTIVE_STATES)).order_by("created_at")[:ACTIVE_ON_DASHBOARD]
    )
    attach_progress(active_jobs)
    return {
        "counts": counts,
        "vm_count": SourceVM.objects.count(),
        "active_jobs": active_jobs,
        "nbd": NbdServerState.objects.first(),
        "recent_events": JobEvent.objects.select_related("job__vm").order_by("-id")[:RECENT_EVENTS],
        "recent_jobs": job_rows(MigrationJob.objects.exclude(state__in=ACTIVE_STATES)).order_by("-finished_at", "-id")[
            :RECENT_JOBS
        ],
        "can_operate": operator,
    }


def job_context(job: MigrationJob, operator: bool) -> dict[str, Any]:
    attach_progress([job])
    events = list(job.events.order_by("-id")[:200])
    if not hasattr(job, "latest_job_id"):  # with_disks() annotates it; a bare job asks once
        latest = job.vm.jobs.order_by("-created_at", "-id").values_list("job_id", flat=True).first()
        job.latest_job_id = latest  # type: ignore[attr-defined]
    if job.state == JobState.PENDING:
        ahead = MigrationJob.objects.filter(state=JobState.PENDING, created_at__lt=job.created_at).count()
        job.queue_place = ahead + 1  # type: ignore[attr-defined]
    return {
        "job": job,
        "disks": list(job.disks.all()),
        "events": event_rows(events),
        "timeline": timeline(job, events),
        "can_operate": operator,
    }


# How each event reads in the log: a sentence for people, not the event's kind.
EVENT_PHRASES = {
    "job.created": "Created",
    "job.queued": "Queued",
    "job.started": "Started",
    "job.retried": "Retried",
    "job.attempt_ended": "Attempt ended",
    "job.recovered": "Taken over by another worker",
    "job.cancel_requested": "Cancel asked for",
    "job.cancelled": "Cancelled",
    "job.completed": "Completed",
    "job.cleaned_up": "Cleaned up",
    "step.failed": "Failed",
    "step.error": "Error, trying again",
    "volume.ready": "Volume ready",
    "volume.grown": "Volume grown",
    "volume.replaced": "Volume replaced",
    "exports.ready": "Exports ready",
    "replication.started": "Copy started at the VMA",
    "replication.interrupted": "Copy interrupted",
    "replication.resumed": "Copy resumed",
    "sync.verified": "Verified",
    "failover.ready": "Ready to fail over",
    "source.off": "Source powered off",
    "vm.created": "VM created",
    "volumes.moved": "Volumes moved",
    "vm.snapshot": "Rollback point taken",
    "vm.running": "VM running",
    "failover.testing": "Test VM running",
    "failover.completed": "Failed over",
    "failover.rolling_back": "Putting everything back",
    "failover.put_back": "Put back",
    "failover.rolled_back": "Rolled back",
    "failover.test_ended": "Test ended",
}


def event_rows(events: list[JobEvent]) -> list[dict[str, Any]]:
    """The job's log, newest first, as people read it: a step's start and finish are one line ("Exporting
    over NBD, 1.2 s"), every other event a short phrase with its detail."""
    finished: dict[int, JobEvent] = {}
    open_steps: dict[str, int] = {}
    for event in sorted(events, key=lambda e: e.pk):
        if event.kind == "step.started":
            open_steps[event.step] = event.pk
        elif event.kind == "step.finished" and event.step in open_steps:
            finished[open_steps.pop(event.step)] = event
    folded = {e.pk for e in finished.values()}
    rows = []
    for event in events:
        if event.pk in folded:
            continue
        label = JobState(event.step).label if event.step in JobState.values else event.step
        if event.kind == "step.started":
            end = finished.get(event.pk)
            text = label + ("" if end else " (running)")
            duration = end.duration_ms if end else None
        else:
            text = EVENT_PHRASES.get(event.kind, event.kind.replace(".", " ").replace("_", " ").capitalize())
            duration = event.duration_ms
        rows.append(
            {
                "event": event,
                "kind": event.kind,
                "text": text,
                "step": label if event.kind != "step.started" else "",
                "duration_ms": duration,
            }
        )
    return rows


def timeline(job: MigrationJob, events: list[JobEvent]) -> list[dict[str, Any]]:
    """The job's steps in order, each done, running, waiting, failed/cancelled where it stopped, or not
    run. A failover that was put back shows the step it failed in, the steps it never reached, and the
    rollback as a step of its own; a test's end is part of a test failover's story."""
    steps = list(SEQUENCES[job.kind])
    rolling = job.current_step == JobState.ROLLING_BACK or job.state == JobState.ROLLED_BACK
    if job.kind == JobKind.TEST_FAILOVER or rolling:
        steps.append(JobState.ROLLING_BACK)
    test_ran = job.kind == JobKind.TEST_FAILOVER and job.test_ends_at is not None
    failed_in = ""
    if rolling and not test_ran:
        marker = next((e for e in events if e.kind == "failover.rolling_back"), None)
        failed_in = marker.step if marker and marker.step in steps else ""
    stopped = job.state in (JobState.FAILED, JobState.CANCELLED, JobState.CANCELLING)
    current = steps.index(JobState(job.current_step)) if job.current_step in steps else -1
    if job.state == JobState.TESTING:
        current = len(steps) - 1  # every step up to the test's end is done
    rows = []
    for index, step in enumerate(steps):
        started = next((e for e in reversed(events) if e.kind == "step.started" and e.step == step), None)
        finished = next((e for e in events if e.kind == "step.finished" and e.step == step), None)
        here = job.current_step == step
        note = ""
        if failed_in and step != JobState.ROLLING_BACK:
            stop = steps.index(JobState(failed_in))
            status = "done" if index < stop else "failed" if index == stop else "not run"
            note = "then put back" if index == stop else ""
        elif index < current or job.state in (JobState.COMPLETED, JobState.ROLLED_BACK):
            status = "done"  # the job went past it (its events may have been pruned since)
        elif stopped and here:
            # Where it stopped, and how far it got ("cancelled at 38 %"), not "waiting".
            status = {"failed": "failed", "cancelled": "cancelled"}.get(str(job.state), "cancelling")
            progress = job.progress  # type: ignore[attr-defined]
            if step == JobState.REPLICATING and progress["total"]:
                note = f"at {progress['percent']} %"
        elif stopped and index > current:
            status = "not run"
        elif job.state == step:
            status = "running"
        else:
            status = "waiting"
        rows.append(
            {
                "step": step,
                "label": JobState(step).label,
                "status": status,
                "note": note,
                "started_at": started.created_at if started else None,
                "duration_ms": finished.duration_ms if finished and status == "done" else None,
            }
        )
    return rows


def job_progress_context(job: MigrationJob, operator: bool) -> dict[str, Any]:
    """What the job page's progress and disks fragments need: job_context without timeline and events."""
    attach_progress([job])
    return {"job": job, "disks": list(job.disks.all()), "can_operate": operator}


def job_rows(queryset: QuerySet[MigrationJob]) -> QuerySet[MigrationJob]:
    return queryset.select_related("vm", "node").annotate(
        done=Coalesce(Sum("disks__bytes_done"), 0),
        total=Coalesce(Sum("disks__bytes_total"), 0),
        disk_count=Count("disks"),
        # A sync is incremental when a disk starts from an earlier sync's change id.
        incremental_disks=Count("disks", filter=~Q(disks__previous_change_id="")),
        # Only a VM's latest job may be retried: an older one says which job superseded it.
        latest_job_id=LATEST_JOB_OF_VM,
    )


def group_rows() -> QuerySet[MigrationGroup]:
    """Every group with its member count and running syncs (one query)."""
    return MigrationGroup.objects.annotate(
        member_count=Count("vms", distinct=True),
        running=Count("vms__jobs", filter=Q(vms__jobs__state__in=ACTIVE_STATES), distinct=True),
    ).order_by("name")


def group_context(group: MigrationGroup, operator: bool) -> dict[str, Any]:
    return {"group": group, "members": members(group), "can_operate": operator}
