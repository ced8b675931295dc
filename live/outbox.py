"""Writing to the live-update outbox, and pruning it (the relay that reads it is in ``relay.py``)."""

from __future__ import annotations

from datetime import timedelta

from django.db import connection
from django.utils import timezone

from .models import LiveUpdate

NOTIFY_CHANNEL = "oma_live"
KEEP_UPDATES = timedelta(minutes=10)


def announce(topic: str, key: int | None = None) -> None:
    """Tell the browsers that something under ``topic`` changed (``key``: which object, if one). Call it
    inside the transaction that makes the change: the row commits (or rolls back) with it, and on
    PostgreSQL the NOTIFY that wakes the relays is delivered at commit, never before."""
    LiveUpdate.objects.create(topic=topic, key=key)
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, '')", [NOTIFY_CHANNEL])


def prune_live_updates() -> int:
    """Outbox rows older than ten minutes have been relayed; periodic cleanup drops them."""
    deleted, _ = LiveUpdate.objects.filter(created_at__lt=timezone.now() - KEEP_UPDATES).delete()
    return deleted
