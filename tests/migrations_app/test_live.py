"""The migration pages' live side: which topics each action announces, and what the relay's render path
costs as active jobs grow (it is the hottest read path: every change, every watched group)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from live import registry
from live.registry import Changes, Group
from migrations_app import actions
from migrations_app.follower import record_progress
from migrations_app.models import JobState, MigrationJob, SourceVM
from migrations_app.topics import INVENTORY, JOB, PROGRESS
from migrations_app.vma_client import VmaVM
from tests.support.factories import make_jobs, make_vm
from tests.support.live import announced
from tests.support.vma import progress

pytestmark = pytest.mark.django_db


def changes_of(topic: str, keys: list[int]) -> Changes:
    changes = Changes(0)
    for key in keys or [None]:  # type: ignore[list-item]
        changes.add(topic, key)
    return changes


def test_start_and_cancel_announce_the_job() -> None:
    vm = make_vm(1)
    with announced() as got:
        job = actions.start_migration(vm_id=vm.vm_id, requested_by="tester")
    assert got.topics == {JOB} and got.keys(JOB) == {job.pk}
    with announced() as got:
        actions.cancel_job(job_id=job.job_id)
    assert got.topics == {JOB} and got.keys(JOB) == {job.pk}


def test_reading_the_inventory_announces_the_inventory() -> None:
    inventory: list[VmaVM] = [{"id": "4210aaaa-bbbb-4ccc-8ddd-eeeeffff0001", "name": "web-01", "disks": []}]
    with announced() as got:
        actions.sync_inventory(inventory)
    assert got.topics == {INVENTORY}


def test_progress_announces_only_progress() -> None:
    job = make_jobs(1, state=JobState.REPLICATING, disks=1)[0]
    with announced() as got:
        record_progress(job, [progress(0, 5, 10, 1)])
    assert got.rows == [(PROGRESS, job.pk)]


def render_queries(group: Group, changes: Changes | None) -> tuple[int, str]:
    with CaptureQueriesContext(connection) as ctx:
        html = registry.render_group(group, changes)
    return len(ctx.captured_queries), html


# (page, the change built from the active jobs, whether the page is about one job, the pinned queries)
RENDER_PATHS: list[tuple[str, Callable[[list[MigrationJob]], Changes | None], bool, int]] = [
    ("dashboard", lambda jobs: None, False, 7),
    ("dashboard", lambda jobs: changes_of(JOB, [jobs[0].pk]), False, 7),
    ("dashboard", lambda jobs: changes_of(PROGRESS, [j.pk for j in jobs]), False, 2),
    ("jobs", lambda jobs: changes_of(PROGRESS, [j.pk for j in jobs]), False, 1),
    ("job", lambda jobs: None, True, 3),
    ("job", lambda jobs: changes_of(PROGRESS, [jobs[0].pk]), True, 2),
    ("inventory", lambda jobs: changes_of(INVENTORY, []), False, 0),
]


@pytest.mark.parametrize(("page", "make_changes", "keyed", "most"), RENDER_PATHS)
def test_relay_render_cost_does_not_grow_with_active_jobs(
    page: str, make_changes: Callable[[list[MigrationJob]], Changes | None], keyed: bool, most: int
) -> None:
    counts = []
    jobs: list[MigrationJob] = []
    for more in (3, 12):
        jobs += make_jobs(more, state=JobState.REPLICATING)
        group = Group(page, "operator", jobs[0].pk if keyed else None)
        count, html = render_queries(group, make_changes(jobs))
        assert html, f"{page} rendered nothing"
        counts.append(count)
    assert counts[0] == counts[1], f"{page}: {counts[0]} queries with 3 active jobs, {counts[1]} with 15"
    assert counts[1] <= most, f"{page}: {counts[1]} queries, pinned at {most}"


def test_the_inventory_page_fetches_its_own_table_when_the_inventory_changes() -> None:
    html = registry.render_group(Group("inventory", "viewer"), changes_of(INVENTORY, []))
    assert 'id="inventory-refresh"' in html and 'hx-trigger="load"' in html and 'hx-get="/vms/"' in html
    assert 'hx-include="#inventory-filters, #vm-page"' in html
    assert registry.render_group(Group("inventory", "viewer"), changes_of("nbd", [])) == ""


def test_the_group_page_renders_in_a_fixed_number_of_queries() -> None:
    group = actions.save_group(
        group=None, name="wave", sync_interval_minutes=5, max_concurrent=2, enabled=True, vm_ids=[]
    )
    counts = []
    for more in (3, 12):
        jobs = make_jobs(more, state=JobState.REPLICATING)
        SourceVM.objects.filter(jobs__in=jobs).update(group=group)
        count, html = render_queries(Group("group", "viewer", group.pk), changes_of(PROGRESS, [jobs[0].pk]))
        assert f'id="group-live-{group.pk}"' in html and jobs[0].vm.name in html
        counts.append(count)
    assert counts[0] == counts[1] <= 7, counts
    # A change of a job outside the group renders nothing.
    other = make_jobs(1, state=JobState.REPLICATING)[0]
    assert registry.render_group(Group("group", "viewer", group.pk), changes_of(PROGRESS, [other.pk])) == ""
