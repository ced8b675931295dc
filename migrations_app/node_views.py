"""The nodes page: every OMA node's slots, copies, NBD server and heartbeat, and (for admins) draining."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from omaportal.web.roles import requires, viewer_required

from .models import NodeEvent
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


@require_POST
@admin_required
def node_drain(request: HttpRequest, name: str) -> HttpResponse:
    try:
        node, changed = drain(name, actor=request.user.get_username(), reason=request.POST.get("reason", ""))
    except NodeError as exc:
        messages.error(request, str(exc))
    else:
        if changed:
            messages.success(request, f"{node.name} drained: its running copies finish, nothing new starts on it.")
        else:
            messages.info(request, f"{node.name} was drained already; nothing changed.")
    return redirect("node-list")


@require_POST
@admin_required
def node_undrain(request: HttpRequest, name: str) -> HttpResponse:
    try:
        node, changed = undrain(name, actor=request.user.get_username())
    except NodeError as exc:
        messages.error(request, str(exc))
    else:
        if changed:
            messages.success(request, f"{node.name} undrained: it takes new work again.")
        else:
            messages.info(request, f"{node.name} was not drained; nothing changed.")
    return redirect("node-list")
