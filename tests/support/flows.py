"""Migration flows shared by the workflow, cluster and browser tests: wire the portal to real peers,
migrate, check the bytes."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings as django_settings
from django.db import connection

from migrations_app import actions
from migrations_app.models import JobDisk, MigrationJob
from migrations_app.workflow import run_job
from tests.support.nbd import REPO, RunningServer
from tests.support.vma import TOKEN, Sim, sha


def wire(settings: object, server: RunningServer, sim: Sim) -> None:
    """Point the portal at this NBD server, volume root and VMA simulator."""
    settings.OMA_VOLUMES = {"BACKEND": "local", "ROOT": str(server.layout.volume_root), "LOOP": False}  # type: ignore[attr-defined]
    settings.OMA_VMA = {  # type: ignore[attr-defined]
        "URL": sim.url,
        "TOKEN": TOKEN,
        "TIMEOUT": 5,
        "RETRIES": 1,
        "NBD_HOST": "127.0.0.1",
        "NBD_PORT": server.layout.port,
    }
    settings.OMA_WORKFLOW = {  # type: ignore[attr-defined]
        "MAX_ACTIVE_JOBS": 25,
        "MAX_ATTACHED_VOLUMES": 25,
        "POLL_INTERVAL": 0.05,
        "HEARTBEAT_STALE_SECONDS": 60,
    }
    actions.sync_inventory(sim.client.inventory())


def migrate(name: str, sim: Sim) -> MigrationJob:
    job = actions.start_migration(vm_id=sim.vm(name).id, requested_by="tester")
    run_job(job.pk, "test-runner")
    job.refresh_from_db()
    return job


def assert_copied(job: MigrationJob, sim: Sim) -> None:
    vm = sim.vm(job.vm.name)
    for disk in JobDisk.objects.filter(job=job).select_related("source_disk"):
        source = next(d for d in vm.disks if d.unit_number == disk.source_disk.unit_number)
        # Volumes are whole GiB (as CloudStack's): compare the source's length.
        assert sha(disk.device_path, source.capacity_bytes) == sha(source.image), f"disk {source.unit_number} differs"


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


def wait_for(job: MigrationJob, states: set[str], timeout: float = 90, log: Path | None = None) -> MigrationJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.state in states:
            return job
        time.sleep(0.1)
    tail = log.read_text()[-3000:] if log else ""
    raise AssertionError(f"{job.job_id} is {job.state}, not {states}; worker log:\n{tail}")
