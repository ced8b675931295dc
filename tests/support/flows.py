"""Migration flows shared by the workflow, cluster and browser tests: wire the portal to real peers,
migrate, check the bytes."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from django.conf import settings as django_settings
from django.db import connection

from migrations_app import actions, tasks
from migrations_app.follower import Follower, TickReport
from migrations_app.models import FINAL_STATES, JobDisk, JobState, MigrationJob
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
        **server.layout.vma_settings(),
    }
    sim.sim.tls_credentials = server.layout.vma_tls if server.layout.tls else None
    settings.OMA_WORKFLOW = {  # type: ignore[attr-defined]
        "MAX_ACTIVE_JOBS": 25,
        "ATTACH_SLOTS": 25,
        "POLL_INTERVAL": 0.05,
        "HEARTBEAT_STALE_SECONDS": 60,
        "STEP_RETRY_SECONDS": 0.05,
        "OUTAGE_WINDOW_SECONDS": 30,
    }
    actions.sync_inventory(sim.client.inventory())


class InProcess:
    """The node's follower with its worker tasks run here, one after the other, instead of in a cluster."""

    def __init__(self) -> None:
        self.queue: list[tuple[str, int]] = []
        self.follower = Follower(
            enqueue=lambda task, pk: self.queue.append((task, pk)),
            detach=lambda pk: self.queue.append(("detach_volume_task", pk)),
            verify=lambda pk: self.queue.append(("run_job_task", pk)),
        )

    def tick(self) -> TickReport:
        report = self.follower.tick()
        while self.queue:
            task, pk = self.queue.pop(0)
            getattr(tasks, task)(pk)
            if task == "detach_volume_task":
                self.follower.freed = True  # as the follower's own detach thread says when it is done
        return report

    def close(self) -> None:
        self.follower.close()


def run_until(done: Callable[[], bool], timeout: float = 60, what: Callable[[], object] = lambda: "") -> None:
    """Tick the follower (and run the worker tasks it queues) here until ``done()``."""
    runner = InProcess()
    deadline = time.monotonic() + timeout
    try:
        while True:
            runner.tick()
            if done():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not done within {timeout}s: {what()}")
            time.sleep(0.02)
    finally:
        runner.close()


def drive(
    *jobs: MigrationJob, until: Callable[[MigrationJob], bool] | None = None, timeout: float = 60
) -> list[MigrationJob]:
    """Run the follower and the jobs' worker steps here until every job is finished (or ``until``)."""
    finished = until or (lambda job: job.state in FINAL_STATES)

    def done() -> bool:
        for job in jobs:
            job.refresh_from_db()
        return all(finished(job) for job in jobs)

    run_until(done, timeout, lambda: [(j.job_id, j.state) for j in jobs])
    return list(jobs)


def waiting(job: MigrationJob) -> bool:
    return job.state == JobState.PENDING and bool(job.wait_reason)


def migrate(name: str, sim: Sim) -> MigrationJob:
    """Start a migration of the simulator's VM and drive it to its end."""
    job = actions.start_migration(vm_id=sim.vm(name).id, requested_by="tester")
    (job,) = drive(job)
    return job


def assert_copied(job: MigrationJob, sim: Sim) -> None:
    vm = sim.vm(job.vm.name)
    for disk in JobDisk.objects.filter(job=job).select_related("source_disk"):
        source = next(d for d in vm.disks if d.unit_number == disk.source_disk.unit_number)
        # Volumes are whole GiB (as CloudStack's): compare the source's length.
        assert sha(disk.device_path, source.capacity_bytes) == sha(source.image), f"disk {source.unit_number} differs"


STALE_SECONDS = 3


class Cluster:
    """``manage.py qcluster`` and ``manage.py run_follower``, each in its own process group, configured
    like the test's settings."""

    def __init__(self, server: RunningServer, sim: Sim, log: Path, **extra_env: str) -> None:
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
            "OMA_NBD_TLS_PSK_FILE": conf.get("TLS_PSK_FILE", ""),
            "OMA_VMA_NBD_TLS": "1" if server.layout.tls else "0",
            "OMA_VOLUME_ROOT": str(server.layout.volume_root),
            "OMA_VMA_URL": sim.url,
            "OMA_VMA_TOKEN": TOKEN,
            "OMA_VMA_NBD_PORT": str(server.layout.port),
            "OMA_PROGRESS_POLL_INTERVAL": "0.1",
            "OMA_HEARTBEAT_STALE_SECONDS": str(STALE_SECONDS),
            "OMA_Q_WORKERS": "2",
            **extra_env,
        }
        self.log = log
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, *which: str) -> Cluster:
        """Start the worker cluster and the follower (or only the ones named)."""
        commands = {"worker": "run_workers", "follower": "run_follower"}
        for name in which or tuple(commands):
            self.procs[name] = subprocess.Popen(
                [sys.executable, str(REPO / "manage.py"), commands[name]],
                env=self.env,
                stdout=self.log.open("ab"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def kill(self, sig: int = signal.SIGKILL, *which: str) -> None:
        for name in which or tuple(self.procs):
            proc = self.procs.pop(name, None)
            if proc is not None:
                _kill_group(proc, sig)


def _kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    if sig == signal.SIGKILL:
        # A dead worker host: every process of it goes at once (run_workers runs the cluster in a session
        # of its own, which a group signal alone would not reach).
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass
    # Workers of the cluster share its process group: wait until every one is gone, so none still
    # holds a database session when the test database is dropped.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
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
