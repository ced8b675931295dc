"""The live-update outbox: a row per change the browsers should see, written in the same transaction
as the change itself (DESIGN.md, "Live updates"). The database is the truth; a relay in each web
process tails these rows and tells its websockets. No Redis is needed across processes."""

from __future__ import annotations

from django.db import models


class LiveUpdate(models.Model):
    class Topic(models.TextChoices):
        JOB = "job", "Migration job (state, steps, events)"
        PROGRESS = "progress", "Copy progress of a job"
        NBD = "nbd", "NBD server and exports"
        INVENTORY = "inventory", "VM inventory"

    id = models.BigAutoField(primary_key=True)
    topic = models.CharField(max_length=16, choices=Topic.choices)
    job_pk = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.topic} {self.job_pk or ''}".strip()
