"""Failover: a VM's migrated volumes become a running CloudStack VM (docs/failover.md).

``readiness`` is the one list of checks the failover page, ``validate_failover`` and the failover's own
first step use. ``plan_for`` resolves the mappings (networks, offering, template) for one VM. The steps
below run in the job's state machine like a sync's (``workflow.run_job``): each is idempotent, looking
at what the cloud and the VMA hold now before it acts, so a worker that died anywhere is replaced by one
that carries on. A failed step after the readiness check puts everything back (``roll_back``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from exports.actions import ExportRequest, ensure_exports, retire_export
from exports.models import VMExportMapping

from .backends import get_compute_backend, get_vma_client, get_volume_backend
from .compute import Nic
from .events import record_job_event
from .models import (
    ACTIVE_STATES,
    DestinationVolume,
    FailoverPlan,
    JobKind,
    JobState,
    MigrationJob,
    NetworkMapping,
    OfferingMapping,
    OmaNode,
    SourceVM,
    TemplateMapping,
)
from .slots import Placer, mark_attached, release, this_node
from .vma_client import VmaError, VmaUnavailable
from .volumes import VolumeError
from .workflow import STEP_FUNCTIONS, StepFailed, StepRetry, beat, heartbeat_kept

Status_ = Literal["pass", "warn", "fail"]
WINDOWS = re.compile(r"win", re.IGNORECASE)


@dataclass
class Check:
    name: str
    status: Status_
    message: str


@dataclass
class Plan:
    """What a failover of one VM would build: resolved from the mappings and the VM's overrides."""

    name: str  # the CloudStack VM's name (ours: it ends in the source VM's id)
    offering: OfferingMapping | None = None
    template_id: str = ""
    nics: list[Nic] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)  # source networks with no mapping
    efi: bool = False


def failover_conf() -> dict[str, int | str]:
    return dict(settings.OMA_FAILOVER)


def vm_name(vm: SourceVM, test: bool) -> str:
    """A hostname CloudStack takes (letters, digits, hyphens, at most 63), unique to this source VM."""
    base = re.sub(r"[^a-z0-9-]+", "-", vm.name.lower()).strip("-")[:40] or "vm"
    return f"{base}{'-test' if test else ''}-{vm.vm_id.replace('-', '')[:8]}"


def pick_offering(vm: SourceVM) -> OfferingMapping | None:
    """The smallest mapped offering that fits the VM's CPUs and memory; else a custom one."""
    override = FailoverPlan.objects.filter(vm=vm).select_related("offering").first()
    if override is not None and override.offering is not None:
        return override.offering
    cpus, memory = vm.cpus or 1, vm.memory_mib or 1024
    sized = [o for o in OfferingMapping.objects.all() if not o.custom]
    fits = [o for o in sized if (o.cpus or 0) >= cpus and (o.memory_mib or 0) >= memory]
    if fits:
        return min(fits, key=lambda o: (o.cpus or 0, o.memory_mib or 0))
    return next((o for o in OfferingMapping.objects.all() if o.custom), None)


def plan_for(vm: SourceVM, test: bool = False) -> Plan:
    override = FailoverPlan.objects.filter(vm=vm).first()
    plan = Plan(name=vm_name(vm, test), offering=pick_offering(vm), efi=vm.firmware == "efi")
    template = TemplateMapping.objects.filter(firmware=vm.firmware or "bios").first()
    plan.template_id = (override.template_id if override and override.template_id else "") or (
        template.template_id if template else ""
    )
    mappings = {m.source_network: m for m in NetworkMapping.objects.all()}
    overrides = override.networks if override else {}
    default_test = str(failover_conf().get("TEST_NETWORK_ID", ""))
    for nic in vm.nics:
        network = nic.get("network", "")
        mapping = mappings.get(network)
        if test:
            target = (mapping.test_network_id if mapping else "") or default_test
        else:
            target = str(overrides.get(network) or (mapping.network_id if mapping else ""))
        if not target:
            plan.unmapped.append(network)
            continue
        # A test VM's MACs are not the source's: the source runs on, on its own network.
        plan.nics.append(Nic(target, "" if test else str(nic.get("mac", ""))))
    return plan


def _active_job(vm: SourceVM, exclude: MigrationJob | None) -> MigrationJob | None:
    jobs = vm.jobs.filter(state__in=ACTIVE_STATES)
    if exclude is not None:
        jobs = jobs.exclude(pk=exclude.pk)
    return jobs.first()


