"""End to end through a real django-q2 cluster process (ORM broker), not the synchronous path."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.db import connection

from devtools.vma_sim import Faults
from migrations_app import actions
from migrations_app.models import JobDisk, JobState, MigrationJob
from migrations_app.tasks import recover_stale_jobs
from tests.conftest import REPO, RunningServer
from tests.migrations_app.conftest import SimFactory
from tests.migrations_app.test_vma_sim import TOKEN, Sim
from tests.migrations_app.test_workflow import assert_copied, wire

pytestmark = pytest.mark.django_db(transaction=True)
STALE_SECONDS = 3


class Cluster:
    """``manage.py qcluster`` in its own process group, configured like the test's settings."""

    def __init__(self, server: RunningServer, sim: Sim, log: Path) -> None:
        conf = django_settings.OMA_NBD
        self.env = {
            **os.environ,
            "OMA_DB_NAME": str(connection.settings_dict["NAME"]),
            "OMA_NBD_BACKEND": conf["BACKEND"],
            "OMA_NBD_PORT": str(conf["PORT"]),
            "OMA_NBD_HELPER": shlex.join(conf["HELPER_COMMAND"]),
            "OMA_NBD_HELPER_CONFIG": conf["HELPER_CONFIG"],
            "OMA_NBD_EXPORT_ROOT": conf["EXPORT_ROOT"],
            "OMA_NBD_STATE_DIR": conf["STATE_DIR"],
            "OMA_VOLUME_ROOT": str(server.layout.volume_root),
            "OMA_VMA_URL": sim.url,
            "OMA_VMA_TOKEN": TOKEN,
            "OMA_VMA_NBD_PORT": str(server.layout.port),
            "OMA_PROGRESS_POLL_INTERVAL": "0.1",
            "OMA_HEARTBEAT_STALE_SECONDS": str(STALE_SECONDS),
            "OMA_Q_WORKERS": "2",
        }
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Cluster:
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "manage.py"), "qcluster"],
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        # Workers of the cluster share its process group: wait until every one is gone, so none
        # still holds a database session when the test database is dropped.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            time.sleep(0.1)


@pytest.fixture
def sim(make_sim: SimFactory) -> Sim:
    return make_sim(size_mib=32)


def wait_for(job: MigrationJob, states: set[str], timeout: float = 90, log: Path | None = None) -> MigrationJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.state in states:
            return job
        time.sleep(0.1)
    tail = log.read_text()[-3000:] if log else ""
    raise AssertionError(f"{job.job_id} is {job.state}, not {states}; worker log:\n{tail}")


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
        settings.OMA_WORKFLOW["HEARTBEAT_STALE_SECONDS"] = STALE_SECONDS  # type: ignore[attr-defined]
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
