"""The job event log: one place that writes a JobEvent and tells the job's pages, used by the actions
and by every workflow step (so a step never reaches back into ``actions``)."""

from __future__ import annotations

from typing import Any

from django.db import transaction

from live.outbox import announce
from omaportal.scrub import scrub

from .models import JobEvent, MigrationJob
from .topics import JOB


def record_job_event(
    job: MigrationJob,
    kind: str,
    *,
    step: str = "",
    message: str = "",
    data: dict[str, Any] | None = None,
    duration_ms: int | None = None,
    actor: str = "system",
) -> JobEvent:
    # One transaction for the event and its live update: one write lock on SQLite, not two.
    with transaction.atomic():
        announce(JOB, job.pk)
        return JobEvent.objects.create(
            job=job,
            kind=kind,
            step=step,
            message=scrub(message),
            data=data or {},
            duration_ms=duration_ms,
            actor=actor,
        )