def readiness(vm: SourceVM, kind: str = JobKind.LIVE_FAILOVER, job: MigrationJob | None = None) -> list[Check]:
    """Every check a failover of ``vm`` depends on, each pass / warn / fail with a sentence."""
    test = kind == JobKind.TEST_FAILOVER
    checks: list[Check] = []
    if vm.migrated_at:
        checks.append(Check("migrated", "fail", f"{vm.name} was failed over already (VM {vm.destination_vm_id})"))
    last = vm.jobs.filter(kind=JobKind.SYNC, state=JobState.COMPLETED).order_by("-finished_at").first()
    if last is None or last.finished_at is None:
        checks.append(Check("sync", "fail", "no completed sync yet: migrate the VM first"))
    else:
        age = timezone.now() - last.finished_at
        hours = age.total_seconds() / 3600
        limit = int(failover_conf().get("SYNC_AGE_WARN_HOURS", 24))
        text = f"last sync {last.job_id} finished {_age(age)} ago"
        if hours > limit:
            checks.append(Check("sync", "warn", f"{text}: the final sync will carry everything since"))
        else:
            checks.append(Check("sync", "pass", text))
    other = _active_job(vm, job)
    if other is not None:
        checks.append(Check("jobs", "fail", f"{other.job_id} ({other.get_state_display()}) is active for this VM"))
    else:
        checks.append(Check("jobs", "pass", "no other job of this VM is active"))
    plan = plan_for(vm, test)
    checks += _mapping_checks(vm, plan, test)
    checks += _cloud_checks(vm, plan)
    if not test:
        checks.append(_vma_check(vm))
    if WINDOWS.search(vm.guest_os):
        checks.append(
            Check(
                "drivers",
                "warn",
                f"{vm.guest_os} needs virtio drivers to boot on KVM; this portal does not convert guests "
                "(virt-v2v-in-place), so install the drivers in the source before failing over",
            )
        )
    return checks


def _age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"


def _mapping_checks(vm: SourceVM, plan: Plan, test: bool) -> list[Check]:
    checks = []
    if not vm.nics:
        checks.append(Check("networks", "fail", "the VMA reports no NIC for this VM; a CloudStack VM needs one"))
    elif plan.unmapped:
        what = "test network" if test else "network mapping"
        checks.append(Check("networks", "fail", f"no {what} for: {', '.join(sorted(set(plan.unmapped)))}"))
    else:
        checks.append(Check("networks", "pass", f"{len(plan.nics)} NIC(s) mapped"))
    if plan.offering is None:
        size = f"{vm.cpus or '?'} vCPU, {vm.memory_mib or '?'} MiB"
        checks.append(Check("offering", "fail", f"no service offering mapped that fits {size}, and no custom one"))
    else:
        checks.append(Check("offering", "pass", f"service offering {plan.offering.name}"))
    if not plan.template_id:
        checks.append(Check("template", "fail", f"no placeholder template mapped for {vm.firmware or 'bios'} firmware"))
    else:
        checks.append(Check("template", "pass", f"placeholder template {plan.template_id}"))
    return checks


def _cloud_checks(vm: SourceVM, plan: Plan) -> list[Check]:
    checks = []
    compute = get_compute_backend()
    try:
        compute.check()
        networks = {n.id for n in compute.networks()}
        offerings = {o.id for o in compute.offerings()}
        templates = {t.id for t in compute.templates()}
    except VolumeError as exc:
        return [Check("cloud", "fail", f"CloudStack cannot be reached: {exc}")]
    checks.append(
        Check("cloud", "pass", "CloudStack answers" if compute.name == "cloudstack" else "the local cloud answers")
    )
    gone = [n.network_id for n in plan.nics if n.network_id not in networks]
    if plan.offering is not None and plan.offering.offering_id not in offerings:
        gone.append(f"offering {plan.offering.offering_id}")
    if plan.template_id and plan.template_id not in templates:
        gone.append(f"template {plan.template_id}")
    if gone:
        checks.append(Check("mappings", "fail", f"CloudStack has no {', '.join(gone)} (any longer)"))
    volumes = DestinationVolume.objects.filter(source_disk__vm=vm).select_related("source_disk")
    disks = vm.disks.count()
    backend = get_volume_backend()
    missing, unready = [], []
    for volume in volumes:
        try:
            found = backend.get_volume(volume.volume_id) if volume.volume_id else None
        except VolumeError:
            found = None
        if found is None:
            missing.append(str(volume.source_disk.unit_number))
        elif found.state not in ("", "Ready"):
            unready.append(f"{volume.source_disk.unit_number} ({found.state})")
    if missing or volumes.count() < disks:
        which = ", ".join(missing) or "some"
        checks.append(Check("volumes", "fail", f"disk(s) {which} have no volume in CloudStack: sync again"))
    elif unready:
        checks.append(Check("volumes", "fail", f"disk(s) {', '.join(unready)}: the volume is not Ready"))
    else:
        checks.append(Check("volumes", "pass", f"{disks} volume(s) present and Ready"))
    return checks


