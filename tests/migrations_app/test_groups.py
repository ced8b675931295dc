"""Warm migration: groups sync their members on a schedule, a few at a time, never two jobs per VM."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from migrations_app import actions
from migrations_app.groups import members, start_due_syncs
from migrations_app.models import ACTIVE_STATES, JobDisk, JobState, MigrationGroup, MigrationJob, SourceVM
from migrations_app.slots import this_node
from tests.support.factories import make_vm
from tests.support.flows import assert_copied, run_until, wire
from tests.support.nbd import RunningServer
from tests.support.vma import Sim

pytestmark = pytest.mark.django_db(transaction=True)


def group_of(vms: list[SourceVM], interval: int = 60, concurrent: int = 5, enabled: bool = True) -> MigrationGroup:
    return actions.save_group(
        group=None,
        name=f"group-{MigrationGroup.objects.count()}",
        sync_interval_minutes=interval,
        max_concurrent=concurrent,
        enabled=enabled,
        vm_ids=[vm.vm_id for vm in vms],
    )


def synced(vm: SourceVM, minutes_ago: float) -> MigrationJob:
    """A completed sync of ``vm`` that ended ``minutes_ago``."""
    ended = timezone.now() - timedelta(minutes=minutes_ago)
    job = MigrationJob.objects.create(
        vm=vm, state=JobState.COMPLETED, current_step=JobState.REPLICATING, finished_at=ended
    )
    for disk in vm.disks.all():
        JobDisk.objects.create(
            job=job,
            source_disk=disk,
            bytes_done=5 << 20,
            bytes_total=disk.capacity_bytes,
            new_change_id="c1",
            volume_id="",
        )
    return job


def test_members_whose_last_sync_is_older_than_the_interval_are_synced() -> None:
    stale, fresh, never = make_vm(1), make_vm(2), make_vm(3)
    synced(stale, minutes_ago=90)
    synced(fresh, minutes_ago=10)
    group = group_of([stale, fresh, never], interval=60)
    started = start_due_syncs(this_node())
    jobs = MigrationJob.objects.filter(job_id__in=started)
    assert {job.vm for job in jobs} == {stale, never}
    assert all(job.requested_by == f"schedule:{group.name}" for job in jobs)
    assert start_due_syncs(this_node()) == [], "never two jobs for one VM: the started ones are active"


def test_a_group_syncs_at_most_its_concurrency_oldest_first() -> None:
    vms = [make_vm(n) for n in range(4)]
    for n, vm in enumerate(vms):
        synced(vm, minutes_ago=100 + n)
    group_of(vms, interval=60, concurrent=2)
    started = MigrationJob.objects.filter(job_id__in=start_due_syncs(this_node()))
    assert {job.vm for job in started} == {vms[3], vms[2]}, "the longest waiting first"
    assert start_due_syncs(this_node()) == []


def test_a_paused_group_schedules_nothing() -> None:
    vm = make_vm(1)
    group_of([vm], enabled=False)
    assert start_due_syncs(this_node()) == []


def test_a_member_with_a_job_running_is_left_alone() -> None:
    vm = make_vm(1)
    synced(vm, minutes_ago=500)
    running = actions.start_migration(vm_id=vm.vm_id)
    group_of([vm], interval=1)
    assert start_due_syncs(this_node()) == []
    assert MigrationJob.objects.filter(vm=vm).exclude(pk=running.pk).exclude(state=JobState.COMPLETED).count() == 0


def test_the_group_page_shows_each_members_last_sync_age_bytes_and_next_sync() -> None:
    old, new = make_vm(1), make_vm(2)
    last = synced(old, minutes_ago=30)
    group = group_of([old, new], interval=60)
    rows = {row.vm.name: row for row in members(group)}
    assert rows[old.name].last_sync_at == last.finished_at and rows[old.name].bytes_moved == 2 * (5 << 20)
    assert last.finished_at is not None
    assert rows[old.name].next_sync_at == last.finished_at + timedelta(minutes=60)
    assert rows[new.name].last_sync_at is None and rows[new.name].next_sync_at is not None


def test_a_vm_moves_to_the_group_it_is_put_in() -> None:
    vm = make_vm(1)
    first = group_of([vm])
    second = group_of([vm])
    assert SourceVM.objects.get(pk=vm.pk).group == second and first.vms.count() == 0


def test_a_group_with_a_bad_name_or_interval_is_refused() -> None:
    with pytest.raises(actions.MigrationError):
        actions.save_group(group=None, name="", sync_interval_minutes=10, max_concurrent=1, enabled=True, vm_ids=[])
    with pytest.raises(actions.MigrationError):
        actions.save_group(group=None, name="x", sync_interval_minutes=0, max_concurrent=1, enabled=True, vm_ids=[])
    assert not MigrationGroup.objects.exists()


def test_warm_syncs_run_end_to_end_on_schedule(nbdkit_server: RunningServer, sim: Sim, settings: object) -> None:
    """The follower starts both members' full syncs, one at a time; once their last sync is older than the
    interval, incremental ones on the same volumes, whose bytes match the changed sources."""
    wire(settings, nbdkit_server, sim)
    vms = list(SourceVM.objects.filter(name__in=["web-01", "db-01"]))
    group = group_of(vms, interval=1, concurrent=1)
    jobs = MigrationJob.objects.filter(vm__in=vms)
    peak = [0]

    def count(state: str) -> int:
        peak[0] = max(peak[0], jobs.filter(state__in=ACTIVE_STATES).count())
        return jobs.filter(state=state).count()

    run_until(lambda: count(JobState.COMPLETED) == 2, what=lambda: list(jobs.values_list("state", "error")))
    assert jobs.count() == 2 and all(j.requested_by == f"schedule:{group.name}" for j in jobs)
    jobs.update(finished_at=timezone.now() - timedelta(minutes=2))
    run_until(lambda: count(JobState.COMPLETED) == 4, what=lambda: list(jobs.values_list("state", "error")))
    assert peak[0] == 1, "at most one sync of the group at a time"
    for job in jobs.order_by("created_at")[2:]:
        assert job.disks.exclude(previous_change_id="").exists(), "the later syncs are incremental"
        assert_copied(job, sim)
