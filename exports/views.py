"""Export mappings and the NBD server page, plus the unauthenticated health check."""

from __future__ import annotations

from django.db import connection
from django.db.models import Q
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from omaportal.web.rendering import PER_PAGE_CHOICES, ListView, render_page_or_partial
from omaportal.web.roles import viewer_required

from .models import NbdServerState, VMExportMapping
from .pages import nbd_context

MAPPINGS_PER_PAGE = 50


MAPPING_SORTS = {"vm": "vm_name", "export": "export_name", "status": "status", "used": "last_used_at"}


@require_GET
@viewer_required
def mapping_list(request: HttpRequest) -> HttpResponse:
    mappings = VMExportMapping.objects.all()
    query = request.GET.get("q", "").strip()
    if query:
        mappings = mappings.filter(
            Q(vm_name__icontains=query) | Q(vm_id__startswith=query.lower()) | Q(export_name__icontains=query)
        )
    status = request.GET.get("status", "")
    if status in VMExportMapping.Status.values:
        mappings = mappings.filter(status=status)
    else:
        status = ""
    view = ListView.of(request, MAPPING_SORTS, "vm", MAPPINGS_PER_PAGE)
    page = view.paginate(request, mappings, MAPPING_SORTS)
    context = {
        "page": page,
        "q": query,
        "status": status,
        "statuses": VMExportMapping.Status.choices,
        "sort": view.sort,
        "per_page": view.per_page,
        "per_page_choices": PER_PAGE_CHOICES,
    }
    return render_page_or_partial(request, "exports/mapping_list.html", "mapping-table", context)


@require_GET
@viewer_required
def nbd_server(request: HttpRequest) -> HttpResponse:
    return render(request, "exports/nbd_server.html", nbd_context())


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    state = NbdServerState.objects.first()
    return JsonResponse({"ok": True, "database": connection.vendor, "nbd": state.health if state else "unknown"})
