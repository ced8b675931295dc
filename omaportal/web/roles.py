"""The three roles: viewer (sees everything, changes nothing), operator (also starts, cancels and
retries migrations), admin (also Django admin). Each is a Group with permissions; ``setup_roles``
creates or repairs them, and is safe to run again."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import Group, Permission
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Q
from django.http import HttpRequest, HttpResponse

VIEWER, OPERATOR, ADMIN = "viewer", "operator", "admin"
OPERATE = "migrations_app.operate_migrations"
VIEW = "migrations_app.view_migrationjob"
VIEWED_MODELS = {
    "migrations_app": ["sourcevm", "sourcedisk", "migrationjob", "jobdisk", "jobevent"],
    "exports": ["vmexportmapping", "nbdserverstate", "exportevent"],
}


def _view_permissions() -> Q:
    query = Q(pk__in=[])
    for app, models in VIEWED_MODELS.items():
        query |= Q(content_type__app_label=app, codename__in=[f"view_{m}" for m in models])
    return query


@transaction.atomic
def setup_roles() -> dict[str, int]:
    """Create the groups and give each its permissions; returns how many each holds."""
    view = list(Permission.objects.filter(_view_permissions()))
    operate = list(Permission.objects.filter(content_type__app_label="migrations_app", codename="operate_migrations"))
    everything = list(Permission.objects.filter(content_type__app_label__in=["migrations_app", "exports", "auth"]))
    counts = {}
    for name, permissions in ((VIEWER, view), (OPERATOR, view + operate), (ADMIN, everything)):
        group, _ = Group.objects.get_or_create(name=name)
        group.permissions.set(permissions)
        counts[name] = len(permissions)
    return counts


def can_view(user: Any) -> bool:
    return bool(user.is_authenticated and user.has_perm(VIEW))


def can_operate(user: Any) -> bool:
    return bool(user.is_authenticated and user.has_perm(OPERATE))


def live_role(user: Any) -> str | None:
    """The role a user watches a live page in (fragments differ only in the operator's buttons), or
    None: no role, no socket."""
    if not can_view(user):
        return None
    return OPERATOR if can_operate(user) else VIEWER


type View = Callable[..., HttpResponse]


def requires(allowed: Callable[[Any], bool], refusal: str) -> Callable[[View], View]:
    """Login first (a redirect to the login page), then ``allowed(user)`` or 403 with ``refusal``."""

    def decorator(view: View) -> View:
        @wraps(view)
        @login_required
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if not allowed(request.user):
                raise PermissionDenied(refusal)
            return view(request, *args, **kwargs)

        return wrapped

    return decorator


# Every page and fragment: a viewer (or more).
viewer_required = requires(can_view, "your account has no role yet; ask an admin")
# Start, cancel, retry, refresh: an operator, whatever the form says (buttons are not the guard).
operator_required = requires(can_operate, "only operators can start, cancel or retry migrations")