def _vma_check(vm: SourceVM) -> Check:
    vma = get_vma_client()
    try:
        state = vma.vm(vm.vm_id)["power_state"]
    except VmaError as exc:
        return Check("vma", "fail", f"the VMA cannot power the source down: {exc.message}")
    finally:
        vma.close()
    return Check("vma", "pass", f"the VMA answers; the source is {state}")


def blocking(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.status == "fail"]


# --- the steps ----------------------------------------------------------------------------------


def validate(job: MigrationJob, runner: str) -> None:
    with heartbeat_kept(job, runner):
        checks = readiness(job.vm, job.kind, job)
    failed = blocking(checks)
    warned = [c for c in checks if c.status == "warn"]
    if failed:
        raise StepFailed("not ready: " + "; ".join(c.message for c in failed))
    record_job_event(
        job,
        "failover.ready",
        step=JobState.VALIDATING,
        message=f"{len(checks)} checks passed" + (f" ({len(warned)} warning(s))" if warned else ""),
    )


def shut_down(job: MigrationJob, runner: str) -> None:
    """The guest shuts itself down (VMware Tools); it is powered off only if the operator allowed it."""
    timeout = int(failover_conf().get("SHUTDOWN_TIMEOUT", 300))
    vma = get_vma_client()
    try:
        state = vma.vm(job.vm.vm_id)["power_state"]
        if job.source_was_on is None:
            MigrationJob.objects.filter(pk=job.pk).update(source_was_on=state != "poweredOff")
            job.source_was_on = state != "poweredOff"
        if state == "poweredOff":
            record_job_event(job, "source.off", step=JobState.SHUTTING_DOWN, message="the source is off")
            return
        how = "guest shutdown"
        try:
            vma.power(job.vm.vm_id, "shutdown", timeout_seconds=timeout)
        except VmaUnavailable:
            raise
        except VmaError as exc:
            if not job.allow_power_off:
                raise StepFailed(
                    f"the guest cannot shut itself down ({exc.message}); allow a power-off to go on"
                ) from exc
            vma.power(job.vm.vm_id, "off")
            how = f"power-off (no guest shutdown: {exc.message})"
        deadline = time.monotonic() + timeout + 5
        while True:
            current = vma.vm(job.vm.vm_id)
            if current["power_state"] == "poweredOff":
                break
            timed_out = time.monotonic() > deadline or current["power_state"] == "poweredOn"
            if timed_out and how == "guest shutdown":
                if not job.allow_power_off:
                    raise StepFailed(f"the guest did not shut down within {timeout} s; allow a power-off to go on")
                vma.power(job.vm.vm_id, "off")
                how = f"power-off (the guest did not shut down within {timeout} s)"
            elif timed_out:
                raise StepFailed(f"the source did not power off: {current.get('power_state')}")
            beat(job, runner)
            time.sleep(0.2)
        record_job_event(job, "source.off", step=JobState.SHUTTING_DOWN, message=f"the source is off ({how})")
    except VmaUnavailable as exc:
        raise StepRetry(f"the VMA is unreachable: {exc.message}") from exc
    finally:
        vma.close()


