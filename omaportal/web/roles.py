"""The three roles: viewer (sees everything, changes nothing), operator (also starts, cancels and
retries migrations), admin (also Django admin). Each is a Group with permissions; ``setup_roles``
creates or repairs them, and is safe to run again."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, Concatenate

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


def viewer_required[**P](view: Callable[Concatenate[HttpRequest, P], HttpResponse]) -> Callable[..., HttpResponse]:
    """Login (redirect to the login page), then the viewer permission (403 without it)."""

    @wraps(view)
    @login_required
    def wrapped(request: HttpRequest, *args: P.args, **kwargs: P.kwargs) -> HttpResponse:
        if not can_view(request.user):
            raise PermissionDenied("your account has no role yet; ask an admin")
        return view(request, *args, **kwargs)

    return wrapped


def operator_required[**P](view: Callable[Concatenate[HttpRequest, P], HttpResponse]) -> Callable[..., HttpResponse]:
    """Login, then the operator permission: 403 for viewers, whatever the form says."""

    @wraps(view)
    @login_required
    def wrapped(request: HttpRequest, *args: P.args, **kwargs: P.kwargs) -> HttpResponse:
        if not can_operate(request.user):
            raise PermissionDenied("only operators can start, cancel or retry migrations")
        return view(request, *args, **kwargs)

    return wrapped
