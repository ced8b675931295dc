"""Operator actions against the rules the database keeps: one active job per VM, whoever asks."""

from __future__ import annotations

import threading

import pytest
from django.db import IntegrityError, connections, transaction

from migrations_app import actions
from migrations_app.models import ACTIVE_STATES, JobState, MigrationJob
from tests.support.factories import make_vm

pytestmark = pytest.mark.django_db(transaction=True)


def old_jobs(count: int, state: str = JobState.CANCELLED) -> list[MigrationJob]:
    vm = make_vm(1)
    return [MigrationJob.objects.create(vm=vm, state=state, current_step=JobState.REPLICATING) for _ in range(count)]


def test_a_retry_is_refused_while_another_job_of_the_vm_is_active() -> None:
    older, newest = old_jobs(2)
    actions.retry_job(job_id=newest.job_id)
    with pytest.raises(actions.MigrationError, match="already has an active job"):
        actions.retry_job(job_id=older.job_id)
    older.refresh_from_db()
    assert older.state == JobState.CANCELLED and older.attempt == 1
    assert MigrationJob.objects.filter(state__in=ACTIVE_STATES).count() == 1


def test_two_retry_presses_at_once_on_old_jobs_of_one_vm_start_at_most_one() -> None:
    jobs = old_jobs(2, state=JobState.FAILED)
    outcomes: list[str] = []
    start = threading.Barrier(2)

    def press(job: MigrationJob) -> None:
        start.wait()
        try:
            actions.retry_job(job_id=job.job_id)
            outcomes.append("retried")
        except actions.MigrationError as exc:
            outcomes.append(str(exc))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=press, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(outcomes) == 2 and outcomes.count("retried") == 1, outcomes
    assert MigrationJob.objects.filter(state__in=ACTIVE_STATES).count() == 1


def test_only_the_newest_job_of_a_vm_can_be_retried() -> None:
    older, newest = old_jobs(2)
    with pytest.raises(actions.MigrationError, match=f"superseded by {newest.job_id}"):
        actions.retry_job(job_id=older.job_id)
    assert not MigrationJob.objects.filter(state__in=ACTIVE_STATES).exists()


def test_start_is_refused_while_a_job_of_the_vm_is_active() -> None:
    (job,) = old_jobs(1)
    actions.retry_job(job_id=job.job_id)
    with pytest.raises(actions.MigrationError, match="already has an active job"):
        actions.start_migration(vm_id=job.vm.vm_id)


def test_the_database_itself_refuses_a_second_active_job_for_a_vm() -> None:
    (job,) = old_jobs(1, state=JobState.REPLICATING)
    with pytest.raises(IntegrityError), transaction.atomic():
        MigrationJob.objects.create(vm=job.vm, state=JobState.PENDING)
    # Finished jobs are not limited.
    MigrationJob.objects.create(vm=job.vm, state=JobState.COMPLETED)
    MigrationJob.objects.create(vm=job.vm, state=JobState.FAILED)


@pytest.mark.django_db
def test_an_incremental_sync_does_not_count_the_whole_disk_before_the_vma_does() -> None:
    from migrations_app.models import DestinationVolume, JobDisk

    vm = make_vm(1, disks=1)
    first = actions.start_migration(vm_id=vm.vm_id)
    assert first.disks.get().bytes_total == 1 << 30, "a full copy moves the whole disk"
    DestinationVolume.objects.filter(source_disk__vm=vm).update(volume_id="v-1")
    JobDisk.objects.filter(job=first).update(volume_id="v-1", new_change_id="sim:2000:1")
    MigrationJob.objects.filter(pk=first.pk).update(state=JobState.COMPLETED)
    second = actions.start_migration(vm_id=vm.vm_id)
    disk = second.disks.get()
    assert disk.previous_change_id == "sim:2000:1" and disk.bytes_total == 0
