"""Login throttling on both login pages, per account across addresses, with back-off; the client
address behind a trusted proxy; every login, failure and lockout recorded."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from django.core.cache import cache
from django.test import Client
from django.urls import reverse

from omaportal.web import auth
from omaportal.web.auth import MAX_FAILURES_PER_ADDRESS, MAX_FAILURES_PER_USER, account_wait, client_address
from omaportal.web.models import LoginEvent
from tests.support.factories import PASSWORD, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fresh_cache(db: None) -> Iterator[None]:
    cache.clear()
    yield
    cache.clear()


def post_login(url: str, username: str, password: str, address: str = "10.0.0.1", **extra: str) -> str:
    meta: dict[str, str] = {"REMOTE_ADDR": address, **extra}
    response = Client(**meta).post(url, {"username": username, "password": password})  # type: ignore[arg-type]
    return "ok" if response.status_code == 302 else response.content.decode()


def test_admin_login_is_throttled_even_for_the_right_password(make_user: UserFactory) -> None:
    admin = make_user("admin")
    admin.is_staff = True
    admin.save()
    url = reverse("admin:login")
    for _ in range(30):
        post_login(url, admin.username, "wrong")
    page = post_login(url, admin.username, PASSWORD)
    assert "Too many failed logins" in page
    assert LoginEvent.objects.filter(username=admin.username, kind=LoginEvent.Kind.THROTTLED).exists()


def test_the_account_waits_whatever_address_the_attempts_come_from(make_user: UserFactory) -> None:
    user = make_user("viewer")
    for n in range(MAX_FAILURES_PER_USER):
        post_login(reverse("login"), user.username, "wrong", address=f"10.0.1.{n}")
    assert "Too many failed logins" in post_login(reverse("login"), user.username, PASSWORD, address="10.0.2.1")


def test_the_wait_doubles_with_each_further_failure_and_ends(make_user: UserFactory) -> None:
    user = make_user("viewer")
    for _ in range(MAX_FAILURES_PER_USER):
        auth.record_failure(user.username, "10.0.0.9")
    now = time.time()
    first = account_wait(user.username, now)
    assert 55 < first <= auth.FIRST_WAIT_SECONDS
    auth.record_failure(user.username, "10.0.0.9")
    assert 115 < account_wait(user.username, time.time()) <= 2 * auth.FIRST_WAIT_SECONDS
    assert account_wait(user.username, time.time() + 2 * auth.FIRST_WAIT_SECONDS + 1) == 0
    for _ in range(20):
        auth.record_failure(user.username, "10.0.0.9")
    assert account_wait(user.username, time.time()) <= auth.MAX_WAIT_SECONDS


def test_a_success_clears_the_account_and_is_recorded(make_user: UserFactory) -> None:
    user = make_user("viewer")
    for _ in range(MAX_FAILURES_PER_USER - 1):
        post_login(reverse("login"), user.username, "wrong")
    assert post_login(reverse("login"), user.username, PASSWORD) == "ok"
    assert account_wait(user.username) == 0 and cache.get(auth._account_key(user.username)) is None
    kinds = list(LoginEvent.objects.filter(username=user.username).values_list("kind", flat=True))
    assert kinds.count("failure") == MAX_FAILURES_PER_USER - 1 and kinds.count("login") == 1


def test_one_address_is_refused_for_every_account_after_many_failures(make_user: UserFactory) -> None:
    users = [make_user("viewer") for _ in range(MAX_FAILURES_PER_ADDRESS // 2 + 1)]
    for user in users:
        for _ in range(2):
            post_login(reverse("login"), user.username, "wrong", address="10.9.9.9")
    fresh = make_user("viewer")
    assert "Too many failed logins" in post_login(reverse("login"), fresh.username, PASSWORD, address="10.9.9.9")
    assert post_login(reverse("login"), fresh.username, PASSWORD, address="10.9.9.10") == "ok"


def test_behind_a_trusted_proxy_the_forwarded_client_counts(make_user: UserFactory, settings: object) -> None:
    settings.OMA_TRUSTED_PROXIES = ["127.0.0.1"]  # type: ignore[attr-defined]
    from django.test import RequestFactory

    factory = RequestFactory()
    proxied = factory.get("/", REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR="203.0.113.7, 127.0.0.1")
    assert client_address(proxied) == "203.0.113.7"
    # A client that is not the proxy cannot choose its address with the header.
    direct = factory.get("/", REMOTE_ADDR="198.51.100.2", HTTP_X_FORWARDED_FOR="203.0.113.7")
    assert client_address(direct) == "198.51.100.2"
    # One client behind the proxy failing many times does not block another behind the same proxy.
    users = [make_user("viewer") for _ in range(MAX_FAILURES_PER_ADDRESS // 2 + 1)]
    for user in users:
        for _ in range(2):
            post_login(reverse("login"), user.username, "x", address="127.0.0.1", HTTP_X_FORWARDED_FOR="203.0.113.7")
    other = make_user("viewer")
    page = post_login(
        reverse("login"), other.username, PASSWORD, address="127.0.0.1", HTTP_X_FORWARDED_FOR="203.0.113.8"
    )
    assert page == "ok"
    # Recorded with the client's address: 20 failures, then the address was refused before any check.
    assert LoginEvent.objects.filter(kind="failure", address="203.0.113.7").count() == MAX_FAILURES_PER_ADDRESS
    assert LoginEvent.objects.filter(kind="throttled", address="203.0.113.7").count() == 2


def test_hostile_user_names_are_recorded_as_bounded_printable_text(db: None) -> None:
    post_login(reverse("login"), "evil\x1b[2J\n" + "x" * 400, "wrong")
    event = LoginEvent.objects.get(kind="failure")
    assert event.username.isprintable() and len(event.username) <= 150
