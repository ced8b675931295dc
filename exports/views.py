"""A read-only overview of the NBD server and the export mappings (the live dashboard comes later)."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from .models import ExportEvent, NbdServerState, VMExportMapping


@require_GET
@login_required
def overview(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "exports/overview.html",
        {
            "servers": NbdServerState.objects.all(),
            "mappings": VMExportMapping.objects.order_by("-updated_at")[:50],
            "mapping_count": VMExportMapping.objects.count(),
            "events": ExportEvent.objects.all()[:20],
        },
    )


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    state = NbdServerState.objects.first()
    return JsonResponse({"ok": True, "database": connection.vendor, "nbd": state.health if state else "unknown"})
