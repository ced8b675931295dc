"""Operator pages: dashboard, VM inventory, jobs list and job detail, and the three job actions.

Thin views: reads build a context (the same builders feed the websocket relay, so a page and a live
update render the same partials), writes call ``actions``. A list view answers only its table when
the request comes from htmx (filters and pagination swap the table, not the page).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import Count, OuterRef, Prefetch, Q, QuerySet, Subquery, Sum
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_POST

from exports.models import NbdServerState, VMExportMapping
from omaportal.web.roles import can_operate, operator_required, viewer_required

from .actions import MigrationError, cancel_job, retry_job, start_migration, sync_inventory
from .backends import get_vma_client
from .models import ACTIVE_STATES, STEPS, JobDisk, JobEvent, JobState, MigrationJob, SourceVM
from .vma_client import VmaError

log = logging.getLogger(__name__)
JOBS_PER_PAGE = 25
VMS_PER_PAGE = 50
RECENT_EVENTS = 12
RECENT_JOBS = 8
ACTIVE_ON_DASHBOARD = 50


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
        }


def with_disks(queryset: QuerySet[MigrationJob]) -> QuerySet[MigrationJob]:
    return queryset.select_related("vm").prefetch_related(
        Prefetch("disks", JobDisk.objects.select_related("source_disk", "mapping").order_by("source_disk__unit_number"))
    )


def dashboard_context(operator: bool) -> dict[str, Any]:
    day_ago = timezone.now() - timedelta(days=1)
    counts = MigrationJob.objects.aggregate(
        active=Count("pk", filter=Q(state__in=[*STEPS, JobState.CANCELLING])),
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
    timeline = []
    for step in STEPS:
        started = next((e for e in reversed(events) if e.kind == "step.started" and e.step == step), None)
        finished = next((e for e in events if e.kind == "step.finished" and e.step == step), None)
        failed = job.state == JobState.FAILED and job.current_step == step
        if finished is not None and (
            STEPS.index(step) < STEPS.index(JobState(job.current_step)) or job.state == JobState.COMPLETED
        ):
            status = "done"
        elif failed:
            status = "failed"
        elif job.state == step:
            status = "running"
        else:
            status = "waiting"
        timeline.append(
            {
                "step": step,
                "label": JobState(step).label,
                "status": status,
                "started_at": started.created_at if started else None,
                "duration_ms": finished.duration_ms if finished and status == "done" else None,
            }
        )
    return {"job": job, "disks": list(job.disks.all()), "events": events, "timeline": timeline, "can_operate": operator}


def job_progress_context(job: MigrationJob, operator: bool) -> dict[str, Any]:
    """What the job page's progress and disks fragments need: job_context without timeline and events."""
    attach_progress([job])
    return {"job": job, "disks": list(job.disks.all()), "can_operate": operator}


def job_rows(queryset: QuerySet[MigrationJob]) -> QuerySet[MigrationJob]:
    return queryset.select_related("vm").annotate(
        done=Coalesce(Sum("disks__bytes_done"), 0),
        total=Coalesce(Sum("disks__bytes_total"), 0),
        disk_count=Count("disks"),
    )


@require_GET
@viewer_required
def dashboard(request: HttpRequest) -> HttpResponse:
    return render(request, "migrations_app/dashboard.html", dashboard_context(can_operate(request.user)))


@require_GET
@viewer_required
def inventory(request: HttpRequest) -> HttpResponse:
    query = request.GET.get("q", "").strip()
    vms = SourceVM.objects.prefetch_related("disks").order_by("name")
    if query:
        vms = vms.filter(Q(name__icontains=query) | Q(vm_id__startswith=query.lower()))
    last_jobs = MigrationJob.objects.filter(vm=OuterRef("pk")).order_by("-created_at", "-id")
    vms = vms.annotate(
        last_job_id=Subquery(last_jobs.values("job_id")[:1]), last_job_state=Subquery(last_jobs.values("state")[:1])
    )
    page = Paginator(vms, VMS_PER_PAGE).get_page(request.GET.get("page"))
    vm_ids = [vm.vm_id for vm in page]
    mappings = {(m.vm_id, m.disk_unit_number): m for m in VMExportMapping.objects.filter(vm_id__in=vm_ids)}
    for vm in page:
        vm.busy = vm.last_job_state in ACTIVE_STATES  # type: ignore[attr-defined]
        for disk in vm.disks.all():
            disk.mapping = mappings.get((vm.vm_id, disk.unit_number))  # type: ignore[attr-defined]
    context = {"page": page, "q": query, "can_operate": can_operate(request.user)}
    template = (
        "migrations_app/inventory.html#vm-table" if getattr(request, "htmx", False) else "migrations_app/inventory.html"
    )
    return render(request, template, context)


