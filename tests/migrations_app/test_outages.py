"""Copies that ride out outages: an NBD server restart, a VMA that is unreachable for a while or
restarts. The job completes without an operator, resumed from what was confirmed written (not copied
again from byte 0), and an outage longer than the window fails it in words."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from devtools.vma_sim import BLOCK, CHECKPOINT_BLOCKS, Faults
from migrations_app import actions
from migrations_app.models import JobState, MigrationJob
from tests.support.flows import assert_copied, drive, wire
from tests.support.nbd import RunningServer
from tests.support.vma import Sim, SimFactory

pytestmark = pytest.mark.django_db(transaction=True)
RATE = 32_000_000  # 16 MiB in about 4 s: long enough to cut in the middle


def copies_of(sim: Sim, job: MigrationJob) -> list[Any]:
    """The VMA's disk copies for the job, over all its replications (resumed ones included)."""
    return [copy for rid, r in sim.sim.replications.items() if rid.startswith(job.job_id) for copy in r.copies]


def written(sim: Sim, job: MigrationJob) -> int:
    """Bytes the VMA really wrote for the job."""
    return sum(copy.written for copy in copies_of(sim, job))


def assert_resumed(sim: Sim, job: MigrationJob, disk: int, before: int = 0) -> None:
    """The copy was resumed from its checkpoint (at least 4 MiB: ``start_copying``), not copied again
    from byte 0: a resumed replication skips what was confirmed, and at most the blocks written after the
    last checkpoint (one checkpoint's worth) are written twice. ``before``: bytes written by replications
    the VMA has since forgotten."""
    resumed = [c.written for c in copies_of(sim, job) if c.resume_from]
    assert resumed and all(n <= disk - (4 << 20) for n in resumed), f"resumed copies wrote {resumed}"
    total = before + written(sim, job)
    assert total <= disk + CHECKPOINT_BLOCKS * BLOCK, f"wrote {total} bytes for a {disk}-byte disk"


def start_copying(sim: Sim) -> MigrationJob:
    job = actions.start_migration(vm_id=sim.vm("web-01").id)
    (job,) = drive(job, until=lambda j: j.state == JobState.REPLICATING and j.disks.get().checkpoint_bytes >= 4 << 20)
    return job


def during(seconds: float, action: object) -> threading.Thread:
    """Run ``action`` in a thread ``seconds`` from now (while the test drives the job here)."""
    thread = threading.Timer(seconds, action)  # type: ignore[arg-type]
    thread.start()
    return thread


def test_a_copy_cut_by_an_nbd_server_restart_resumes_and_completes(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    sim = make_sim(Faults(rate_bits_per_second=RATE))
    wire(settings, nbdkit_server, sim)
    job = start_copying(sim)
    assert nbdkit_server.helper("stop").returncode == 0  # every NBD connection drops
    time.sleep(3)
    restart = during(0, lambda: nbdkit_server.helper("start"))
    (job,) = drive(job, timeout=60)
    restart.join()
    assert job.state == JobState.COMPLETED, job.error
    assert job.events.filter(kind="replication.interrupted").exists() and job.resumes >= 1
    assert_resumed(sim, job, 16 << 20)
    assert_copied(job, sim)


def test_a_vma_unreachable_for_a_while_is_waited_for(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    sim = make_sim(Faults(rate_bits_per_second=RATE))
    wire(settings, nbdkit_server, sim)
    job = start_copying(sim)
    sim.go_offline()
    back = during(3, sim.come_back)
    (job,) = drive(job, until=lambda j: bool(j.wait_reason), timeout=10)
    assert "the VMA is unreachable" in job.wait_reason, "the page says what it waits for"
    (job,) = drive(job, timeout=60)
    back.join()
    assert job.state == JobState.COMPLETED, job.error
    assert job.resumes == 0 and written(sim, job) == 16 << 20, "the copy went on at the VMA meanwhile"
    assert job.wait_reason == "" and job.outage_since is None
    assert_copied(job, sim)


def test_a_restarted_vma_is_asked_to_resume_the_copy(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    sim = make_sim(Faults(rate_bits_per_second=RATE))
    wire(settings, nbdkit_server, sim)
    job = start_copying(sim)
    before = written(sim, job)
    sim.sim.restart()  # it forgets every replication
    (job,) = drive(job, timeout=60)
    assert job.state == JobState.COMPLETED, job.error
    assert job.resumes == 1 and job.events.filter(kind="replication.resumed").exists()
    assert_resumed(sim, job, 16 << 20, before=before)
    assert_copied(job, sim)


def test_an_outage_longer_than_the_window_fails_the_job_in_words(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    sim = make_sim(Faults(rate_bits_per_second=RATE))
    wire(settings, nbdkit_server, sim)
    settings.OMA_WORKFLOW = {**settings.OMA_WORKFLOW, "OUTAGE_WINDOW_SECONDS": 2}  # type: ignore[attr-defined]
    job = start_copying(sim)
    sim.go_offline()
    try:
        (job,) = drive(job, timeout=30)
    finally:
        sim.come_back()
    assert job.state == JobState.FAILED
    assert job.error.startswith("replicating: the VMA is unreachable") and "still so after" in job.error