def create_vm(job: MigrationJob, runner: str) -> None:
    test = job.kind == JobKind.TEST_FAILOVER
    plan = plan_for(job.vm, test)
    if plan.offering is None or not plan.template_id or plan.unmapped or not plan.nics:
        raise StepFailed("the VM's mappings changed since the readiness check; check them and retry")
    compute = get_compute_backend()
    with heartbeat_kept(job, runner):
        vm = compute.deploy_vm(
            plan.name,
            template_id=plan.template_id,
            offering_id=plan.offering.offering_id,
            nics=plan.nics,
            cpus=job.vm.cpus or 1,
            memory_mib=job.vm.memory_mib or 1024,
            efi=plan.efi,
        )
    MigrationJob.objects.filter(pk=job.pk).update(destination_vm_id=vm.id)
    job.destination_vm_id = vm.id
    where = "on the isolated test network" if test else f"with {len(plan.nics)} NIC(s)"
    record_job_event(job, "vm.created", step=JobState.CREATING_VM, message=f"{plan.name} ({vm.id}), stopped, {where}")


def _volumes(job: MigrationJob) -> list[DestinationVolume]:
    return list(
        DestinationVolume.objects.filter(source_disk__vm=job.vm)
        .select_related("source_disk")
        .order_by("source_disk__unit_number")
    )


def move_volumes(job: MigrationJob, runner: str) -> None:
    """The placeholder root goes; each volume leaves the OMA (a live failover withdraws its export first;
    a test keeps it, pointing at the by-id device that comes back after the test) and joins the VM: disk
    0 as its root (device id 0), the data disks in unit order."""
    compute = get_compute_backend()
    backend = get_volume_backend()
    live = job.kind == JobKind.LIVE_FAILOVER
    with heartbeat_kept(job, runner):
        vm = compute.get_vm(job.destination_vm_id)
        if vm is None:
            raise StepFailed(f"the destination VM {job.destination_vm_id} is gone")
        ours = {v.volume_id for v in _volumes(job)}
        root = vm.root
        if root is not None and root.volume_id not in ours:
            compute.detach(root.volume_id)
            compute.delete_volume(root.volume_id)
        for volume in _volumes(job):
            unit = volume.source_disk.unit_number
            if (
                live
                and VMExportMapping.objects.filter(
                    vm_id=job.vm.vm_id, disk_unit_number=unit, status=VMExportMapping.Status.ACTIVE
                ).exists()
            ):
                retire_export(vm_id=job.vm.vm_id, disk_unit=unit, actor=job.job_id)
            if volume.state in (DestinationVolume.State.ATTACHED, DestinationVolume.State.DETACHING):
                backend.detach_volume(volume.volume_id)
            if volume.node_id is not None:
                release(volume)
            compute.attach(volume.volume_id, vm.id, device_id=0 if unit == 0 else None)
            DestinationVolume.objects.filter(pk=volume.pk).update(state=DestinationVolume.State.IN_VM)
            beat(job, runner)
    record_job_event(
        job,
        "volumes.moved",
        step=JobState.MOVING_VOLUMES,
        message=f"{len(ours)} volume(s) on {vm.name}, disk 0 as its root; their OMA slots are free",
    )


def snapshot(job: MigrationJob, runner: str) -> None:
    compute = get_compute_backend()
    with heartbeat_kept(job, runner):
        snapshot_id = compute.snapshot_vm(job.destination_vm_id, f"oma-{job.job_id}")
    MigrationJob.objects.filter(pk=job.pk).update(snapshot_id=snapshot_id)
    job.snapshot_id = snapshot_id
    record_job_event(job, "vm.snapshot", step=JobState.SNAPSHOTTING, message=f"rollback point {snapshot_id}")


def start_vm(job: MigrationJob, runner: str) -> None:
    compute = get_compute_backend()
    timeout = int(failover_conf().get("START_TIMEOUT", 600))
    with heartbeat_kept(job, runner):
        compute.start_vm(job.destination_vm_id)
        deadline = time.monotonic() + timeout
        while True:
            vm = compute.get_vm(job.destination_vm_id)
            if vm is not None and vm.state == "Running":
                break
            if time.monotonic() > deadline:
                raise StepFailed(f"the VM is not Running {timeout} s after its start ({vm.state if vm else 'gone'})")
            time.sleep(1)
    if job.kind == JobKind.TEST_FAILOVER:
        minutes = int(failover_conf().get("TEST_MINUTES", 120))
        ends = timezone.now() + timedelta(minutes=minutes)
        MigrationJob.objects.filter(pk=job.pk).update(test_ends_at=ends)
        job.test_ends_at = ends
    record_job_event(job, "vm.running", step=JobState.STARTING_VM, message=f"{vm.name} is Running")


