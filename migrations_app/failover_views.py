"""Failover pages: one per VM (readiness, the plan, the buttons) and the mappings page.

Thin views like ``views.py``: reads build a context, writes call ``actions``. A live failover must be
confirmed by typing the VM's name; the job it starts is followed live on its job page.
"""

from __future__ import annotations

from django import forms
from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST

from omaportal.web.roles import can_operate, operator_required, viewer_required

from .actions import MigrationError, end_test_failover, rollback_failover, start_failover
from .failover import blocking, plan_for, readiness
from .forms import NetworkMappingForm, OfferingMappingForm, TemplateMappingForm
from .models import (
    SEQUENCES,
    DestinationVolume,
    JobKind,
    JobState,
    MigrationJob,
    NetworkMapping,
    OfferingMapping,
    SourceVM,
    TemplateMapping,
)

MAPPING_FORMS: dict[str, type[forms.ModelForm]] = {
    "network": NetworkMappingForm,
    "offering": OfferingMappingForm,
    "template": TemplateMappingForm,
}


@require_GET
@viewer_required
def vm_failover(request: HttpRequest, vm_id: str) -> HttpResponse:
    vm = get_object_or_404(SourceVM.objects.prefetch_related("disks"), vm_id=vm_id)
    live_checks = readiness(vm, JobKind.LIVE_FAILOVER)
    test_checks = readiness(vm, JobKind.TEST_FAILOVER)
    last = vm.jobs.exclude(kind=JobKind.SYNC).order_by("-created_at", "-id").first()
    context = {
        "vm": vm,
        "live_checks": live_checks,
        "test_checks": test_checks,
        "live_ready": not blocking(live_checks),
        "test_ready": not blocking(test_checks),
        "live_plan": plan_for(vm),
        "test_plan": plan_for(vm, test=True),
        "live_steps": [JobState(s).label for s in SEQUENCES[JobKind.LIVE_FAILOVER]],
        "test_steps": [JobState(s).label for s in SEQUENCES[JobKind.TEST_FAILOVER]],
        "failover_job": last,
        "volume_nodes": sorted(
            set(
                DestinationVolume.objects.filter(source_disk__vm=vm, node__isnull=False).values_list(
                    "node__name", flat=True
                )
            )
        ),
        "can_operate": can_operate(request.user),
    }
    return render(request, "migrations_app/vm_failover.html", context)


@require_POST
@operator_required
def vm_failover_start(request: HttpRequest, vm_id: str) -> HttpResponse:
    vm = get_object_or_404(SourceVM, vm_id=vm_id)
    kind = request.POST.get("kind", "")
    if kind == JobKind.LIVE_FAILOVER and request.POST.get("confirm_name", "").strip() != vm.name:
        messages.error(request, f"Type the VM's name, {vm.name}, to confirm a live failover: it shuts the source down.")
        return redirect("vm-failover", vm_id=vm.vm_id)
    try:
        job = start_failover(
            vm_id=vm.vm_id,
            kind=kind,
            allow_power_off=request.POST.get("allow_power_off") == "on",
            requested_by=request.user.get_username(),
        )
    except MigrationError as exc:
        messages.error(request, str(exc))
        return redirect("vm-failover", vm_id=vm.vm_id)
    messages.success(request, f"{job.get_kind_display()} of {vm.name} started: {job.job_id}.")
    return redirect("job-detail", job_id=job.job_id)


@require_POST
@operator_required
def vm_failover_end(request: HttpRequest, vm_id: str) -> HttpResponse:
    """End a running test, or roll the last failover back (the same button on the job page)."""
    vm = get_object_or_404(SourceVM, vm_id=vm_id)
    actions = {"end_test": end_test_failover, "rollback": rollback_failover}
    action = actions.get(request.POST.get("what", ""))
    if action is None:
        return HttpResponse("what must be end_test or rollback\n", status=400)
    try:
        job = action(vm_id=vm.vm_id, actor=request.user.get_username())
    except MigrationError as exc:
        messages.error(request, str(exc))
        return redirect("vm-failover", vm_id=vm.vm_id)
    messages.success(request, f"{job.job_id}: putting everything back.")
    return redirect("job-detail", job_id=job.job_id)


@viewer_required
def failover_mappings(request: HttpRequest) -> HttpResponse:
    """Every mapping; an operator adds or changes one (checked against the cloud) or deletes one."""
    kind = request.POST.get("kind") or request.GET.get("kind") or "network"
    if request.method == "POST" and kind not in MAPPING_FORMS:
        return HttpResponse(f"kind must be one of {', '.join(MAPPING_FORMS)}\n", status=400)
    form_class = MAPPING_FORMS.get(kind, NetworkMappingForm)
    model = form_class._meta.model
    instance = None
    pk = request.POST.get("pk") or request.GET.get("edit")
    if pk and str(pk).isdigit():
        instance = model.objects.filter(pk=int(pk)).first()
    form = form_class(instance=instance)
    if request.method == "POST":
        if not can_operate(request.user):
            return HttpResponse("operators only", status=403)
        if request.POST.get("delete") and instance is not None:
            instance.delete()
            messages.success(request, f"Mapping {instance} deleted.")
            return redirect("failover-mappings")
        form = form_class(request.POST, instance=instance)
        if form.is_valid():
            saved = form.save()
            messages.success(request, f"Mapping {saved} saved.")
            return redirect("failover-mappings")
    context = {
        "kind": kind if kind in MAPPING_FORMS else "network",
        "form": form,
        "editing": instance,
        "networks": NetworkMapping.objects.all(),
        "offerings": OfferingMapping.objects.all(),
        "templates": TemplateMapping.objects.all(),
        "failovers": MigrationJob.objects.exclude(kind=JobKind.SYNC).select_related("vm")[:20],
        "can_operate": can_operate(request.user),
    }
    return render(request, "migrations_app/failover_mappings.html", context)
