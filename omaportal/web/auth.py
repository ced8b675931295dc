"""Login with throttling: after too many failed attempts for one username from one address (or from
one address in all), further attempts are refused without checking the password until the window ends."""

from __future__ import annotations

import hashlib
from typing import Any

from django import forms
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.views import LoginView
from django.core.cache import cache
from django.http import HttpRequest

MAX_FAILURES_PER_USER = 5
MAX_FAILURES_PER_ADDRESS = 20
WINDOW_SECONDS = 15 * 60


def _address(request: HttpRequest | None) -> str:
    return str(request.META.get("REMOTE_ADDR", "?")) if request is not None else "?"


def _keys(request: HttpRequest | None, username: str) -> tuple[str, str]:
    user_digest = hashlib.sha256(username.strip().lower().encode()).hexdigest()[:32]
    address = _address(request)
    return f"login-fail:{address}:{user_digest}", f"login-fail:{address}"


class ThrottledAuthenticationForm(AuthenticationForm):
    error_messages = {
        **AuthenticationForm.error_messages,
        "throttled": "Too many failed logins. Wait %(minutes)d minutes and try again.",
    }

    def clean(self) -> dict[str, Any]:
        username = self.cleaned_data.get("username") or ""
        per_user, per_address = _keys(self.request, username)
        if (cache.get(per_user, 0) >= MAX_FAILURES_PER_USER) or (cache.get(per_address, 0) >= MAX_FAILURES_PER_ADDRESS):
            raise forms.ValidationError(
                self.error_messages["throttled"], code="throttled", params={"minutes": WINDOW_SECONDS // 60}
            )
        try:
            return super().clean()
        except forms.ValidationError:
            for key in (per_user, per_address):
                cache.add(key, 0, WINDOW_SECONDS)
                cache.incr(key)
            raise


class OmaLoginView(LoginView):
    template_name = "login.html"
    authentication_form = ThrottledAuthenticationForm
    redirect_authenticated_user = True
