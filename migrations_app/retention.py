"""History is kept for OMA_RETENTION_DAYS, then pruned: job events of finished jobs, export events, login
records, node events and django-q2's finished task rows. Jobs themselves, mappings and volumes are never pruned, and
an active job keeps all its events."""

from __future__ import annotations

import time
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django_q.models import Task

from exports.models import ExportEvent
from omaportal.web.models import LoginEvent

from .models import FINAL_STATES, JobEvent, NodeEvent

PRUNE_EVERY_SECONDS = 3600.0


def prune(days: int | None = None, dry_run: bool = False) -> dict[str, int]:
    """Delete (or, dry, count) what is older than ``days``; returns the count per kind."""
    days = int(settings.OMA_RETENTION_DAYS if days is None else days)
    cutoff = timezone.now() - timedelta(days=days)
    querysets = {
        "job_events": JobEvent.objects.filter(created_at__lt=cutoff, job__state__in=FINAL_STATES),
        "export_events": ExportEvent.objects.filter(created_at__lt=cutoff),
        "node_events": NodeEvent.objects.filter(created_at__lt=cutoff),
        "login_events": LoginEvent.objects.filter(created_at__lt=cutoff),
        "tasks": Task.objects.filter(stopped__lt=cutoff),
    }
    if dry_run:
        return {kind: qs.count() for kind, qs in querysets.items()}
    counts = {}
    for kind, qs in querysets.items():
        with transaction.atomic():
            counts[kind] = qs.delete()[0]
    return counts


class Pruner:
    """Prunes at most once per PRUNE_EVERY_SECONDS, for the follower's loop."""

    def __init__(self) -> None:
        self.last = 0.0

    def maybe(self) -> dict[str, int] | None:
        if time.monotonic() - self.last < PRUNE_EVERY_SECONDS:
            return None
        self.last = time.monotonic()
        return prune()
