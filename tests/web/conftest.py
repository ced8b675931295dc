"""Users in each role, logged-in clients, and rows for the pages to show."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

import pytest
from django.contrib.auth.models import Group, User
from django.test import Client
from django.utils import timezone

from exports.models import NbdServerState, VMExportMapping, export_name_for
from migrations_app.models import JobDisk, JobEvent, JobState, MigrationJob, SourceDisk, SourceVM
from omaportal.web.roles import setup_roles

PASSWORD = "correct horse battery staple"
UserFactory = Callable[[str], User]


@pytest.fixture
def make_user(db: None) -> UserFactory:
    setup_roles()

    def make(role: str) -> User:
        user = User.objects.create_user(f"{role}-{uuid.uuid4().hex[:6]}", password=PASSWORD)
        if role in ("viewer", "operator", "admin"):
            user.groups.add(Group.objects.get(name=role))
        return user

    return make


def client_as(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def operator(make_user: UserFactory) -> Client:
    return client_as(make_user("operator"))


@pytest.fixture
def viewer(make_user: UserFactory) -> Client:
    return client_as(make_user("viewer"))


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


@pytest.fixture
def nbd_state(db: None) -> NbdServerState:
    return NbdServerState.objects.create(
        backend="nbdkit", version="1.32.5", address="127.0.0.1:10809", health="ok", exports_expected=4, exports_served=4
    )
