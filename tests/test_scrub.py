"""Secrets never reach a stored or shown error: query strings, credential values and bearer tokens."""

from __future__ import annotations

import pytest

from migrations_app.events import record_job_event
from migrations_app.models import JobState
from omaportal.scrub import scrub
from tests.support.factories import make_jobs

KEY = "AKIAVERYSECRETAPIKEY1234"
SIGNATURE = "Zm9vYmFyc2lnbmF0dXJlCg%3D%3D"
CS_ERROR = (
    "ConnectionError: HTTPConnectionPool(host='cs.example', port=8080): Max retries exceeded with url: "
    f"/client/api?apiKey={KEY}&command=createVolume&response=json&signature={SIGNATURE} (Caused by ...)"
)


@pytest.mark.parametrize(
    ("text", "gone"),
    [
        (CS_ERROR, [KEY, SIGNATURE]),
        (f"GET https://cs.example/client/api?command=listVolumes&apikey={KEY} failed", [KEY, "listVolumes"]),
        (f"apiKey={KEY}, secretkey=s3cr3t-value", [KEY, "s3cr3t-value"]),
        ('{"token": "vma-token-123", "password": "hunter2"}', ["vma-token-123", "hunter2"]),
        ("401 for Authorization: Bearer abc.def.ghi", ["abc.def.ghi"]),
        ("nbdcopy nbds://vma@h:1/x?tls-psk-file=/etc/oma/vma.psk failed", ["/etc/oma/vma.psk"]),
    ],
)
def test_credentials_and_query_strings_are_redacted(text: str, gone: list[str]) -> None:
    clean = scrub(text)
    assert "[redacted]" in clean
    for secret in gone:
        assert secret not in clean


def test_plain_errors_are_left_as_they_are() -> None:
    text = "disk 1: No space left on device [ENOSPC] (/dev/vdb); the volume holds 1024 bytes"
    assert scrub(text) == text


@pytest.mark.django_db
def test_a_job_error_and_its_events_are_stored_scrubbed() -> None:
    job = make_jobs(1, state=JobState.REPLICATING)[0]
    job.transition_to(JobState.FAILED, error=CS_ERROR)
    job.save()
    event = record_job_event(job, "job.failed", message=CS_ERROR)
    job.refresh_from_db()
    event.refresh_from_db()
    for stored in (job.error, event.message):
        assert KEY not in stored and SIGNATURE not in stored and "Max retries exceeded" in stored
