"""Logins, throttled the same way on the portal's page and on /admin/login/, and recorded.

Per account: after ``MAX_FAILURES_PER_USER`` failures the account waits, a minute at first and twice as
long after each further failure (at most an hour), whatever address the attempts come from; the right
password is not even checked while it waits. Per client address: ``MAX_FAILURES_PER_ADDRESS`` failures
in ``WINDOW_SECONDS`` refuse that address for every account. The client address is the peer's, or,
when the peer is one of ``OMA_TRUSTED_PROXIES``, the nearest untrusted hop of ``X-Forwarded-For`` (one
client behind the proxy cannot lock out all the others). The counters live in the shared cache (the
database cache by default), so every web process and node sees the same ones."""

from __future__ import annotations

import hashlib
import ipaddress
import time
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
from django.contrib.auth.views import LoginView
from django.core.cache import cache
from django.dispatch import receiver
from django.http import HttpRequest

from .models import LoginEvent

MAX_FAILURES_PER_USER = 5
MAX_FAILURES_PER_ADDRESS = 20
WINDOW_SECONDS = 15 * 60
FIRST_WAIT_SECONDS = 60
MAX_WAIT_SECONDS = 60 * 60
REMEMBER_SECONDS = 24 * 60 * 60  # an account's failures are forgotten a day after the last one


def _trusted(address: str) -> bool:
    proxies: list[str] = list(getattr(settings, "OMA_TRUSTED_PROXIES", []))
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(proxy, strict=False) for proxy in proxies)


def client_address(request: HttpRequest | None) -> str:
    """The client's address: the peer, unless the peer is a trusted proxy (then the nearest hop of
    X-Forwarded-For that is not one). Never more than 64 characters."""
    if request is None:
        return "?"
    address = str(request.META.get("REMOTE_ADDR") or "?")
    if _trusted(address):
        hops = [hop.strip() for hop in str(request.META.get("HTTP_X_FORWARDED_FOR", "")).split(",") if hop.strip()]
        for hop in reversed(hops):
            address = hop
            if not _trusted(hop):
                break
    return address[:64]


def _account_key(username: str) -> str:
    return "login:account:" + hashlib.sha256(username.strip().lower().encode()).hexdigest()[:32]


def _address_key(address: str) -> str:
    return "login:address:" + hashlib.sha256(address.encode()).hexdigest()[:32]


def account_wait(username: str, now: float | None = None) -> float:
    """Seconds this account must still wait before a password is checked again (0: it may try)."""
    record = cache.get(_account_key(username))
    if not record or record["failures"] < MAX_FAILURES_PER_USER:
        return 0.0
    wait = min(MAX_WAIT_SECONDS, FIRST_WAIT_SECONDS * 2 ** (record["failures"] - MAX_FAILURES_PER_USER))
    return max(0.0, record["last"] + wait - (time.time() if now is None else now))


def address_blocked(address: str) -> bool:
    return int(cache.get(_address_key(address), 0)) >= MAX_FAILURES_PER_ADDRESS


def record_failure(username: str, address: str) -> None:
    key = _account_key(username)
    record = cache.get(key) or {"failures": 0, "last": 0.0}
    cache.set(key, {"failures": record["failures"] + 1, "last": time.time()}, REMEMBER_SECONDS)
    cache.add(_address_key(address), 0, WINDOW_SECONDS)
    try:
        cache.incr(_address_key(address))
    except ValueError:  # expired between add and incr
        cache.set(_address_key(address), 1, WINDOW_SECONDS)


def clear_failures(username: str) -> None:
    cache.delete(_account_key(username))


class ThrottleMixin:
    """Refuses before the password is checked while the account waits or the address is blocked."""

    request: HttpRequest | None
    cleaned_data: dict[str, Any]
    throttle_message = "Too many failed logins. Wait %(minutes)d minute(s) and try again."

    def clean(self) -> dict[str, Any]:
        username = self.cleaned_data.get("username") or ""
        address = client_address(self.request)
        wait = account_wait(username)
        if wait > 0 or address_blocked(address):
            minutes = max(1, round((wait or WINDOW_SECONDS) / 60))
            LoginEvent.record(LoginEvent.Kind.THROTTLED, username, address)
            raise forms.ValidationError(self.throttle_message, code="throttled", params={"minutes": minutes})
        try:
            return super().clean()  # type: ignore[misc]
        except forms.ValidationError:
            record_failure(username, address)
            raise


class ThrottledAuthenticationForm(ThrottleMixin, AuthenticationForm):
    pass


class ThrottledAdminAuthenticationForm(ThrottleMixin, AdminAuthenticationForm):
    pass


class OmaLoginView(LoginView):
    template_name = "login.html"
    authentication_form = ThrottledAuthenticationForm
    redirect_authenticated_user = True


@receiver(user_logged_in)
def _logged_in(sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any) -> None:
    clear_failures(user.get_username())
    LoginEvent.record(LoginEvent.Kind.LOGIN, user.get_username(), client_address(request))


@receiver(user_logged_out)
def _logged_out(sender: Any, request: HttpRequest | None, user: Any, **kwargs: Any) -> None:
    if user is not None:
        LoginEvent.record(LoginEvent.Kind.LOGOUT, user.get_username(), client_address(request))


@receiver(user_login_failed)
def _login_failed(sender: Any, credentials: dict[str, Any], request: HttpRequest | None = None, **kwargs: Any) -> None:
    LoginEvent.record(LoginEvent.Kind.FAILURE, str(credentials.get("username", "")), client_address(request))
