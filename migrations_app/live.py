"""The migration pages, live: the dashboard, the jobs list, a job's page and the VM inventory. Each says
which outbox topics concern it and renders only the fragments a change touches.

The topics are named in ``topics.py``."""

from __future__ import annotations

from collections.abc import Iterable

from django.template.loader import render_to_string

from exports.topics import NBD
from live.registry import Changes, LivePage, register
from omaportal.web.roles import OPERATOR, live_role

from .models import MigrationGroup, MigrationJob
from .pages import (
    attach_progress,
    dashboard_context,
    group_context,
    job_context,
    job_progress_context,
    job_rows,
    with_disks,
)
from .topics import GROUP, INVENTORY, JOB, PROGRESS

DASHBOARD_PARTS = ["summary", "active-jobs", "recent-jobs", "recent-events", "nbd-card"]
JOB_PROGRESS_PARTS = ["job-progress", "job-disks"]


def render_dashboard(changes: Changes | None, role: str, key: int | None) -> Iterable[str]:
    operator = role == OPERATOR
    if changes is None or changes.keys(JOB) or NBD in changes:
        context = dashboard_context(operator)
        names = [n for n in DASHBOARD_PARTS if changes is None or NBD in changes or n != "nbd-card"]
        return [render_to_string(f"migrations_app/dashboard.html#{name}", context) for name in names]
    # Progress alone: only the moving jobs' cards, not the lists around them.
    jobs = list(with_disks(MigrationJob.objects.filter(pk__in=changes.keys(PROGRESS))))
    attach_progress(jobs)
    return [
        render_to_string("migrations_app/dashboard.html#job-card", {"job": job, "can_operate": operator})
        for job in jobs
    ]


def render_job_list(changes: Changes | None, role: str, key: int | None) -> Iterable[str]:
    """The rows of jobs that changed (a snapshot sends nothing: the page was just rendered whole)."""
    if changes is None:
        return []
    touched = changes.keys(JOB, PROGRESS)
    if not touched:
        return []
    context = {"can_operate": role == OPERATOR}
    return [
        render_to_string("migrations_app/job_list.html#job-row", {**context, "job": job})
        for job in job_rows(MigrationJob.objects.filter(pk__in=touched))
    ]


def render_job(changes: Changes | None, role: str, key: int | None) -> Iterable[str]:
    """The whole live part of a job's page when its state, step or events changed; only its progress
    bar and disks when only bytes moved."""
    if key is None or (changes is not None and key not in changes.keys(JOB, PROGRESS)):
        return []
    job = with_disks(MigrationJob.objects.filter(pk=key)).first()
    if job is None:
        return []
    operator = role == OPERATOR
    if changes is None or key in changes.keys(JOB):
        return [render_to_string("migrations_app/job_detail.html#job-live", job_context(job, operator))]
    context = job_progress_context(job, operator)
    return [render_to_string(f"migrations_app/job_detail.html#{name}", context) for name in JOB_PROGRESS_PARTS]


def render_inventory(changes: Changes | None, role: str, key: int | None) -> Iterable[str]:
    """The inventory table is filtered and paged per browser, so the relay does not render it: it sends
    a trigger that makes the page fetch its own table again, with its own filter and page (a snapshot
    too: a page that reconnects after an outage catches up the same way). The page keeps its ticks."""
    return [render_to_string("migrations_app/inventory.html#inventory-refresh")]


def render_group(changes: Changes | None, role: str, key: int | None) -> Iterable[str]:
    """A group's members table, again whenever the group changed or one of its members' jobs did."""
    group = MigrationGroup.objects.filter(pk=key).first() if key is not None else None
    if group is None:
        return []
    if changes is not None and key not in changes.keys(GROUP):
        touched = changes.keys(JOB, PROGRESS)
        if not touched or not MigrationJob.objects.filter(pk__in=touched, vm__group=group).exists():
            return []
    context = group_context(group, role == OPERATOR)
    return [render_to_string("migrations_app/group_detail.html#group-live", context)]


def group_pk_for(key: str) -> int | None:
    return int(key) if key.isdigit() and MigrationGroup.objects.filter(pk=int(key)).exists() else None


def job_pk_for(job_id: str) -> int | None:
    return MigrationJob.objects.filter(job_id=job_id).values_list("pk", flat=True).first()


register(LivePage("dashboard", frozenset({JOB, PROGRESS, NBD}), live_role, render_dashboard))
register(LivePage("jobs", frozenset({JOB, PROGRESS}), live_role, render_job_list))
register(LivePage("job", frozenset({JOB, PROGRESS}), live_role, render_job, resolve_key=job_pk_for))
register(LivePage("inventory", frozenset({INVENTORY, JOB}), live_role, render_inventory))
register(LivePage("group", frozenset({GROUP, JOB, PROGRESS}), live_role, render_group, resolve_key=group_pk_for))
