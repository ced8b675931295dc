"""What the NBD server page shows, for the view and for the live page in ``live.py``. Reads only."""

from __future__ import annotations

from typing import Any

from django.db.models import Count, Q

from .conf import nbd_conf
from .models import ExportEvent, NbdServerState, VMExportMapping


def nbd_context() -> dict[str, Any]:
    """This node's NBD server and exports (the nodes page shows every node's health)."""
    node = nbd_conf().node
    return {
        "nbd": NbdServerState.objects.filter(node=node).first(),
        "status_counts": dict(
            VMExportMapping.objects.filter(node=node)
            .values_list("status")
            .annotate(n=Count("pk"))
            .values_list("status", "n")
        ),
        # Reloads, restarts, crashes, repairs and lost exports: the server's own history.
        "server_events": ExportEvent.objects.filter(Q(kind__startswith="server.") | Q(kind="exports.lost")).order_by(
            "-id"
        )[:30],
        "export_events": ExportEvent.objects.exclude(kind__startswith="server.").order_by("-id")[:30],
    }
