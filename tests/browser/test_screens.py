"""Every main page at a phone's width and at desktop widths: nothing is wider than the screen (tables
scroll inside their own box), and no console or page error appears."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from migrations_app.actions import start_migration
from migrations_app.models import JobState, MigrationJob, SourceVM
from tests.support.browser import ARTIFACTS, Portal, log_in
from tests.support.factories import UserFactory
from tests.support.vma import Sim

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]

WIDTHS = [(390, 844), (1440, 900), (1920, 1080)]
# axe-core, the npm package (make installs it next to the virtual environment).
AXE = Path(__file__).resolve().parents[2] / ".venv" / "axe" / "node_modules" / "axe-core" / "axe.min.js"


def axe_violations(page: Page) -> list[str]:
    """Serious and critical accessibility violations axe-core finds on the page as it is now."""
    page.add_script_tag(path=str(AXE))
    found = page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
        ".filter(v => ['serious', 'critical'].includes(v.impact))"
        ".map(v => v.id + ': ' + v.nodes.slice(0, 2).map(n => n.target.join(' ')).join(', '))"
    )
    return list(found)


def pages_to_walk(job: MigrationJob) -> dict[str, str]:
    return {
        "dashboard": "/",
        "vms": "/vms/",
        "groups": "/groups/",
        "jobs": "/jobs/",
        "job": f"/jobs/{job.job_id}/",
        "exports": "/exports/",
        "nbd": "/nbd/",
        "nodes": "/nodes/",
        "failover": f"/vms/{job.vm.vm_id}/failover/",
        "mappings": "/failover/",
        "not-found": "/jobs/no-such-job/",
    }


@pytest.mark.parametrize("role", ["operator", "viewer"])
def test_no_page_is_wider_than_the_screen_and_none_logs_an_error(
    stack: tuple[Portal, Sim], browser: Browser, make_user: UserFactory, role: str
) -> None:
    portal, _sim = stack
    # The portal's CSP refuses inline scripts, axe's injection among them: this context alone bypasses it.
    context = browser.new_context(bypass_csp=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    try:
        walk(portal, page, make_user, role)
    finally:
        context.close()


def walk(portal: Portal, page: Page, make_user: UserFactory, role: str) -> None:
    vm = SourceVM.objects.get(name="db-01")
    job = start_migration(vm_id=vm.vm_id, requested_by="test")
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    log_in(page, portal, make_user, role)
    too_wide, inaccessible = [], []
    for width, height in WIDTHS:
        page.set_viewport_size({"width": width, "height": height})
        for name, path in pages_to_walk(job).items():
            page.goto(f"{portal.url}{path}")
            page.wait_for_load_state("networkidle")
            scroll, inner = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
            if scroll > inner:
                widest = page.evaluate(
                    "[...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > "
                    "window.innerWidth + 1).slice(0, 3).map(e => e.tagName + '.' + e.className).join(' ')"
                )
                too_wide.append(f"{name} at {width}px: {scroll}px wide ({widest})")
            inaccessible += [f"{name} at {width}px: {v}" for v in axe_violations(page)]
            if role == "operator" and name in ("dashboard", "job", "vms", "not-found"):
                page.screenshot(path=str(ARTIFACTS / f"{name}-{width}.png"), full_page=True)
    # A 404 is expected for the missing job (the browser logs the failed load); nothing else may fail.
    errors = [e for e in errors if "404" not in e]
    assert not too_wide, too_wide
    assert not errors, errors
    if inaccessible:
        pytest.fail("axe-core found serious or critical violations:\n" + "\n".join(inaccessible))


def test_times_show_in_the_viewers_zone_and_elapsed_time_ticks(
    stack: tuple[Portal, Sim], browser: Browser, make_user: UserFactory
) -> None:
    """A viewer in Berlin reads times in Berlin time with the zone shown; a running job's elapsed time
    moves without a reload."""
    from django.utils import timezone

    from migrations_app.models import MigrationJob
    from tests.support.factories import make_jobs

    portal, _ = stack
    (job,) = make_jobs(1, state=JobState.REPLICATING)
    MigrationJob.objects.filter(pk=job.pk).update(started_at=timezone.now())
    context = browser.new_context(timezone_id="Europe/Berlin", viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        log_in(page, portal, make_user, "viewer")
        page.goto(f"{portal.url}/jobs/{job.job_id}/")
        requested = page.locator("dt:has-text('Requested') + dd time")
        expect(requested).to_have_text(re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (CET|GMT\+1)"))
        utc_hour = job.created_at.hour
        assert f" {(utc_hour + 1) % 24:02d}:" in requested.inner_text(), "shown in Berlin time, not UTC"
        ticking = page.locator("dt:has-text('Started') + dd [data-since]")
        first = ticking.inner_text()
        page.wait_for_timeout(2200)
        assert ticking.inner_text() != first, f"the elapsed time did not move: {first}"
    finally:
        context.close()


def test_screenshots_of_the_review_step_and_incremental_jobs_at_each_width(
    stack: tuple[Portal, Sim], page: Page, make_user: UserFactory
) -> None:
    """What the issue asks to see at each width: the VMs review step, and a running and a finished
    incremental job (their pages say so)."""
    from datetime import timedelta

    from django.utils import timezone

    from migrations_app.models import JobDisk
    from tests.support.factories import make_jobs

    portal, _ = stack
    (finished,) = make_jobs(1, state=JobState.COMPLETED)
    synced_at = timezone.now() - timedelta(hours=1)
    MigrationJob.objects.filter(pk=finished.pk).update(finished_at=synced_at - timedelta(hours=1))
    JobDisk.objects.filter(job=finished).update(previous_change_id="sim:2000:1")
    MigrationJob.objects.filter(pk=finished.pk).update(since_sync_at=synced_at - timedelta(hours=3))
    running = MigrationJob.objects.create(
        vm=finished.vm, state=JobState.REPLICATING, current_step=JobState.REPLICATING, since_sync_at=synced_at,
        started_at=timezone.now(), throughput_samples=[40e6, 55e6, 61e6],
    )  # fmt: skip
    for disk in finished.vm.disks.all():
        JobDisk.objects.create(
            job=running, source_disk=disk, previous_change_id="sim:2000:2", bytes_total=64 << 20, bytes_done=24 << 20
        )
    log_in(page, portal, make_user, "operator")
    for width, height in WIDTHS:
        page.set_viewport_size({"width": width, "height": height})
        for name, job in (("incremental-running", running), ("incremental-finished", finished)):
            page.goto(f"{portal.url}/jobs/{job.job_id}/")
            expect(page.locator("[data-testid=job-kind]")).to_contain_text("Incremental since")
            page.screenshot(path=str(ARTIFACTS / f"{name}-{width}.png"), full_page=True)
        page.goto(f"{portal.url}/vms/")
        page.check("input[aria-label='select web-01']")
        page.click("#migrate-button")
        expect(page.locator("[data-testid=review-summary]")).to_contain_text("1 to start")
        page.screenshot(path=str(ARTIFACTS / f"review-{width}.png"), full_page=True)