def roll_back(job: MigrationJob, runner: str) -> None:
    """Put everything back, whatever the failover got to: the destination VM stopped (a test's snapshot
    reverted, so the volumes hold the last sync again, and deleted), the volumes off it and back with
    the OMA (attached and exported again when slots allow, else at their next sync), the VM destroyed,
    and the source powered on if it was on. Each part looks before it acts."""
    compute = get_compute_backend()
    done: list[str] = []
    with heartbeat_kept(job, runner):
        # A deploy that failed (or whose worker died) left no id here: the VM is found by its name.
        if job.destination_vm_id:
            vm = compute.get_vm(job.destination_vm_id)
        else:
            vm = compute.find_vm(vm_name(job.vm, job.kind == JobKind.TEST_FAILOVER))
        if vm is not None:
            compute.stop_vm(vm.id)
            for snapshot_id in {job.snapshot_id, *vm.snapshots} - {""}:
                compute.revert_snapshot(snapshot_id)
                compute.delete_snapshot(snapshot_id)
                done.append("the test's writes reverted")
            for volume in _volumes(job):
                if any(d.volume_id == volume.volume_id for d in vm.disks):
                    compute.detach(volume.volume_id)
            compute.destroy_vm(vm.id)
            done.append(f"VM {vm.name} destroyed")
        # A live VM that was started may have written to its disks: the next sync copies them whole.
        started = (
            job.kind == JobKind.LIVE_FAILOVER
            and job.events.filter(kind="step.started", step=JobState.STARTING_VM).exists()
        )
        DestinationVolume.objects.filter(source_disk__vm=job.vm, state=DestinationVolume.State.IN_VM).update(
            state=DestinationVolume.State.DETACHED, node=None, device_path=""
        )
        if started:
            DestinationVolume.objects.filter(source_disk__vm=job.vm).update(full_copy_next=True)
            done.append("the VM ran: the next sync copies every disk whole")
        if job.vm.migrated_at:
            SourceVM.objects.filter(pk=job.vm.pk).update(migrated_at=None, destination_vm_id="")
        done.append(_give_back(job))
        if job.kind == JobKind.LIVE_FAILOVER and job.source_was_on:
            done.append(_power_on(job))
    record_job_event(job, "failover.put_back", step=JobState.ROLLING_BACK, message="; ".join(d for d in done if d))


def _give_back(job: MigrationJob) -> str:
    """Attach the VM's volumes to this node again and serve their exports (reused: the same names, the
    same by-id links), if the node has the slots; else they wait, detached, for the VM's next sync."""
    volumes = [v for v in _volumes(job) if v.volume_id]
    with transaction.atomic():
        node = OmaNode.objects.select_for_update().get(pk=(job.node_id or this_node().pk))
        reservation = Placer(node).place(volumes)
    if not reservation.reserved:
        return f"volumes kept detached ({reservation.wait_reason}); the next sync attaches them"
    requests = []
    for volume in volumes:
        volume.refresh_from_db()
        if volume.state == DestinationVolume.State.ATTACHED and volume.device_path:
            device = volume.device_path
        else:
            device = get_volume_backend().attach_volume(volume.volume_id)
            mark_attached([(volume, device)])
        requests.append(ExportRequest(job.vm.vm_id, job.vm.name, volume.source_disk.unit_number, device))
    ensure_exports(requests, actor=job.job_id)
    return f"{len(volumes)} volume(s) attached to the OMA again and exported"


def _power_on(job: MigrationJob) -> str:
    vma = get_vma_client()
    try:
        if vma.vm(job.vm.vm_id)["power_state"] != "poweredOn":
            vma.power(job.vm.vm_id, "on")
            return "the source is powered on again"
        return ""
    except VmaUnavailable as exc:
        raise StepRetry(f"the VMA is unreachable to power the source on: {exc.message}") from exc
    finally:
        vma.close()


STEP_FUNCTIONS.update(
    {
        JobState.VALIDATING: validate,
        JobState.SHUTTING_DOWN: shut_down,
        JobState.CREATING_VM: create_vm,
        JobState.MOVING_VOLUMES: move_volumes,
        JobState.SNAPSHOTTING: snapshot,
        JobState.STARTING_VM: start_vm,
        JobState.ROLLING_BACK: roll_back,
    }
)
