"""The nodes page: every OMA node's slots, copies, NBD server and heartbeat, and (for admins) draining."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from omaportal.web.roles import requires, viewer_required

from .models import NodeEvent, OmaNode
from .nodes import NodeError, drain, node_rows, undrain

MANAGE_NODES = "migrations_app.change_omanode"


def can_manage_nodes(user: Any) -> bool:
    return bool(user.is_authenticated and user.has_perm(MANAGE_NODES))


admin_required = requires(can_manage_nodes, "only admins can drain or undrain a node")


@require_GET
@viewer_required
def node_list(request: HttpRequest) -> HttpResponse:
    context = {
        "rows": node_rows(),
        "events": NodeEvent.objects.select_related("node")[:20],
        "can_manage": can_manage_nodes(request.user),
    }
    return render(request, "migrations_app/node_list.html", context)


type NodeChange = Callable[[], tuple[OmaNode, bool]]


def _change(request: HttpRequest, change: NodeChange, done: str, unchanged: str) -> HttpResponse:
    """Run a drain or undrain and say what it did (or why it was refused); back to the nodes page."""
    try:
        node, changed = change()
    except NodeError as exc:
        messages.error(request, str(exc))
    else:
        if changed:
            messages.success(request, f"{node.name} {done}")
        else:
            messages.info(request, f"{node.name} {unchanged}; nothing changed.")
    return redirect("node-list")


@require_POST
@admin_required
def node_drain(request: HttpRequest, name: str) -> HttpResponse:
    actor, reason = request.user.get_username(), request.POST.get("reason", "")
    return _change(
        request,
        lambda: drain(name, actor=actor, reason=reason),
        "drained: its running copies finish, nothing new starts on it.",
        "was drained already",
    )


@require_POST
@admin_required
def node_undrain(request: HttpRequest, name: str) -> HttpResponse:
    actor = request.user.get_username()
    return _change(
        request, lambda: undrain(name, actor=actor), "undrained: it takes new work again.", "was not drained"
    )
