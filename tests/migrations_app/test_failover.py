"""Failover end to end: the local cloud (and CloudStack's rules through the signed fake), real nbdkit,
the VMA simulator moving real bytes. A live failover boots the migrated disks; a test failover gives
them back untouched; a failure at any step puts everything back."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from devtools.cloud import map_cloud
from exports.models import VMExportMapping
from migrations_app import actions
from migrations_app.backends import get_compute_backend, get_volume_backend
from migrations_app.failover import readiness
from migrations_app.models import DestinationVolume, JobKind, JobState, MigrationJob, SourceVM
from migrations_app.volumes import LocalVolumeBackend
from tests.support.flows import assert_copied, drive, migrate, wire
from tests.support.nbd import RunningServer
from tests.support.vma import Sim

pytestmark = pytest.mark.django_db(transaction=True)


def sha_of(path: Path, length: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        left = length
        while left:
            chunk = fh.read(min(left, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def ready_vm(name: str, sim: Sim) -> SourceVM:
    job = migrate(name, sim)
    assert job.state == JobState.COMPLETED, job.error
    map_cloud(get_compute_backend())
    return SourceVM.objects.get(name=name)


def failover(vm: SourceVM, kind: str, **kwargs: bool) -> MigrationJob:
    return actions.start_failover(vm_id=vm.vm_id, kind=kind, requested_by="tester", **kwargs)


def volume_file(volume_id: str) -> Path:
    backend = get_volume_backend()
    assert isinstance(backend, LocalVolumeBackend)
    return backend.image_path(volume_id)


def test_live_failover_boots_the_migrated_disks(nbdkit_server: RunningServer, sim: Sim, settings: object) -> None:
    wire(settings, nbdkit_server, sim)
    vm = ready_vm("db-01", sim)
    assert all(c.status != "fail" for c in readiness(vm)), readiness(vm)
    job = failover(vm, JobKind.LIVE_FAILOVER)
    (job,) = drive(job)
    assert job.state == JobState.COMPLETED, job.error
    source = sim.vm("db-01")
    assert source.power_state == "poweredOff"
    # The VM runs in the cloud with disk 0 as its root and disk 1 after it: the final sync carried the
    # guest's last writes (made as it shut down), and the destination's bytes are the source's.
    cloud_vm = get_compute_backend().get_vm(job.destination_vm_id)
    assert cloud_vm is not None and cloud_vm.state == "Running"
    volumes = {v.source_disk.unit_number: v for v in DestinationVolume.objects.filter(source_disk__vm=vm)}
    assert [d.volume_id for d in cloud_vm.disks] == [volumes[0].volume_id, volumes[1].volume_id]
    assert cloud_vm.root is not None and cloud_vm.root.volume_id == volumes[0].volume_id
    for disk in source.disks:
        image = volume_file(volumes[disk.unit_number].volume_id)
        assert sha_of(image, disk.capacity_bytes) == sha_of(disk.image, disk.capacity_bytes)
    final = job.disks.get(source_disk__unit_number=0)
    assert final.previous_change_id and final.bytes_total < final.source_disk.capacity_bytes, "an incremental"
    # The OMA's part is over: exports retired, slots free, and the VM is not synced again.
    assert set(VMExportMapping.objects.filter(vm_id=vm.vm_id).values_list("status", flat=True)) == {"retired"}
    assert all(v.state == DestinationVolume.State.IN_VM and v.node_id is None for v in volumes.values())
    vm.refresh_from_db()
    assert vm.migrated_at and vm.destination_vm_id == job.destination_vm_id
    with pytest.raises(actions.MigrationError, match="failed over"):
        actions.start_migration(vm_id=vm.vm_id)
    steps = list(job.events.filter(kind="step.finished").values_list("step", flat=True))
    assert steps == [
        "validating",
        "shutting_down",
        "provisioning",
        "attaching",
        "exporting",
        "replicating",
        "verifying",
        "creating_vm",
        "moving_volumes",
        "starting_vm",
    ]


def test_a_test_failover_gives_the_volumes_back_untouched_and_syncs_go_on(
    nbdkit_server: RunningServer, sim: Sim, settings: object
) -> None:
    wire(settings, nbdkit_server, sim)
    vm = ready_vm("web-01", sim)
    volume = DestinationVolume.objects.get(source_disk__vm=vm)
    before = sha_of(volume_file(volume.volume_id), 16 << 20)
    job = failover(vm, JobKind.TEST_FAILOVER)
    (job,) = drive(job, until=lambda j: j.state in (JobState.TESTING, JobState.FAILED))
    assert job.state == JobState.TESTING, job.error
    test_vm = get_compute_backend().get_vm(job.destination_vm_id)
    assert test_vm is not None and test_vm.state == "Running" and test_vm.root is not None
    assert sim.vm("web-01").power_state == "poweredOn", "a test leaves the source running"
    # Meanwhile no sync of the VM starts, and the test VM writes to its disk.
    with pytest.raises(actions.MigrationError, match="active job"):
        actions.start_migration(vm_id=vm.vm_id)
    with open(volume_file(volume.volume_id), "r+b") as fh:
        fh.write(b"written by the test VM")
    actions.end_test_failover(vm_id=vm.vm_id, actor="tester")
    (job,) = drive(job)
    assert job.state == JobState.COMPLETED, job.error
    assert get_compute_backend().get_vm(job.destination_vm_id) is None
    volume.refresh_from_db()
    assert volume.state == DestinationVolume.State.ATTACHED and volume.node_id is not None
    assert sha_of(volume_file(volume.volume_id), 16 << 20) == before, "the snapshot's revert undid the test"
    mapping = VMExportMapping.objects.get(vm_id=vm.vm_id)
    assert mapping.status == "active"
    # Syncing goes on, as an incremental, onto the same volume and export.
    sync = migrate("web-01", sim)
    assert sync.state == JobState.COMPLETED, sync.error
    assert sync.disks.get().previous_change_id and sync.disks.get().mapping_id == mapping.pk
    assert_copied(sync, sim)


def test_a_failed_step_after_the_shutdown_puts_everything_back(
    nbdkit_server: RunningServer, sim: Sim, settings: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from migrations_app.compute import ComputeError, LocalComputeBackend

    wire(settings, nbdkit_server, sim)
    vm = ready_vm("web-01", sim)

    def refuse(self: LocalComputeBackend, vm_id: str) -> None:
        raise ComputeError("CloudStack startVirtualMachine failed (530): insufficient capacity")

    monkeypatch.setattr(LocalComputeBackend, "start_vm", refuse)
    job = failover(vm, JobKind.LIVE_FAILOVER)
    (job,) = drive(job)
    assert job.state == JobState.ROLLED_BACK, job.error
    assert "insufficient capacity" in job.error
    from migrations_app.pages import timeline

    story = {row["step"]: row["status"] for row in timeline(job, list(job.events.order_by("-id")))}
    assert story[JobState.CREATING_VM] == "done" and story[JobState.STARTING_VM] == "failed"
    assert story[JobState.ROLLING_BACK] == "done" and list(story)[-1] == JobState.ROLLING_BACK
    assert sim.vm("web-01").power_state == "poweredOn", "the source runs again"
    assert get_compute_backend().get_vm(job.destination_vm_id) is None
    volume = DestinationVolume.objects.get(source_disk__vm=vm)
    assert volume.state == DestinationVolume.State.ATTACHED
    assert VMExportMapping.objects.get(vm_id=vm.vm_id).status == "active"
    vm.refresh_from_db()
    assert vm.migrated_at is None
    # Nothing was lost: the next sync carries what the source wrote, and the bytes match.
    monkeypatch.undo()
    sync = migrate("web-01", sim)
    assert sync.state == JobState.COMPLETED, sync.error
    assert_copied(sync, sim)


def test_a_vm_that_is_not_ready_fails_validation_and_nothing_changes(
    nbdkit_server: RunningServer, sim: Sim, settings: object
) -> None:
    wire(settings, nbdkit_server, sim)
    job = migrate("db-01", sim)
    assert job.state == JobState.COMPLETED
    vm = SourceVM.objects.get(name="db-01")
    checks = {c.name: c for c in readiness(vm)}
    assert checks["networks"].status == "fail" and "VM Network" in checks["networks"].message
    assert checks["offering"].status == "fail" and checks["template"].status == "fail"
    failed = failover(vm, JobKind.LIVE_FAILOVER)
    (failed,) = drive(failed)
    assert failed.state == JobState.FAILED and failed.current_step == JobState.VALIDATING
    assert "no a network mapping" not in failed.error and "network mapping for" in failed.error
    assert sim.vm("db-01").power_state == "poweredOn"
    assert DestinationVolume.objects.filter(source_disk__vm=vm, state=DestinationVolume.State.ATTACHED).count() == 2


def test_the_commands_validate_fail_over_and_roll_back_a_running_vm(
    nbdkit_server: RunningServer, sim: Sim, settings: object
) -> None:
    import json
    from io import StringIO

    from django.core.management import CommandError, call_command

    wire(settings, nbdkit_server, sim)
    job = migrate("web-01", sim)
    assert job.state == JobState.COMPLETED
    out = StringIO()
    with pytest.raises(CommandError, match="not ready"):
        call_command("validate_failover", "web-01", "--json", stdout=out)
    answer = json.loads(out.getvalue())
    assert answer["ready"] is False and {"networks", "offering", "template"} <= {
        c["name"] for c in answer["checks"] if c["status"] == "fail"
    }
    map_cloud(get_compute_backend())
    out = StringIO()
    call_command("validate_failover", "web-01", "--json", stdout=out)
    answer = json.loads(out.getvalue())
    assert answer["ready"] is True and answer["plan"]["offering"] == "Medium (2 vCPU, 4 GiB)"
    assert answer["plan"]["nics"][0]["mac"].startswith("00:50:56:")
    out = StringIO()
    call_command("failover", "web-01", "--live", "--json", stdout=out)
    started = MigrationJob.objects.get(job_id=json.loads(out.getvalue())["job_id"])
    (done,) = drive(started)
    assert done.state == JobState.COMPLETED, done.error
    with pytest.raises(CommandError, match="no test failover runs"):
        call_command("end_test_failover", "web-01")
    # The destination VM ran and wrote; the source's change tracking knows nothing of it.
    volume = DestinationVolume.objects.get(source_disk__vm__name="web-01")
    with open(volume_file(volume.volume_id), "r+b") as fh:
        fh.seek(3 << 20)
        fh.write(b"written by the destination VM")
    out = StringIO()
    call_command("rollback_failover", "web-01", "--json", stdout=out)
    assert json.loads(out.getvalue())["state"] == JobState.ROLLING_BACK
    (done,) = drive(done)
    assert done.state == JobState.ROLLED_BACK, done.error
    assert get_compute_backend().get_vm(done.destination_vm_id) is None
    assert sim.vm("web-01").power_state == "poweredOn"
    vm = SourceVM.objects.get(name="web-01")
    assert vm.migrated_at is None
    assert DestinationVolume.objects.get(source_disk__vm=vm).state == DestinationVolume.State.ATTACHED
    assert VMExportMapping.objects.get(vm_id=vm.vm_id).status == "active"
    # So the next sync copies the whole disk, and the source and volume agree again.
    sync = migrate("web-01", sim)
    assert sync.state == JobState.COMPLETED, sync.error
    assert sync.disks.get().previous_change_id == "", "a full copy after a VM ran on the volume"
    assert_copied(sync, sim)
    assert not DestinationVolume.objects.get(pk=volume.pk).full_copy_next


def test_a_final_sync_that_fails_puts_everything_back(nbdkit_server: RunningServer, sim: Sim, settings: object) -> None:
    wire(settings, nbdkit_server, sim)
    vm = ready_vm("web-01", sim)
    sim.sim.faults.fail_at_percent = 1  # the VMA's copy fails (permanently) as soon as it starts
    job = failover(vm, JobKind.LIVE_FAILOVER)
    (job,) = drive(job)
    assert job.state == JobState.ROLLED_BACK, (job.state, job.error)
    assert job.events.get(kind="failover.rolling_back").step == JobState.REPLICATING
    assert "final sync" in job.error and "injected failure" in job.error
    assert sim.vm("web-01").power_state == "poweredOn", "the source runs again"
    assert not job.destination_vm_id, "no VM was created"
    assert DestinationVolume.objects.get(source_disk__vm=vm).state == DestinationVolume.State.ATTACHED
    sim.sim.faults.fail_at_percent = None
    sync = migrate("web-01", sim)
    assert sync.state == JobState.COMPLETED, sync.error
    assert_copied(sync, sim)
