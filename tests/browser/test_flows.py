"""Operator and viewer flows in a real browser against the real stack: no mocks between the click and
the bytes on the volume."""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import Dialog, Page, expect

from migrations_app.models import STEPS, JobState, MigrationJob
from migrations_app.vma_client import VmaVM
from tests.support.browser import ARTIFACTS, Portal, log_in
from tests.support.factories import UserFactory
from tests.support.flows import assert_copied
from tests.support.vma import Sim

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]


def bar_width(page: Page, selector: str) -> float:
    return float(page.eval_on_selector(selector, "el => parseFloat(el.style.width) || 0"))


def test_operator_migrates_a_vm_and_watches_it_complete_without_reloading(
    stack: tuple[Portal, Sim], page: Page, make_user: UserFactory
) -> None:
    portal, sim = stack
    user = log_in(page, portal, make_user, "operator")
    page.click("nav >> text=VMs")
    # Migrate only with a selection; select all ticks every VM and says how much that is.
    expect(page.locator("#migrate-button")).to_be_disabled()
    page.check("#select-all")
    expect(page.locator("#selection")).to_have_text("4 selected, 256.0 MiB")
    page.uncheck("#select-all")
    expect(page.locator("#selection")).to_have_text("Nothing selected.")
    page.check("input[aria-label='select web-01']")
    expect(page.locator("#selection")).to_have_text("1 selected, 32.0 MiB")
    expect(page.locator("#select-all")).not_to_be_checked()
    page.click("text=Review the migration of the selected VMs")
    expect(page.locator("[data-testid=review-summary]")).to_contain_text("1 to start, 32.0 MiB of disks: 1 full copy")
    page.click("text=Start 1 migration")
    page.wait_for_url(f"{portal.url}/")
    expect(page.locator(".msg.success")).to_contain_text("Started 1 migration")
    expect(page.locator("#live-state")).to_have_text("● live")
    job = MigrationJob.objects.get(vm__name="web-01")
    assert job.requested_by == user
    # From here on the page is never reloaded: a marker on window would vanish if it were.
    page.evaluate("window.__sameDocument = true")
    card_bar = f"#job-card-{job.pk} .progress .bar"
    seen: set[float] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len({w for w in seen if 0 < w < 100}) < 2:
        if page.locator(card_bar).count():
            seen.add(bar_width(page, card_bar))
        time.sleep(0.2)
    job.refresh_from_db()
    assert len({w for w in seen if 0 < w < 100}) >= 2, (
        f"the bar never moved live: {sorted(seen)}; {job.state} {job.error}; "
        f"{list(job.events.values_list('kind', 'step', 'duration_ms'))}"
    )
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    # The card leaves the active list and the job shows completed in "Recently finished".
    expect(page.locator(f"#job-card-{job.pk}")).to_have_count(0, timeout=60_000)
    expect(page.locator("#recent-jobs")).to_contain_text(job.job_id)
    expect(page.locator("#recent-jobs .badge.completed").first).to_be_visible()
    assert page.evaluate("window.__sameDocument") is True
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.error
    assert_copied(job, sim)
    page.click(f"#recent-jobs >> text={job.job_id}")
    expect(page.locator("[data-testid=job-state]")).to_have_text("Completed")
    expect(page.locator(".timeline .step.done")).to_have_count(len(STEPS))  # verifying included
    page.screenshot(path=str(ARTIFACTS / "job-detail.png"), full_page=True)
    page.set_viewport_size({"width": 1920, "height": 1080})
    page.goto(f"{portal.url}/")
    page.screenshot(path=str(ARTIFACTS / "dashboard-1920.png"), full_page=True)


def test_operator_cancels_a_running_job_from_its_page(
    stack: tuple[Portal, Sim], page: Page, make_user: UserFactory
) -> None:
    portal, _ = stack
    log_in(page, portal, make_user, "operator")
    page.goto(f"{portal.url}/vms/")
    page.check("input[aria-label='select db-01']")
    page.click("text=Review the migration of the selected VMs")
    page.click("text=Start 1 migration")
    job = MigrationJob.objects.get(vm__name="db-01")
    page.goto(f"{portal.url}/jobs/{job.job_id}/")
    expect(page.locator("[data-testid=job-state]")).to_have_text("Replicating", timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "job-detail-replicating.png"), full_page=True)
    # Cancel asks first, saying what it will do; dismissed, nothing happens.
    questions: list[str] = []

    def dismiss(dialog: Dialog) -> None:
        questions.append(dialog.message)
        dialog.dismiss()

    page.once("dialog", dismiss)
    page.click("text=Cancel migration")
    page.wait_for_timeout(500)
    assert questions == ["Cancel stops the copy at the VMA; volumes and exports are kept for a retry."]
    assert MigrationJob.objects.get(pk=job.pk).state == JobState.REPLICATING
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("text=Cancel migration")
    expect(page.locator("[data-testid=job-state]")).to_have_text("Cancelled", timeout=30_000)
    # No flash message says "cancelling" next to a job that is cancelled: the state shows live instead.
    expect(page.locator(".messages .msg")).to_have_count(0)
    expect(page.locator("text=Retry from replicating")).to_be_visible()
    job.refresh_from_db()
    assert job.state == JobState.CANCELLED
    assert job.events.filter(kind="job.cancel_requested").get().actor.startswith("operator-")


