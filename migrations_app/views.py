"""Operator pages: dashboard, VM inventory, jobs list and job detail, and the three job actions.

Thin views: reads build a context (the same builders feed the websocket relay, so a page and a live
update render the same partials), writes call ``actions``. A list view answers only its table when
the request comes from htmx (filters and pagination swap the table, not the page).
"""

from __future__ import annotations

import hmac
import logging

from django.conf import settings
from django.contrib import messages
from django.db.models import Max, OuterRef, Q, Subquery, Sum
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from exports.models import VMExportMapping
from omaportal.web.rendering import PER_PAGE_CHOICES, ListView, render_page_or_partial
from omaportal.web.roles import can_operate, can_view, operator_required, viewer_required

from .actions import MigrationError, cancel_job, retry_job, save_group, start_migration, sync_inventory
from .backends import get_vma_client
from .forms import GroupForm
from .metrics import PortalCollector
from .models import ACTIVE_STATES, JobKind, JobState, MigrationGroup, MigrationJob, SourceVM
from .pages import dashboard_context, group_context, group_rows, job_context, job_rows, with_disks
from .vma_client import VmaError

log = logging.getLogger(__name__)
JOBS_PER_PAGE = 25
VMS_PER_PAGE = 50


@require_GET
@viewer_required
def dashboard(request: HttpRequest) -> HttpResponse:
    return render(request, "migrations_app/dashboard.html", dashboard_context(can_operate(request.user)))


VM_SORTS = {"name": "name", "power": "power_state", "size": "size", "seen": "last_seen_at"}


@require_GET
@viewer_required
def inventory(request: HttpRequest) -> HttpResponse:
    query = request.GET.get("q", "").strip()
    vms = SourceVM.objects.prefetch_related("disks")
    if query:
        vms = vms.filter(Q(name__icontains=query) | Q(vm_id__startswith=query.lower()))
    last_jobs = MigrationJob.objects.filter(vm=OuterRef("pk")).order_by("-created_at", "-id")
    vms = vms.annotate(
        last_job_id=Subquery(last_jobs.values("job_id")[:1]), last_job_state=Subquery(last_jobs.values("state")[:1])
    )
    vms = vms.annotate(size=Sum("disks__capacity_bytes"))
    view = ListView.of(request, VM_SORTS, "name", VMS_PER_PAGE)
    page = view.paginate(request, vms, VM_SORTS)
    vm_ids = [vm.vm_id for vm in page]
    mappings = {(m.vm_id, m.disk_unit_number): m for m in VMExportMapping.objects.filter(vm_id__in=vm_ids)}
    # The last refresh saw every VM the VMA reported; one it did not see is flagged.
    refreshed_at = SourceVM.objects.aggregate(last=Max("last_seen_at"))["last"]
    for vm in page:
        vm.busy = vm.last_job_state in ACTIVE_STATES
        vm.total_bytes = sum(d.capacity_bytes for d in vm.disks.all())
        vm.gone = bool(refreshed_at and vm.last_seen_at and vm.last_seen_at < refreshed_at)
        for disk in vm.disks.all():
            disk.mapping = mappings.get((vm.vm_id, disk.unit_number))
    context = {
        "page": page,
        "q": query,
        "sort": view.sort,
        "per_page": view.per_page,
        "per_page_choices": PER_PAGE_CHOICES,
        "refreshed_at": refreshed_at,
        "can_operate": can_operate(request.user),
    }
    return render_page_or_partial(request, "migrations_app/inventory.html", "vm-table", context)


@require_POST
@operator_required
def migrate_vms(request: HttpRequest) -> HttpResponse:
    vm_ids = request.POST.getlist("vm")
    if not vm_ids:
        messages.warning(request, "Select at least one VM to migrate.")
        return redirect("inventory")
    if request.POST.get("confirm") != "yes":
        return render(request, "migrations_app/migrate_review.html", review_context(vm_ids[:100]))
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


def review_context(vm_ids: list[str]) -> dict[str, object]:
    """What the operator confirms before anything starts: per VM full or incremental, its size, power
    state, and whether it can start at all."""
    vms = list(SourceVM.objects.filter(vm_id__in=vm_ids).prefetch_related("disks").order_by("name"))
    active = set(MigrationJob.objects.filter(vm__in=vms, state__in=ACTIVE_STATES).values_list("vm_id", flat=True))
    synced = set(
        MigrationJob.objects.filter(vm__in=vms, kind=JobKind.SYNC, state=JobState.COMPLETED).values_list(
            "vm_id", flat=True
        )
    )
    rows = []
    for vm in vms:
        size = sum(d.capacity_bytes for d in vm.disks.all())
        blocker = (
            "a job is active"
            if vm.pk in active
            else "failed over: it runs in CloudStack"
            if vm.migrated_at
            else "no disks"
            if not vm.disks.all()
            else ""
        )
        rows.append({"vm": vm, "size": size, "incremental": vm.pk in synced, "blocker": blocker})
    startable = [r for r in rows if not r["blocker"]]
    return {
        "rows": rows,
        "startable": startable,
        "total": sum(int(r["size"]) for r in startable),  # type: ignore[call-overload]
        "full": sum(1 for r in startable if not r["incremental"]),
    }


