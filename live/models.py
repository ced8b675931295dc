"""The live-update outbox: a row per change the browsers should see, written in the same transaction
as the change itself (docs/live-updates.md). The database is the truth; a relay in each web process
tails these rows and tells its websockets. No Redis is needed across processes."""

from __future__ import annotations

from django.db import models


class LiveUpdate(models.Model):
    id = models.BigAutoField(primary_key=True)
    # The apps name their topics ("job", "progress", "nbd", ...); the pages they register say which
    # topics concern them. The transport only carries them.
    topic = models.CharField(max_length=32)
    # What changed under the topic (a job's pk), or null: the topic as a whole.
    key = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.topic} {self.key or ''}".strip()
