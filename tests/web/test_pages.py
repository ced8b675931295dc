"""The pages show what the rows say, filter and paginate, answer htmx with only their table, and
run a constant number of queries however many rows there are."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from exports.models import NbdServerState, VMExportMapping
from migrations_app.models import JobState, MigrationGroup, MigrationJob
from omaportal.web.templatetags.oma_format import bytes_human, eta, rate_human
from tests.support.factories import make_jobs, make_vm


def test_dashboard_shows_active_jobs_with_progress_and_the_nbd_card(
    operator: Client, nbd_state: NbdServerState
) -> None:
    active = make_jobs(2, state=JobState.REPLICATING)
    make_jobs(1, state=JobState.FAILED)
    html = operator.get(reverse("dashboard")).content.decode()
    for job in active:
        assert f'id="job-card-{job.pk}"' in html and job.vm.name in html
    assert "50%" in html and "100 MB/s" in html  # two disks at 50 MB/s each
    assert "1.32.5" in html and "4</span> of 4 served" in html
    assert 'ws-connect="/ws/live/?page=dashboard"' in html
    assert "<polyline" in html  # the throughput sparkline


def test_dashboard_empty_state_says_what_to_do(operator: Client, viewer: Client) -> None:
    assert "Pick VMs in the" in operator.get(reverse("dashboard")).content.decode()
    assert "When an operator starts a migration" in viewer.get(reverse("dashboard")).content.decode()


def test_job_list_filters_by_state_and_vm(viewer: Client) -> None:
    done = make_jobs(3, state=JobState.COMPLETED)
    failed = make_jobs(2, state=JobState.FAILED)
    html = viewer.get(reverse("job-list"), {"state": "failed"}).content.decode()
    assert all(j.job_id in html for j in failed) and not any(j.job_id in html for j in done)
    html = viewer.get(reverse("job-list"), {"vm": done[0].vm.name}).content.decode()
    assert done[0].job_id in html and failed[0].job_id not in html
    assert "match these filters" in viewer.get(reverse("job-list"), {"vm": "no-such-vm"}).content.decode()


def test_job_list_paginates_and_answers_htmx_with_the_table_only(viewer: Client) -> None:
    make_jobs(30)
    page2 = viewer.get(reverse("job-list"), {"page": 2}, headers={"HX-Request": "true"}).content.decode()
    assert page2.lstrip().startswith('<div id="job-table">') and "<html" not in page2
    assert "Page 2 of 2" in page2 and page2.count('<tr id="job-row-') == 5


def test_job_detail_shows_timeline_disks_and_events(viewer: Client) -> None:
    job = make_jobs(1, state=JobState.REPLICATING)[0]
    html = viewer.get(reverse("job-detail", args=[job.job_id])).content.decode()
    assert "Provisioning volumes" in html and "Replicating" in html
    assert 'class="step running"' in html
    assert "job.created" in html and "step.started" in html
    for disk in job.disks.all():
        assert disk.mapping.export_name in html  # type: ignore[union-attr]
    assert viewer.get(reverse("job-detail", args=["job-nope"])).status_code == 404


def test_inventory_shows_disks_with_their_exports_and_last_job(operator: Client) -> None:
    job = make_jobs(1)[0]
    html = operator.get(reverse("inventory")).content.decode()
    assert job.vm.name in html and job.job_id in html
    assert VMExportMapping.objects.filter(vm_id=job.vm.vm_id).first().export_name in html  # type: ignore[union-attr]
    assert operator.get(reverse("inventory"), {"q": "zzz"}).content.decode().count("No VM matches") == 1


def test_migrate_selected_vms_starts_jobs_for_the_operator(
    operator: Client, django_capture_on_commit_callbacks: Any
) -> None:
    vm = make_jobs(1)[0].vm
    # First the review: what would start, and nothing started yet.
    review = operator.post(reverse("migrate-vms"), {"vm": [vm.vm_id]}).content.decode()
    assert "Migrate 1 VM?" in review and "Start 1 migration" in review and "Nothing has started yet" in review
    assert "<td>Incremental</td>" in review, "its last job completed: the next sync is incremental"
    assert not MigrationJob.objects.filter(vm=vm, state=JobState.PENDING).exists()
    with django_capture_on_commit_callbacks() as queued:
        response = operator.post(reverse("migrate-vms"), {"vm": [vm.vm_id], "confirm": "yes"})
    assert response.status_code == 302 and response["Location"] == reverse("dashboard")
    job = MigrationJob.objects.filter(vm=vm, state=JobState.PENDING).get()
    assert job.requested_by.startswith("operator-")
    # Pending until the node's follower reserves its attach slots and hands it to a worker.
    assert not queued and job.queued_at is None and job.wait_reason == ""
    # A second start while one is active is refused with a message, not a second job.
    review = operator.post(reverse("migrate-vms"), {"vm": [vm.vm_id]}).content.decode()
    assert "a job is active" in review and "Start 0 migrations" in review
    operator.post(reverse("migrate-vms"), {"vm": [vm.vm_id], "confirm": "yes"})
    assert MigrationJob.objects.filter(vm=vm, state=JobState.PENDING).count() == 1


def test_mapping_list_filters(viewer: Client) -> None:
    jobs = make_jobs(2)
    VMExportMapping.objects.filter(vm_id=jobs[0].vm.vm_id).update(status=VMExportMapping.Status.RETIRED)
    html = viewer.get(reverse("mapping-list"), {"status": "retired"}).content.decode()
    assert jobs[0].vm.name in html and jobs[1].vm.name not in html


def test_nbd_page_shows_counters_and_warnings(viewer: Client, nbd_state: NbdServerState) -> None:
    NbdServerState.objects.update(crashes_detected=2, warnings=["nbd-server 3.24 corrupts its memory on reload"])
    html = viewer.get(reverse("nbd-server")).content.decode()
    assert "crashes detected" in html and "corrupts its memory" in html


def queries(client: Client, url: str, **params: str) -> int:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url, params)
    assert response.status_code == 200
    return len(ctx.captured_queries)


@pytest.mark.parametrize(
    ("page", "state"),
    [("dashboard", JobState.REPLICATING), ("job-list", JobState.COMPLETED), ("mapping-list", JobState.COMPLETED)],
)
def test_query_count_is_constant_as_rows_grow(
    operator: Client, nbd_state: NbdServerState, page: str, state: str, django_assert_max_num_queries: object
) -> None:
    make_jobs(10, state=state)
    few = queries(operator, reverse(page))
    make_jobs(40, state=state)
    assert queries(operator, reverse(page)) == few
    with django_assert_max_num_queries(12):  # type: ignore[operator]
        operator.get(reverse(page))


def test_human_units() -> None:
    assert bytes_human(3 << 30) == "3.0 GiB" and bytes_human(512) == "512 B"
    assert rate_human(125_000_000) == "125 MB/s" and rate_human(0) == "\u2013"
    assert eta({"done": 0, "total": 120_000_000, "rate": 1_000_000}) == "2 min left"
    assert eta({"done": 5, "total": 10, "rate": 0}) == "estimating…"


def test_a_finished_job_shows_its_average_throughput(viewer: Client) -> None:
    job = make_jobs(1, state=JobState.COMPLETED)[0]  # samples 100, 120 and 90 MB/s
    html = viewer.get(reverse("job-detail", args=[job.job_id])).content.decode()
    assert "103 MB/s on average" in html


@pytest.mark.parametrize("page", ["job-list", "inventory", "mapping-list"])
def test_a_list_answers_htmx_with_its_table_but_a_history_restore_with_the_page(viewer: Client, page: str) -> None:
    whole = viewer.get(reverse(page))
    table = viewer.get(reverse(page), headers={"HX-Request": "true"})
    restore = viewer.get(reverse(page), headers={"HX-Request": "true", "HX-History-Restore-Request": "true"})
    assert "<html" in whole.content.decode() and "<html" not in table.content.decode()
    assert "<html" in restore.content.decode()
    for response in (whole, table, restore):
        assert "HX-Request" in response["Vary"]


def test_operators_create_groups_and_viewers_only_see_them(operator: Client, viewer: Client) -> None:
    vm = make_vm(1)
    response = operator.post(
        reverse("group-new"),
        {"name": "wave 1", "sync_interval_minutes": 30, "max_concurrent": 2, "enabled": "on", "vms": [vm.vm_id]},
    )
    group = MigrationGroup.objects.get(name="wave 1")
    assert response.status_code == 302 and response["Location"] == reverse("group-detail", args=[group.pk])
    assert list(group.vms.all()) == [vm]
    page = viewer.get(reverse("group-detail", args=[group.pk])).content.decode()
    assert vm.name in page and "every <strong>30 min</strong>" in page and "Edit group" not in page
    assert f'ws-connect="/ws/live/?page=group&amp;key={group.pk}"' in page
    assert viewer.post(reverse("group-new"), {"name": "x"}).status_code == 403
    assert viewer.get(reverse("group-edit", args=[group.pk])).status_code == 403
    listing = viewer.get(reverse("group-list")).content.decode()
    assert "wave 1" in listing and "New group" not in listing


def test_a_job_says_what_it_waits_for_and_when_its_worker_went_silent(viewer: Client) -> None:
    from datetime import timedelta

    from django.utils import timezone

    waiting, silent = make_jobs(2, state=JobState.REPLICATING)
    MigrationJob.objects.filter(pk=waiting.pk).update(wait_reason="the VMA is unreachable; waiting since 10:00:00")
    MigrationJob.objects.filter(pk=silent.pk).update(
        state=JobState.ATTACHING,
        current_step=JobState.ATTACHING,
        runner="worker-1",
        heartbeat_at=timezone.now() - timedelta(minutes=5),
    )
    dashboard = viewer.get(reverse("dashboard")).content.decode()
    assert "the VMA is unreachable; waiting since 10:00:00" in dashboard
    assert re.search(r"Its worker went silent 30\d s ago; another worker takes attaching over\.", dashboard)
    page = viewer.get(reverse("job-detail", args=[silent.job_id])).content.decode()
    assert "Its worker went silent" in page


def test_errors_are_pages_of_the_app_with_a_way_home(viewer: Client) -> None:
    missing = viewer.get("/jobs/job-that-never-was/")
    assert missing.status_code == 404
    page = missing.content.decode()
    assert "There is nothing here" in page and 'href="/"' in page and 'aria-label="main"' in page
    job = make_jobs(1, state=JobState.REPLICATING)[0]
    refused = viewer.post(reverse("job-cancel", args=[job.job_id]))
    assert refused.status_code == 403
    page = refused.content.decode()
    assert "You may not do that" in page and 'aria-label="main"' in page and "Back to the dashboard" in page


def test_a_server_error_page_needs_nothing_but_itself(rf: Any) -> None:
    from django.views.defaults import server_error

    response = server_error(rf.get("/"))
    page = response.content.decode()
    assert response.status_code == 500 and "Something went wrong" in page and "oma.css" in page
    assert "Traceback" not in page and 'href="/"' in page


def test_every_page_has_a_favicon_and_filters_react_to_any_input(viewer: Client) -> None:
    for name in ("dashboard", "job-list", "mapping-list"):
        page = viewer.get(reverse(name)).content.decode()
        assert 'rel="icon"' in page and "favicon.svg" in page
    for name in ("job-list", "mapping-list"):
        page = viewer.get(reverse(name)).content.decode()
        assert "input changed delay:300ms" in page and "keyup" not in page  # paste and autofill count


def test_a_cancelled_job_says_where_it_stopped_not_waiting(viewer: Client) -> None:
    job = make_jobs(1, state=JobState.REPLICATING)[0]  # half of each disk copied
    MigrationJob.objects.filter(pk=job.pk).update(state=JobState.CANCELLED, current_step=JobState.REPLICATING)
    html = viewer.get(reverse("job-detail", args=[job.job_id])).content.decode()
    replicating = re.search(r'<li class="step ([^"]+)"><span class="dot"[^>]*></span><strong>Replicating', html)
    assert replicating and replicating[1] == "cancelled"
    assert "cancelled at 50 %" in html
    verifying = re.search(r'<li class="step ([^"]+)"><span class="dot"[^>]*></span><strong>Verifying', html)
    assert verifying and verifying[1] == "not run"
    assert ">waiting<" not in html


def test_job_list_says_each_jobs_kind_and_duration(viewer: Client) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from migrations_app.models import JobKind, MigrationJob

    full, incremental, failover = make_jobs(3)
    incremental.disks.update(previous_change_id="sim:2000:1")
    MigrationJob.objects.filter(pk=failover.pk).update(kind=JobKind.LIVE_FAILOVER)
    now = timezone.now()
    MigrationJob.objects.filter(pk=full.pk).update(started_at=now - timedelta(minutes=12), finished_at=now)
    page = viewer.get("/jobs/").content.decode()
    row = {job.job_id: page.split(job.job_id, 2)[2].split("</tr>")[0] for job in (full, incremental, failover)}
    assert "<td>Full</td>" in row[full.job_id] and "12\xa0minutes" in row[full.job_id]
    assert "<td>Incremental</td>" in row[incremental.job_id]
    assert "<td>Live failover</td>" in row[failover.job_id]


def test_job_list_names_each_placed_jobs_node(viewer: Client) -> None:
    from migrations_app.models import OmaNode

    placed, waiting = make_jobs(2)
    node = OmaNode.objects.create(name="oma-east-2")
    MigrationJob.objects.filter(pk=placed.pk).update(node=node)
    page = viewer.get("/jobs/").content.decode()
    row = {job.job_id: page.split(job.job_id, 2)[2].split("</tr>")[0] for job in (placed, waiting)}
    assert 'data-testid="job-row-node">on oma-east-2<' in row[placed.job_id]
    assert "job-row-node" not in row[waiting.job_id]


def test_only_a_vms_latest_job_offers_retry_and_it_says_what_it_will_do(operator: Client) -> None:
    from migrations_app.models import MigrationJob

    (old,) = make_jobs(1, state=JobState.FAILED)
    newer = MigrationJob.objects.create(vm=old.vm, state=JobState.FAILED, current_step=JobState.REPLICATING)
    page = operator.get(reverse("job-detail", args=[old.job_id])).content.decode()
    assert f'superseded by <a href="/jobs/{newer.job_id}/">{newer.job_id}</a>' in page
    assert "Retry from" not in page
    page = operator.get(reverse("job-detail", args=[newer.job_id])).content.decode()
    assert 'data-confirm="Retry resumes the copy from what the VMA confirmed written; nothing copied is lost."' in page
    listing = operator.get(reverse("job-list")).content.decode()
    assert f"superseded by {newer.job_id}" in listing.split(f'id="job-row-{old.pk}"')[1].split("</tr>")[0]


def test_a_pending_job_says_its_place_in_the_queue(viewer: Client) -> None:
    from migrations_app.models import MigrationJob

    first, second = make_jobs(2, state=JobState.PENDING)
    MigrationJob.objects.filter(pk=second.pk).update(wait_reason="needs 2 attach slots; 0 of 25 free")
    page = viewer.get(reverse("job-detail", args=[second.job_id])).content.decode()
    place = 1 if second.created_at < first.created_at else 2
    assert f"Waiting: needs 2 attach slots; 0 of 25 free · number {place} in the queue" in page


def test_the_inventory_says_when_it_was_refreshed_and_flags_vms_the_vma_dropped(operator: Client) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from migrations_app.models import SourceVM

    kept, dropped = (job.vm for job in make_jobs(2))
    now = timezone.now()
    SourceVM.objects.filter(pk=kept.pk).update(last_seen_at=now)
    SourceVM.objects.filter(pk=dropped.pk).update(last_seen_at=now - timedelta(hours=3))
    page = operator.get(reverse("inventory")).content.decode()
    assert "refreshed from the VMA at" in page
    row = {vm.pk: page.split(f'id="vm-{vm.vm_id}"')[1].split("</tr>")[0] for vm in (kept, dropped)}
    assert "no longer reported by the VMA" in row[dropped.pk] and "no longer reported" not in row[kept.pk]
    assert f'data-bytes="{sum(d.capacity_bytes for d in kept.disks.all())}"' in row[kept.pk]


def test_the_event_log_reads_as_sentences_with_each_step_on_one_line(viewer: Client) -> None:
    from migrations_app.events import record_job_event

    (job,) = make_jobs(1, state=JobState.COMPLETED)
    record_job_event(job, "step.started", step=JobState.EXPORTING)
    record_job_event(job, "exports.ready", step=JobState.EXPORTING, message="migration-vm-x-disk0")
    record_job_event(job, "step.finished", step=JobState.EXPORTING, duration_ms=1200)
    record_job_event(job, "step.started", step=JobState.REPLICATING)
    html = viewer.get(reverse("job-detail", args=[job.job_id])).content.decode()
    log = html.split("Event log")[1]
    assert "<td>Exporting over NBD</td>" in log and "<td>1.2 s</td>" in log
    assert log.count('data-kind="step.finished"') == 0, "a finish is folded into its step's line"
    assert "<td>Exports ready</td>" in log and "<td>Replicating (running)</td>" in log


def test_lists_sort_by_a_column_and_take_a_page_size(viewer: Client) -> None:
    jobs = make_jobs(30)
    by_vm = sorted(jobs, key=lambda j: j.vm.name)
    html = viewer.get(reverse("job-list"), {"sort": "vm", "per_page": "50"}).content.decode()
    assert html.count('<tr id="job-row-') == 30, "50 per page: all 30 on one page"
    order = [j.job_id for j in by_vm]
    assert sorted(order, key=html.index) == order, "ascending by VM name"
    assert 'aria-sort="ascending"><a class="sort" href="?sort=-vm&amp;per_page=50">VM ▲' in html
    html = viewer.get(reverse("job-list"), {"sort": "-vm"}).content.decode()
    assert html.count('<tr id="job-row-') == 25 and by_vm[-1].job_id in html and by_vm[0].job_id not in html
    # Anything else falls back to the defaults instead of failing.
    assert viewer.get(reverse("job-list"), {"sort": "password", "per_page": "7"}).status_code == 200
    vms = viewer.get(reverse("inventory"), {"sort": "-name"}).content.decode()
    names = sorted((j.vm.name for j in jobs), reverse=True)
    assert sorted(names[:5], key=vms.index) == names[:5]
    exports = viewer.get(reverse("mapping-list"), {"sort": "-vm", "per_page": "25"}).content.decode()
    assert exports.count("<tr><td>") == 25


def test_a_jobs_card_and_page_say_full_or_incremental_since_when(viewer: Client) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from migrations_app.models import JobDisk, MigrationJob

    (done,) = make_jobs(1, state=JobState.COMPLETED)
    synced_at = timezone.now() - timedelta(hours=2)
    MigrationJob.objects.filter(pk=done.pk).update(finished_at=synced_at)
    running = MigrationJob.objects.create(
        vm=done.vm, state=JobState.REPLICATING, current_step=JobState.REPLICATING, since_sync_at=synced_at
    )
    for disk in done.vm.disks.all():
        JobDisk.objects.create(job=running, source_disk=disk, previous_change_id="sim:2000:1", bytes_total=0)
    card = viewer.get(reverse("dashboard")).content.decode().split(f'id="job-card-{running.pk}"')[1]
    assert f'Incremental since <time datetime="{synced_at.isoformat()}">' in card.split("</article>")[0]
    page = viewer.get(reverse("job-detail", args=[running.job_id])).content.decode()
    assert "Incremental since the sync of" in page
    assert "the VMA is counting the changed blocks" in page
    finished = viewer.get(reverse("job-detail", args=[done.job_id])).content.decode()
    assert '<dd data-testid="job-kind">Full</dd>' in finished


def test_a_retry_keeps_the_last_attempts_numbers_apart(operator: Client) -> None:
    from migrations_app import actions
    from migrations_app.models import MigrationJob

    (job,) = make_jobs(1, state=JobState.FAILED)
    MigrationJob.objects.filter(pk=job.pk).update(started_at=job.finished_at)
    actions.retry_job(job_id=job.job_id, actor="tester")
    job.refresh_from_db()
    assert job.attempt == 2 and job.throughput_samples == [] and job.started_at is None
    ended = job.events.get(kind="job.attempt_ended").message
    assert ended.startswith("attempt 1 failed in replicating") and "MiB moved" in ended and "Mbit/s on average" in ended


def test_every_listed_time_is_a_time_element_with_its_zone(viewer: Client, nbd_state: object) -> None:
    (job,) = make_jobs(1, state=JobState.COMPLETED)
    row = viewer.get(reverse("job-list")).content.decode().split(f'id="job-row-{job.pk}"')[1].split("</tr>")[0]
    assert row.count("<time datetime=") == 2 and row.count(" UTC</time>") == 2
    assert "never" in viewer.get(reverse("nbd-server")).content.decode()
