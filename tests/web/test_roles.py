"""Who may see and do what: login everywhere, buttons only for operators, 403 for forged POSTs,
CSRF on every form, throttled logins, and every action recorded with its user."""

from __future__ import annotations

import io

import pytest
from django.contrib.auth.models import Group, User
from django.core.cache import cache
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from migrations_app.models import JobState, MigrationJob
from omaportal.web.auth import MAX_FAILURES_PER_USER
from omaportal.web.roles import can_operate, can_view
from tests.support.factories import PASSWORD, UserFactory, client_as, make_jobs

PAGES = ["dashboard", "inventory", "job-list", "mapping-list", "nbd-server"]


@pytest.fixture(autouse=True)
def _fresh_throttle(db: None) -> None:
    cache.clear()


def test_setup_roles_command_creates_groups_and_the_first_admin(db: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMA_ADMIN_PASSWORD", PASSWORD)
    out = io.StringIO()
    call_command("setup_roles", "--user", "root-admin", stdout=out)
    assert {g.name for g in Group.objects.all()} >= {"viewer", "operator", "admin"}
    admin = User.objects.get(username="root-admin")
    assert admin.is_staff and admin.check_password(PASSWORD) and can_operate(admin)
    call_command("setup_roles", stdout=out)  # idempotent
    assert Group.objects.filter(name="operator").count() == 1


def test_setup_roles_refuses_a_new_user_without_a_password(db: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMA_ADMIN_PASSWORD", raising=False)
    with pytest.raises(Exception, match="OMA_ADMIN_PASSWORD"):
        call_command("setup_roles", "--user", "nopass", stdout=io.StringIO())
    assert not User.objects.filter(username="nopass").exists()


def test_role_permissions(make_user: UserFactory) -> None:
    viewer, operator, nobody = make_user("viewer"), make_user("operator"), make_user("none")
    assert can_view(viewer) and not can_operate(viewer)
    assert can_view(operator) and can_operate(operator)
    assert not can_view(nobody) and not can_operate(nobody)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_needs_a_login(client: Client, page: str, db: None) -> None:
    response = client.get(reverse(page))
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))


def test_a_user_without_a_role_is_refused(make_user: UserFactory) -> None:
    assert client_as(make_user("none")).get(reverse("dashboard")).status_code == 403


def test_viewer_sees_no_buttons_and_forged_posts_get_403(viewer: Client, operator: Client) -> None:
    job = make_jobs(1, state=JobState.REPLICATING)[0]
    failed = make_jobs(1, state=JobState.FAILED)[0]
    detail = reverse("job-detail", args=[job.job_id])
    for client, sees in ((viewer, False), (operator, True)):
        html = client.get(detail).content.decode()
        assert ("Cancel migration" in html) is sees
        assert ("Retry from" in client.get(reverse("job-detail", args=[failed.job_id])).content.decode()) is sees
        assert ("Review the migration of the selected VMs" in client.get(reverse("inventory")).content.decode()) is sees
        assert ('name="vm"' in client.get(reverse("inventory")).content.decode()) is sees
    posts = [
        (reverse("migrate-vms"), {"vm": job.vm.vm_id}),
        (reverse("migrate-vms"), {"vm": job.vm.vm_id, "confirm": "yes"}),
        (reverse("refresh-inventory"), {}),
        (reverse("job-cancel", args=[job.job_id]), {}),
        (reverse("job-retry", args=[failed.job_id]), {}),
    ]
    for url, data in posts:
        assert viewer.post(url, data).status_code == 403, url
    job.refresh_from_db()
    failed.refresh_from_db()
    assert job.state == JobState.REPLICATING and failed.state == JobState.FAILED
    assert MigrationJob.objects.count() == 2


def test_posts_without_a_csrf_token_are_refused(make_user: UserFactory) -> None:
    job = make_jobs(1, state=JobState.REPLICATING)[0]
    client = Client(enforce_csrf_checks=True)
    client.force_login(make_user("operator"))
    assert client.post(reverse("job-cancel", args=[job.job_id])).status_code == 403
    job.refresh_from_db()
    assert job.state == JobState.REPLICATING


def test_operator_cancel_is_recorded_with_the_user(make_user: UserFactory) -> None:
    user = make_user("operator")
    job = make_jobs(1, state=JobState.REPLICATING)[0]
    response = client_as(user).post(reverse("job-cancel", args=[job.job_id]))
    assert response.status_code == 302
    job.refresh_from_db()
    assert job.state == JobState.CANCELLING
    assert job.events.get(kind="job.cancel_requested").actor == user.username


def test_login_is_throttled_after_repeated_failures(make_user: UserFactory) -> None:
    user = make_user("viewer")
    client = Client()
    for _ in range(MAX_FAILURES_PER_USER):
        response = client.post(reverse("login"), {"username": user.username, "password": "wrong"})
        assert response.status_code == 200 and "correct username and password" in response.content.decode()
    # Even the right password is refused now, without being checked.
    response = client.post(reverse("login"), {"username": user.username, "password": PASSWORD})
    assert response.status_code == 200 and "Too many failed logins" in response.content.decode()
    assert "_auth_user_id" not in client.session
    # Another user from the same address is not locked out by this one's failures.
    other = make_user("viewer")
    response = client.post(reverse("login"), {"username": other.username, "password": PASSWORD})
    assert response.status_code == 302


def test_login_and_logout(make_user: UserFactory) -> None:
    user = make_user("operator")
    client = Client()
    response = client.post(reverse("login"), {"username": user.username, "password": PASSWORD})
    assert response.status_code == 302 and response["Location"] == reverse("dashboard")
    assert client.get(reverse("dashboard")).status_code == 200
    assert client.post(reverse("logout")).status_code == 302
    assert client.get(reverse("dashboard")).status_code == 302


def test_healthz_needs_no_login(client: Client, db: None) -> None:
    body = client.get(reverse("healthz")).json()
    assert body["ok"] is True and body["database"] in ("sqlite", "postgresql")