@require_POST
@operator_required
def migrate_vms(request: HttpRequest) -> HttpResponse:
    vm_ids = request.POST.getlist("vm")
    if not vm_ids:
        messages.warning(request, "Select at least one VM to migrate.")
        return redirect("inventory")
    started = []
    for vm_id in vm_ids[:100]:
        try:
            started.append(start_migration(vm_id=vm_id, requested_by=request.user.get_username()))
        except MigrationError as exc:
            messages.error(request, str(exc))
    if started:
        names = ", ".join(f"{job.vm.name} ({job.job_id})" for job in started)
        messages.success(request, f"Started {len(started)} migration(s): {names}")
    return redirect("dashboard" if started else "inventory")


@require_POST
@operator_required
def refresh_inventory(request: HttpRequest) -> HttpResponse:
    client = get_vma_client()
    try:
        count = sync_inventory(client.inventory())
    except VmaError as exc:
        messages.error(request, f"Could not read the inventory from the VMA: {exc}")
    else:
        log.info("inventory refreshed from the VMA by %s: %d VMs", request.user.get_username(), count)
        messages.success(request, f"Inventory refreshed from the VMA: {count} VMs.")
    finally:
        client.close()
    return redirect("inventory")


@require_GET
@viewer_required
def job_list(request: HttpRequest) -> HttpResponse:
    jobs = MigrationJob.objects.order_by("-created_at", "-id")
    state = request.GET.get("state", "")
    if state == "active":
        jobs = jobs.filter(state__in=ACTIVE_STATES)
    elif state in JobState.values:
        jobs = jobs.filter(state=state)
    else:
        state = ""
    vm = request.GET.get("vm", "").strip()
    if vm:
        jobs = jobs.filter(Q(vm__name__icontains=vm) | Q(vm__vm_id__startswith=vm.lower()))
    paginator = Paginator(job_rows(jobs), JOBS_PER_PAGE)
    page = paginator.get_page(request.GET.get("page"))
    context = {
        "page": page,
        "state": state,
        "vm": vm,
        "states": [("active", "Active"), *JobState.choices],
        "can_operate": can_operate(request.user),
    }
    template = (
        "migrations_app/job_list.html#job-table" if getattr(request, "htmx", False) else "migrations_app/job_list.html"
    )
    return render(request, template, context)


@require_GET
@viewer_required
def job_detail(request: HttpRequest, job_id: str) -> HttpResponse:
    job = get_object_or_404(with_disks(MigrationJob.objects.all()), job_id=job_id)
    return render(request, "migrations_app/job_detail.html", job_context(job, can_operate(request.user)))


@require_POST
@operator_required
def job_cancel(request: HttpRequest, job_id: str) -> HttpResponse:
    try:
        job = cancel_job(job_id=job_id, actor=request.user.get_username())
        messages.success(request, f"{job.job_id}: {job.get_state_display().lower()}.")
    except MigrationError as exc:
        messages.error(request, str(exc))
    return redirect("job-detail", job_id=job_id)


@require_POST
@operator_required
def job_retry(request: HttpRequest, job_id: str) -> HttpResponse:
    try:
        job = retry_job(job_id=job_id, actor=request.user.get_username())
        messages.success(
            request, f"{job.job_id}: retrying (attempt {job.attempt}) from {job.current_step or 'the start'}."
        )
    except MigrationError as exc:
        messages.error(request, str(exc))
    return redirect("job-detail", job_id=job_id)
