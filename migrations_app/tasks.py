"""django-q2 entry points: thin wrappers that load the row and call the workflow."""

from __future__ import annotations

import os
import secrets
import socket

from django_q.tasks import async_task

from live.outbox import prune_live_updates

from .workflow import run_job, stale_jobs


def run_job_task(job_pk: int) -> str:
    runner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    job = run_job(job_pk, runner)
    return job.state if job is not None else "not taken (finished, or run by a live worker)"


def recover_stale_jobs() -> int:
    """Periodic: re-queue every active job whose worker stopped beating; the job resumes at its step.
    Also drops live-update outbox rows old enough to have been relayed."""
    prune_live_updates()
    jobs = stale_jobs()
    for job in jobs:
        async_task("migrations_app.tasks.run_job_task", job.pk, task_name=f"recover-{job.job_id}")
    return len(jobs)