@require_POST
@operator_required
def refresh_inventory(request: HttpRequest) -> HttpResponse:
    try:
        client = get_vma_client()
    except VmaError as exc:
        messages.error(request, f"Could not read the inventory from the VMA: {exc}")
        return redirect("inventory")
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


JOB_SORTS = {
    "created": "created_at",
    "vm": "vm__name",
    "kind": "kind",
    "state": "state",
    "finished": "finished_at",
    "data": "done",
}


@require_GET
@viewer_required
def job_list(request: HttpRequest) -> HttpResponse:
    jobs = MigrationJob.objects.all()
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
    view = ListView.of(request, JOB_SORTS, "-created", JOBS_PER_PAGE)
    page = view.paginate(request, job_rows(jobs), JOB_SORTS)
    context = {
        "page": page,
        "sort": view.sort,
        "per_page": view.per_page,
        "per_page_choices": PER_PAGE_CHOICES,
        "state": state,
        "vm": vm,
        "states": [("active", "Active"), *JobState.choices],
        "can_operate": can_operate(request.user),
    }
    return render_page_or_partial(request, "migrations_app/job_list.html", "job-table", context)


@require_GET
@viewer_required
def job_detail(request: HttpRequest, job_id: str) -> HttpResponse:
    job = get_object_or_404(with_disks(MigrationJob.objects.all()), job_id=job_id)
    return render(request, "migrations_app/job_detail.html", job_context(job, can_operate(request.user)))


@require_POST
@operator_required
def job_cancel(request: HttpRequest, job_id: str) -> HttpResponse:
    # No flash on success: the page shows the job's state live, and a message saying "cancelling" would
    # outlive it. A refusal is said (it reports no state).
    try:
        cancel_job(job_id=job_id, actor=request.user.get_username())
    except MigrationError as exc:
        messages.error(request, str(exc))
    return redirect("job-detail", job_id=job_id)


@require_POST
@operator_required
def job_retry(request: HttpRequest, job_id: str) -> HttpResponse:
    try:
        retry_job(job_id=job_id, actor=request.user.get_username())
    except MigrationError as exc:
        messages.error(request, str(exc))
    return redirect("job-detail", job_id=job_id)


@require_GET
@viewer_required
def group_list(request: HttpRequest) -> HttpResponse:
    context = {"groups": group_rows(), "can_operate": can_operate(request.user)}
    return render(request, "migrations_app/group_list.html", context)


@require_GET
@viewer_required
def group_detail(request: HttpRequest, pk: int) -> HttpResponse:
    group = get_object_or_404(MigrationGroup, pk=pk)
    return render(request, "migrations_app/group_detail.html", group_context(group, can_operate(request.user)))


@operator_required
def group_edit(request: HttpRequest, pk: int | None = None) -> HttpResponse:
    """Create a group (no pk) or change one: its schedule, concurrency and members."""
    group = get_object_or_404(MigrationGroup, pk=pk) if pk is not None else None
    form = GroupForm(request.POST or None, instance=group)
    if request.method == "POST" and form.is_valid():
        try:
            saved = save_group(
                group=group,
                name=form.cleaned_data["name"],
                sync_interval_minutes=form.cleaned_data["sync_interval_minutes"],
                max_concurrent=form.cleaned_data["max_concurrent"],
                enabled=form.cleaned_data["enabled"],
                vm_ids=[vm.vm_id for vm in form.cleaned_data["vms"]],
                actor=request.user.get_username(),
            )
        except MigrationError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(
                request,
                f"Group {saved.name} saved: {saved.vms.count()} VM(s), a sync every "
                f"{saved.sync_interval_minutes} min, at most {saved.max_concurrent} at once.",
            )
            return redirect("group-detail", pk=saved.pk)
    return render(request, "migrations_app/group_form.html", {"form": form, "group": group})


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text format. A scraper presents OMA_METRICS_TOKEN as a bearer token; a person needs a
    login with the viewer role. Anyone else gets 401, and nothing about the fleet."""
    token = str(getattr(settings, "OMA_METRICS_TOKEN", ""))
    presented = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    allowed = (bool(token) and hmac.compare_digest(presented.encode(), token.encode())) or can_view(request.user)
    if not allowed:
        response = HttpResponse("metrics need the scrape token or a viewer login\n", status=401)
        response["WWW-Authenticate"] = 'Bearer realm="oma-metrics"'
        return response
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PortalCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
