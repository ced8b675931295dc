"""A failure at each failover step, through the production CloudStack client against the signed fake
(its rules and async jobs), the VMA simulator and real nbdkit: every one ends in a clean rollback (or,
for a worker that died, a resumed failover), with volumes, exports and slots accounted for."""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from pathlib import Path

import pytest

from devtools.cloud import map_cloud
from exports.models import VMExportMapping
from migrations_app import actions
from migrations_app.backends import get_compute_backend
from migrations_app.models import DestinationVolume, JobKind, JobState, MigrationJob, SourceVM
from tests.support.fake_cloudstack import FakeCloudStack, use_cloud
from tests.support.flows import STALE_SECONDS, Cluster, assert_copied, drive, migrate, wait_for, wire
from tests.support.nbd import RunningServer
from tests.support.vma import Sim

pytestmark = pytest.mark.django_db(transaction=True)
FINISHED: set[str] = {JobState.COMPLETED, JobState.FAILED, JobState.ROLLED_BACK, JobState.CANCELLED}


@pytest.fixture
def cloud(cloud: FakeCloudStack) -> FakeCloudStack:
    """The shared fake, each async job answering 'pending' once before its result."""
    cloud.pending_polls = 1
    return cloud


def synced(name: str, sim: Sim) -> SourceVM:
    job = migrate(name, sim)
    assert job.state == JobState.COMPLETED, job.error
    map_cloud(get_compute_backend())
    return SourceVM.objects.get(name=name)


def sha(path: Path, length: int) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read(length)).hexdigest()


def assert_put_back(vm: SourceVM, fake: FakeCloudStack, sim: Sim) -> None:
    """Nothing of the failover is left in the cloud, the volumes are with the OMA again (attached, slot
    held, export served), the source runs, and the next sync completes with the bytes intact."""
    assert not fake.vms and not fake.vm_snapshots, "the destination VM and its snapshot are gone"
    assert not [v for v in fake.volumes.values() if v["name"].startswith("ROOT-")], "its placeholder root went too"
    assert {v["type"] for v in fake.volumes.values()} == {"DATADISK"}
    for volume in DestinationVolume.objects.filter(source_disk__vm=vm):
        assert volume.state == DestinationVolume.State.ATTACHED and volume.node_id is not None
        assert fake.volumes[volume.volume_id]["virtualmachineid"] == fake.oma_vm_id
    assert set(VMExportMapping.objects.filter(vm_id=vm.vm_id).values_list("status", flat=True)) == {"active"}
    assert sim.vm(vm.name).power_state == "poweredOn"
    again = migrate(vm.name, sim)
    assert again.state == JobState.COMPLETED, again.error
    assert_copied(again, sim)


@pytest.mark.parametrize(
    ("kind", "command", "step"),
    [
        (JobKind.LIVE_FAILOVER, "deployVirtualMachine", JobState.CREATING_VM),
        (JobKind.LIVE_FAILOVER, "attachVolume", JobState.MOVING_VOLUMES),
        (JobKind.LIVE_FAILOVER, "startVirtualMachine", JobState.STARTING_VM),
        (JobKind.TEST_FAILOVER, "createVMSnapshot", JobState.SNAPSHOTTING),
    ],
)
def test_a_cloudstack_error_in_a_step_rolls_everything_back(
    nbdkit_server: RunningServer,
    cloud: FakeCloudStack,
    sim: Sim,
    settings: object,
    kind: str,
    command: str,
    step: str,
) -> None:
    wire(settings, nbdkit_server, sim)
    use_cloud(settings, cloud)
    vm = synced("db-01", sim)
    cloud.job_failures[command] = (530, f"{command} failed in the fake: host capacity")
    job = actions.start_failover(vm_id=vm.vm_id, kind=kind, requested_by="tester")
    (job,) = drive(job, timeout=90)
    assert job.state == JobState.ROLLED_BACK, (job.state, job.error)
    assert "host capacity" in job.error or kind == JobKind.TEST_FAILOVER
    assert job.events.get(kind="failover.rolling_back").step == step
    assert_put_back(vm, cloud, sim)


