"""django-q2 entry points: thin wrappers that call the workflow. Each is short: no task waits for a copy
(the node's progress follower does), so the cluster's task timeout never cuts one."""

from __future__ import annotations

import os
import secrets
import socket

from .follower import detach_volume
from .workflow import prepare_volumes, run_job


def run_job_task(job_pk: int) -> str:
    runner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    job = run_job(job_pk, runner)
    return job.state if job is not None else "not taken (not due, or run by a live worker)"


def detach_volume_task(volume_pk: int) -> str:
    return detach_volume(volume_pk)


def prepare_volumes_task(job_pk: int) -> str:
    runner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}:prepare"
    return prepare_volumes(job_pk, runner)
