"""Warm migration on a schedule: each enabled group's members get an incremental sync when their last
sync is older than the group's interval, at most ``max_concurrent`` of the group at a time, never two
jobs for one VM (the database refuses a second active job). The node's follower calls this every tick."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Max, OuterRef, Q, Subquery, Sum
from django.utils import timezone

from .actions import MigrationError, start_migration
from .models import ACTIVE_STATES, JobDisk, JobState, MigrationGroup, MigrationJob, OmaNode, SourceVM

log = logging.getLogger(__name__)


@dataclass
class MemberSync:
    """What the group page shows of one member."""

    vm: SourceVM
    active_job: MigrationJob | None
    last_job: MigrationJob | None  # the latest finished job (completed, failed or cancelled)
    last_sync_at: datetime | None  # the latest completed sync's end
    bytes_moved: int  # by the latest completed sync
    next_sync_at: datetime | None  # None: disabled group, or a sync running now


def members(group: MigrationGroup) -> list[MemberSync]:
    """Every member with its last sync, the bytes it moved and when the next is due (four queries)."""
    vms = list(
        group.vms.order_by("name").annotate(
            last_sync_at=Max("jobs__finished_at", filter=Q(jobs__state=JobState.COMPLETED)),
            last_finished_at=Max("jobs__finished_at"),
        )
    )
    active = {j.vm_id: j for j in MigrationJob.objects.filter(vm__group=group, state__in=ACTIVE_STATES)}
    last_jobs: dict[int, MigrationJob] = {}
    for job in MigrationJob.objects.filter(vm__group=group, finished_at__isnull=False).order_by("vm_id", "finished_at"):
        last_jobs[job.vm_id] = job
    completed = (
        MigrationJob.objects.filter(vm=OuterRef("job__vm"), state=JobState.COMPLETED)
        .order_by("-finished_at")
        .values("pk")[:1]
    )
    moved = {
        int(vm_pk): int(total or 0)
        for vm_pk, total in JobDisk.objects.filter(job__vm__group=group, job=Subquery(completed))
        .values_list("job__vm_id")
        .annotate(total=Sum("bytes_done"))
        .values_list("job__vm_id", "total")
    }
    interval = timedelta(minutes=group.sync_interval_minutes)
    now = timezone.now()
    rows = []
    for vm in vms:
        last_finished: datetime | None = vm.last_finished_at
        if vm.pk in active or not group.enabled:
            next_at = None
        else:
            next_at = max(now, last_finished + interval) if last_finished else now
        rows.append(
            MemberSync(
                vm=vm,
                active_job=active.get(vm.pk),
                last_job=last_jobs.get(vm.pk),
                last_sync_at=vm.last_sync_at,
                bytes_moved=moved.get(vm.pk, 0),
                next_sync_at=next_at,
            )
        )
    return rows


def due_vms(group: MigrationGroup, now: datetime) -> list[SourceVM]:
    """Members with no active job whose last job ended an interval ago (or that never synced), the
    longest waiting first, as many as the group's concurrency leaves room for."""
    running = MigrationJob.objects.filter(vm__group=group, state__in=ACTIVE_STATES).count()
    room = group.max_concurrent - running
    if room <= 0:
        return []
    cutoff = now - timedelta(minutes=group.sync_interval_minutes)
    last = MigrationJob.objects.filter(vm=OuterRef("pk")).order_by("-created_at").values("finished_at")[:1]
    candidates = (
        group.vms.exclude(jobs__state__in=ACTIVE_STATES)
        .filter(migrated_at__isnull=True)  # failed over: it runs in CloudStack now
        .annotate(last_end=Subquery(last))
        .filter(Q(last_end__lte=cutoff) | Q(last_end__isnull=True))
        .exclude(disks__isnull=True)
        .distinct()
        .order_by("last_end", "name")
    )
    # A VM whose latest job never finished has last_end NULL too, but it has an active job and is out.
    return list(candidates[:room])


def start_due_syncs(node: OmaNode) -> list[str]:
    """Start every due member's sync; returns the job ids started. (All groups: on several nodes, the
    database's one-active-job rule keeps two followers from syncing one VM twice.)"""
    now = timezone.now()
    started = []
    for group in MigrationGroup.objects.filter(enabled=True):
        for vm in due_vms(group, now):
            try:
                job = start_migration(vm_id=vm.vm_id, requested_by=f"schedule:{group.name}")
            except MigrationError as exc:
                log.info("scheduled sync of %s not started: %s", vm.name, exc)
                continue
            started.append(job.job_id)
    return started
