"""Writing to the live-update outbox (the relay that reads it is in ``relay.py``)."""

from __future__ import annotations

from django.db import connection

from .models import LiveUpdate

NOTIFY_CHANNEL = "oma_live"


def announce(topic: str, job_pk: int | None = None) -> None:
    """Tell the browsers that something under ``topic`` changed. Call it inside the transaction that
    makes the change: the row commits (or rolls back) with it, and on PostgreSQL the NOTIFY that wakes
    the relays is delivered at commit, never before."""
    LiveUpdate.objects.create(topic=topic, job_pk=job_pk)
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, '')", [NOTIFY_CHANNEL])
