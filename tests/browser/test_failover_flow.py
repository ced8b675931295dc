"""An operator fails a VM over in a real browser against the real stack: a test failover, ended, then a
live failover, each watched to its end on the job page without a reload."""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import Page, expect

from devtools.cloud import map_cloud
from migrations_app import actions
from migrations_app.backends import get_compute_backend
from migrations_app.models import JobKind, JobState, MigrationJob
from tests.support.browser import ARTIFACTS, Portal, log_in
from tests.support.factories import UserFactory
from tests.support.vma import Sim

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]


def wait_state(job: MigrationJob, state: str, timeout: float = 90) -> MigrationJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.state == state:
            return job
        time.sleep(0.2)
    raise AssertionError(f"{job.job_id} is {job.state}, not {state}: {job.error}")


def test_operator_tests_then_fails_over_a_vm_and_watches_each_live(
    stack: tuple[Portal, Sim], page: Page, make_user: UserFactory
) -> None:
    portal, sim = stack
    web = sim.vm("web-01")
    sync = actions.start_migration(vm_id=web.id, requested_by="tester")
    wait_state(sync, JobState.COMPLETED)
    map_cloud(get_compute_backend())
    log_in(page, portal, make_user, "operator")
    page.on("dialog", lambda dialog: dialog.accept())  # every Start / End / Roll back asks first
    page.goto(f"{portal.url}/vms/")
    page.click("tr:has-text('web-01') >> text=failover")
    expect(page.locator("h1")).to_have_text("Fail over web-01")
    page.screenshot(path=str(ARTIFACTS / "failover-page.png"), full_page=True)

    page.click("text=Start test failover")
    expect(page.locator("[data-testid=job-state]")).to_be_visible()
    test = MigrationJob.objects.get(kind=JobKind.TEST_FAILOVER)
    page.evaluate("window.__sameDocument = true")
    expect(page.locator("[data-testid=job-state]")).to_have_text("Test VM running", timeout=60_000)
    # A screen reader hears it: the live region says which job changed and to what.
    expect(page.locator("#announcer")).to_have_text(f"web-01 {test.job_id}: Test VM running")
    assert page.evaluate("window.__sameDocument") is True, "the state arrived live, not by a reload"
    page.click("button:has-text('End test')")
    page.evaluate("window.__sameDocument = true")
    expect(page.locator("[data-testid=job-state]")).to_have_text("Completed", timeout=60_000)
    assert page.evaluate("window.__sameDocument") is True
    test.refresh_from_db()
    assert get_compute_backend().get_vm(test.destination_vm_id) is None
    assert web.power_state == "poweredOn"

    page.goto(f"{portal.url}/vms/{web.id}/failover/")
    page.fill("input[name=confirm_name]", "web-01")
    page.click("text=Fail over now")
    expect(page.locator("[data-testid=job-state]")).to_be_visible()
    page.evaluate("window.__sameDocument = true")
    expect(page.locator("[data-testid=job-state]")).to_have_text("Completed", timeout=90_000)
    assert page.evaluate("window.__sameDocument") is True
    live = MigrationJob.objects.get(kind=JobKind.LIVE_FAILOVER)
    assert live.state == JobState.COMPLETED, live.error
    made = get_compute_backend().get_vm(live.destination_vm_id)
    assert made is not None and made.state == "Running" and web.power_state == "poweredOff"
    expect(page.locator(".timeline .step.done")).to_have_count(10)
    expect(page.locator("button:has-text('Roll back')")).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "failover-job.png"), full_page=True)
