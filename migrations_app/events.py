"""The job event log: one place that writes a JobEvent and tells the job's pages, used by the actions
and by every workflow step (so a step never reaches back into ``actions``)."""

from __future__ import annotations

from typing import Any, TypedDict, Unpack

from django.db import transaction

from live.outbox import announce
from omaportal.scrub import scrub

from .models import JobEvent, MigrationJob
from .topics import JOB


class EventFields(TypedDict, total=False):
    """What an event says besides its kind, each optional."""

    step: str
    message: str
    data: dict[str, Any] | None
    duration_ms: int | None
    actor: str


def job_event(job: MigrationJob, kind: str, **fields: Unpack[EventFields]) -> JobEvent:
    """An event of the job, not written yet (``record_job_events`` writes several at once)."""
    return JobEvent(
        job=job,
        kind=kind,
        step=fields.get("step", ""),
        message=scrub(fields.get("message", "")),
        data=fields.get("data") or {},
        duration_ms=fields.get("duration_ms"),
        actor=fields.get("actor", "system"),
    )


def record_job_events(job: MigrationJob, events: list[JobEvent | None]) -> list[JobEvent]:
    """Write the events (None: nothing) and tell the job's pages once. In the caller's transaction if it
    has one (no savepoint: an event fails with what it records), else in one of its own: one write lock
    on SQLite for all of them."""
    written = [event for event in events if event is not None]
    if not written:
        return []
    with transaction.atomic(savepoint=False):
        announce(JOB, job.pk)
        if len(written) == 1:
            written[0].save()
            return written
        return JobEvent.objects.bulk_create(written)


def record_job_event(job: MigrationJob, kind: str, **fields: Unpack[EventFields]) -> JobEvent:
    return record_job_events(job, [job_event(job, kind, **fields)])[0]