def test_viewer_sees_no_actions_and_a_forged_post_is_refused(
    stack: tuple[Portal, Sim], page: Page, make_user: UserFactory
) -> None:
    portal, sim = stack
    from migrations_app import actions

    job = actions.start_migration(vm_id=sim.vm("app-01").id, requested_by="someone")
    log_in(page, portal, make_user, "viewer")
    expect(page.locator(f"#job-card-{job.pk}")).to_be_visible()
    expect(page.locator("text=Migrate VMs…")).to_have_count(0)
    expect(page.locator(f"#job-card-{job.pk} button")).to_have_count(0)
    page.goto(f"{portal.url}/vms/")
    expect(page.locator("input[type=checkbox]")).to_have_count(0)
    expect(page.locator("text=Review the migration of the selected VMs")).to_have_count(0)
    page.goto(f"{portal.url}/jobs/{job.job_id}/")
    expect(page.locator("text=Cancel migration")).to_have_count(0)
    # A forged POST with a valid session and CSRF token is still refused: the role decides.
    token = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
    response = page.request.post(
        f"{portal.url}/jobs/{job.job_id}/cancel/", headers={"X-CSRFToken": token, "Referer": f"{portal.url}/"}
    )
    assert response.status == 403
    job.refresh_from_db()
    assert job.state != JobState.CANCELLING and job.state != JobState.CANCELLED


def test_the_page_reconnects_after_a_portal_restart_and_shows_the_truth(
    stack: tuple[Portal, Sim], page: Page, make_user: UserFactory
) -> None:
    portal, sim = stack
    from migrations_app import actions

    log_in(page, portal, make_user, "viewer")
    expect(page.locator("#live-state")).to_have_text("● live")
    page.evaluate("window.__sameDocument = true")
    portal.stop()
    expect(page.locator("#live-state")).to_have_text("○ reconnecting…")
    # While the portal is down, a job starts (from another process: the CLI, another portal).
    job = actions.start_migration(vm_id=sim.vm("file-01").id, requested_by="cli")
    portal.start()
    # The extension reconnects by itself and the new connection's snapshot shows the job: as a card while
    # it runs, or among the recently finished once it is done (on a slow machine it may finish before the
    # page is back), never nowhere.
    expect(page.locator("#live-state")).to_have_text("● live", timeout=40_000)
    card = page.locator(f"#job-card-{job.pk}")
    finished = page.locator("tbody tr").filter(has_text="Completed").get_by_role("link", name=job.job_id)
    expect(card.or_(finished).first).to_be_visible(timeout=15_000)
    assert page.evaluate("window.__sameDocument") is True


def test_the_inventory_shows_a_vm_read_from_the_vma_meanwhile_and_keeps_the_ticks(
    stack: tuple[Portal, Sim], page: Page, make_user: UserFactory
) -> None:
    portal, sim = stack
    from migrations_app import actions

    log_in(page, portal, make_user, "operator")
    page.goto(f"{portal.url}/vms/")
    expect(page.locator("#live-state")).to_have_text("● live")
    page.check("input[aria-label='select web-01']")
    page.evaluate("window.__sameDocument = true")
    # Another operator (or discover_vms) reads the VMA's inventory, which now has one more VM.
    inventory = sim.client.inventory()
    extra: VmaVM = {**inventory[0], "id": "4210ffff-0000-4000-8000-00000000beef", "name": "new-vm-01"}
    actions.sync_inventory([*inventory, extra])
    expect(page.locator("text=new-vm-01")).to_be_visible(timeout=15_000)
    expect(page.locator("input[aria-label='select web-01']")).to_be_checked()
    assert page.evaluate("window.__sameDocument") is True


def test_the_jobs_list_shows_new_jobs_live_without_oob_errors(
    stack: tuple[Portal, Sim], page: Page, make_user: UserFactory
) -> None:
    from migrations_app import actions

    portal, sim = stack
    problems: list[str] = []
    page.on("console", lambda msg: problems.append(msg.text) if msg.type in ("error", "warning") else None)
    log_in(page, portal, make_user, "viewer")
    first = actions.start_migration(vm_id=sim.vm("web-01").id, requested_by="someone")
    page.goto(f"{portal.url}/jobs/?per_page=25")
    expect(page.locator(f"#job-row-{first.pk}")).to_be_visible()
    expect(page.locator("#live-state")).to_have_text("● live")
    page.evaluate("window.__sameDocument = true")
    second = actions.start_migration(vm_id=sim.vm("db-01").id, requested_by="someone")
    expect(page.locator(f"#job-row-{second.pk}")).to_be_visible(timeout=15_000)
    # The first job's row keeps moving live meanwhile, and nothing was swapped blind.
    expect(page.locator(f"#job-row-{first.pk} .badge")).to_have_text("Completed", timeout=60_000)
    assert page.evaluate("window.__sameDocument") is True
    assert not [p for p in problems if "oob" in p.lower()], problems
