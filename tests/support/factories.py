"""Users in each role and rows for the pages to show."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from exports.models import VMExportMapping, export_name_for
from migrations_app.models import JobDisk, JobEvent, JobState, MigrationJob, SourceDisk, SourceVM

PASSWORD = "correct horse battery staple"


def client_as(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def make_vm(n: int, disks: int = 2) -> SourceVM:
    vm = SourceVM.objects.create(vm_id=str(uuid.uuid4()), name=f"vm-{n:05d}", power_state="poweredOn")
    for unit in range(disks):
        SourceDisk.objects.create(vm=vm, unit_number=unit, key=2000 + unit, capacity_bytes=(unit + 1) << 30)
    return vm


def make_jobs(count: int, state: str = JobState.COMPLETED, disks: int = 2) -> list[MigrationJob]:
    """``count`` jobs (each on its own VM) with their disks, a mapping per disk and a few events."""
    jobs = []
    now = timezone.now()
    for n in range(count):
        vm = make_vm(n + MigrationJob.objects.count() * 10, disks)
        job = MigrationJob.objects.create(
            vm=vm,
            state=state,
            current_step=JobState.REPLICATING,
            requested_by="tester",
            finished_at=None if state in (JobState.REPLICATING, JobState.PENDING) else now - timedelta(minutes=n),
            throughput_samples=[100e6, 120e6, 90e6],
        )
        for disk in vm.disks.all():
            mapping = VMExportMapping.objects.create(
                vm_id=vm.vm_id,
                vm_name=vm.name,
                disk_unit_number=disk.unit_number,
                export_name=export_name_for(vm.vm_id, disk.unit_number),
                device_path=f"/dev/disk/by-id/virtio-{uuid.uuid4().hex[:20]}",
                status=VMExportMapping.Status.ACTIVE,
            )
            JobDisk.objects.create(
                job=job,
                source_disk=disk,
                mapping=mapping,
                bytes_total=disk.capacity_bytes,
                bytes_done=disk.capacity_bytes // 2,
                throughput_bps=50_000_000,
            )
        for kind, step in (("job.created", ""), ("step.started", JobState.PROVISIONING)):
            JobEvent.objects.create(job=job, kind=kind, step=step)
        jobs.append(job)
    return jobs


UserFactory = Callable[[str], User]