def test_the_vma_gone_during_the_shutdown_fails_the_rollback_until_it_is_back(
    nbdkit_server: RunningServer, cloud: FakeCloudStack, sim: Sim, settings: object
) -> None:
    wire(settings, nbdkit_server, sim)
    use_cloud(settings, cloud)
    vm = synced("web-01", sim)
    sim.vm("web-01").shutdown_seconds = 1.0
    job = actions.start_failover(vm_id=vm.vm_id, kind=JobKind.LIVE_FAILOVER, requested_by="tester")
    threading.Timer(0.4, sim.go_offline).start()
    (job,) = drive(job, timeout=60)
    # The shutdown could not be followed, and the rollback could not power the source on: it says so.
    assert job.state == JobState.FAILED and job.current_step == JobState.ROLLING_BACK, (job.state, job.error)
    assert "VMA is unreachable" in job.error
    sim.come_back()
    # The guest finishes shutting down (1 s) before the operator rolls back: a power-on during the
    # shutdown is refused by the VMA, which a loaded machine could otherwise hit.
    deadline = time.monotonic() + 10
    while sim.vm("web-01").power_state == "shuttingDown" and time.monotonic() < deadline:
        time.sleep(0.05)
    actions.rollback_failover(vm_id=vm.vm_id, actor="tester")
    (job,) = drive(job, timeout=60)
    assert job.state == JobState.ROLLED_BACK, job.error
    assert_put_back(vm, cloud, sim)


def test_a_worker_killed_while_creating_the_vm_is_replaced_and_the_failover_finishes(
    nbdkit_server: RunningServer, cloud: FakeCloudStack, sim: Sim, settings: object, tmp_path: Path
) -> None:
    from tests.migrations_app.test_qcluster import cloudstack_env

    wire(settings, nbdkit_server, sim)
    use_cloud(settings, cloud)
    vm = synced("web-01", sim)
    cloud.job_seconds["deployVirtualMachine"] = 2 * STALE_SECONDS
    cluster = Cluster(nbdkit_server, sim, tmp_path / "cluster.log", **cloudstack_env(cloud)).start()
    try:
        job = actions.start_failover(vm_id=vm.vm_id, kind=JobKind.LIVE_FAILOVER, requested_by="tester")
        deadline = time.monotonic() + 60
        while "deployVirtualMachine" not in cloud.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        cluster.kill(signal.SIGKILL, "worker")  # dies inside the slow deploy, before it could tag the VM
        cluster.start("worker")
        done = wait_for(job, FINISHED, timeout=120, log=cluster.log)
        assert done.state == JobState.COMPLETED, done.error
        assert done.events.filter(kind="job.recovered", step=JobState.CREATING_VM).exists()
        assert cloud.requests.count("deployVirtualMachine") == 1 and len(cloud.vms) == 1, "one VM, found again"
        (made,) = cloud.vms.values()
        assert made["state"] == "Running" and made["id"] == done.destination_vm_id
        root = next(v for v in cloud.volumes.values() if v.get("virtualmachineid") == made["id"])
        source = sim.vm("web-01").disks[0]
        assert root["deviceid"] == 0 and root["type"] == "ROOT"
        assert sha(cloud.file_of(root["id"]), source.capacity_bytes) == sha(source.image, source.capacity_bytes)
        assert MigrationJob.objects.get(pk=job.pk).vm.migrated_at is not None
    finally:
        cluster.kill(signal.SIGTERM)


def test_readiness_fails_for_a_volume_that_is_not_ready(
    nbdkit_server: RunningServer, cloud: FakeCloudStack, sim: Sim, settings: object
) -> None:
    from migrations_app.failover import readiness

    wire(settings, nbdkit_server, sim)
    use_cloud(settings, cloud)
    vm = synced("web-01", sim)
    assert {c.name: c.status for c in readiness(vm)}["volumes"] == "pass"
    volume = DestinationVolume.objects.get(source_disk__vm=vm)
    cloud.volumes[volume.volume_id]["state"] = "Migrating"
    check = {c.name: c for c in readiness(vm)}["volumes"]
    assert check.status == "fail" and "(Migrating): the volume is not Ready" in check.message
