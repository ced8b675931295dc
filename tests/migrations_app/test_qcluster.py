"""End to end through a real django-q2 cluster process (ORM broker), not the synchronous path."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

from devtools.vma_sim import Faults
from migrations_app import actions
from migrations_app.models import JobDisk, JobState, MigrationJob
from migrations_app.tasks import recover_stale_jobs
from tests.support.flows import STALE_SECONDS, Cluster, assert_copied, wait_for, wire
from tests.support.nbd import RunningServer
from tests.support.vma import Sim, SimFactory

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def sim(make_sim: SimFactory) -> Sim:
    return make_sim(size_mib=32)


def test_three_two_disk_vms_migrate_concurrently_through_the_cluster(
    nbdkit_server: RunningServer, sim: Sim, settings: object, tmp_path: Path
) -> None:
    wire(settings, nbdkit_server, sim)
    cluster = Cluster(nbdkit_server, sim, tmp_path / "qcluster.log").start()
    try:
        jobs = [actions.start_migration(vm_id=sim.vm(name).id) for name in ("db-01", "file-01", "app-01")]
        for job in jobs:
            done = wait_for(job, {JobState.COMPLETED, JobState.FAILED}, log=cluster.log)
            assert done.state == JobState.COMPLETED, done.error
            assert_copied(done, sim)
        assert JobDisk.objects.count() == 7
    finally:
        cluster.kill(signal.SIGTERM)


def test_a_worker_killed_mid_copy_is_recovered_and_the_job_completes(
    nbdkit_server: RunningServer, tmp_path: Path, settings: object
) -> None:
    gate = threading.Event()
    slow = Sim(tmp_path, Faults(gate=gate), size_mib=32)
    try:
        wire(settings, nbdkit_server, slow)
        settings.OMA_WORKFLOW = {**settings.OMA_WORKFLOW, "HEARTBEAT_STALE_SECONDS": STALE_SECONDS}  # type: ignore[attr-defined]
        cluster = Cluster(nbdkit_server, slow, tmp_path / "qcluster.log").start()
        job = actions.start_migration(vm_id=slow.vm("web-01").id)
        wait_for(job, {JobState.REPLICATING}, log=cluster.log)
        deadline = time.monotonic() + 30
        while not slow.sim.replications and time.monotonic() < deadline:
            time.sleep(0.05)
        cluster.kill(signal.SIGKILL)  # the worker dies while the VMA copies
        first_runner = MigrationJob.objects.get(pk=job.pk).runner
        time.sleep(STALE_SECONDS + 0.5)
        cluster = Cluster(nbdkit_server, slow, tmp_path / "qcluster.log").start()
        current = MigrationJob.objects.get(pk=job.pk)
        assert recover_stale_jobs() == 1, (current.state, current.heartbeat_at, current.runner, current.error)
        gate.set()
        done = wait_for(job, {JobState.COMPLETED, JobState.FAILED}, log=cluster.log)
        assert done.state == JobState.COMPLETED, done.error
        assert done.runner != first_runner and done.events.filter(kind="job.recovered").exists()
        assert_copied(done, slow)
        assert len(list(nbdkit_server.layout.volume_root.glob("*.img"))) == 1, "one volume, nothing leaked"
    finally:
        cluster.kill(signal.SIGTERM)
        slow.close()
