"""The live websocket: login and origin checks, a snapshot on every connect, and changes written by
another process reaching the browser through the outbox and the relay."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.db import connection, connections
from django.test import Client

from live.relay import MIN_SEND_INTERVAL, relay
from migrations_app.models import JobState, MigrationJob
from omaportal.asgi import application
from tests.support.factories import UserFactory, make_jobs

pytestmark = pytest.mark.django_db(transaction=True)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _close_relay_connections() -> Iterator[None]:
    """The relay renders in asgiref's shared sync thread, whose connection is persistent (CONN_MAX_AGE);
    close it after each test so the test database can be dropped."""
    yield
    asyncio.run(sync_to_async(connections.close_all, thread_sensitive=True)())


def headers_for(user: User | None, origin: str = "http://127.0.0.1") -> list[tuple[bytes, bytes]]:
    headers = [(b"origin", origin.encode()), (b"host", b"127.0.0.1")]
    if user is not None:
        client = Client()
        client.force_login(user)
        headers.append((b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode()))
    return headers


async def connect(path: str, headers: list[tuple[bytes, bytes]]) -> tuple[WebsocketCommunicator, bool, Any]:
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, detail = await communicator.connect(timeout=10)
    return communicator, connected, detail


async def receive_until(communicator: WebsocketCommunicator, needle: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no message containing {needle!r} within {timeout}s")
        message = await communicator.receive_from(timeout=left)
        if needle in message:
            return message


def test_anonymous_sockets_are_closed(db: None) -> None:
    async def run() -> None:
        communicator, connected, code = await connect("/ws/live/?page=dashboard", headers_for(None))
        assert not connected and code == 4403
        await communicator.disconnect()

    asyncio.run(run())


def test_a_user_without_a_role_is_closed(make_user: UserFactory) -> None:
    headers = headers_for(make_user("none"))

    async def run() -> None:
        communicator, connected, code = await connect("/ws/live/?page=dashboard", headers)
        assert not connected and code == 4403
        await communicator.disconnect()

    asyncio.run(run())


def test_an_unknown_page_or_job_is_closed_clearly(make_user: UserFactory) -> None:
    headers = headers_for(make_user("viewer"))

    async def run() -> None:
        for path in ("/ws/live/?page=secrets", "/ws/live/?page=job&key=job-nope", "/ws/live/?page=job"):
            communicator, connected, code = await connect(path, headers)
            assert not connected and code == 4404, path
            await communicator.disconnect()

    asyncio.run(run())


def test_a_foreign_origin_is_refused(make_user: UserFactory) -> None:
    headers = headers_for(make_user("operator"), origin="https://evil.example")

    async def run() -> None:
        communicator, connected, _ = await connect("/ws/live/?page=dashboard", headers)
        assert not connected
        await communicator.disconnect()

    asyncio.run(run())


def test_every_connect_starts_with_a_snapshot_rendered_for_the_role(make_user: UserFactory) -> None:
    job = make_jobs(1, state=JobState.REPLICATING)[0]
    viewer, operator = headers_for(make_user("viewer")), headers_for(make_user("operator"))

    async def run() -> None:
        for headers, sees_cancel in ((viewer, False), (operator, True)):
            communicator, connected, _ = await connect("/ws/live/?page=dashboard", headers)
            assert connected
            snapshot = await communicator.receive_from(timeout=10)
            assert 'id="summary"' in snapshot and f'id="job-card-{job.pk}"' in snapshot
            assert ("Cancel</button>" in snapshot) is sees_cancel
            await communicator.disconnect()
        # A job page's snapshot is that job's detail.
        communicator, connected, _ = await connect(f"/ws/live/?page=job&key={job.job_id}", viewer)
        assert connected
        assert f'id="job-live-{job.pk}"' in await communicator.receive_from(timeout=10)
        await communicator.disconnect()

    asyncio.run(run())


WRITER = """
import sys
from migrations_app.models import JobDisk, MigrationJob
from migrations_app.follower import record_progress
job = MigrationJob.objects.get(pk=int(sys.argv[1]))
disks = {d.source_disk.unit_number: d for d in job.disks.select_related("source_disk")}
reported = [
    {"unit_number": u, "bytes_done": int(sys.argv[2]), "bytes_total": d.bytes_total, "throughput_bps": 7_000_000}
    for u, d in disks.items()
]
record_progress(job, reported)
"""


def test_progress_written_by_another_process_reaches_the_socket(make_user: UserFactory) -> None:
    job = make_jobs(1, state=JobState.REPLICATING, disks=1)[0]
    marker = 123_456_789
    headers = headers_for(make_user("viewer"))

    async def run() -> None:
        communicator, connected, _ = await connect(f"/ws/live/?page=job&key={job.job_id}", headers)
        assert connected
        await communicator.receive_from(timeout=10)  # the snapshot
        env = {**os.environ, "OMA_DB_NAME": str(connection.settings_dict["NAME"])}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(REPO / "manage.py"),
            "shell",
            "-c",
            WRITER.replace("sys.argv[1]", str(job.pk)).replace("sys.argv[2]", str(marker)),
            env=env,
            stderr=subprocess.PIPE,
        )
        _, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        update = await receive_until(communicator, f'data-done="{marker}"')
        assert f'id="job-progress-{job.pk}"' in update and "7.0 MB/s" in update
        assert f'id="job-live-{job.pk}"' not in update, "progress alone re-renders only the moving parts"
        await communicator.disconnect()

    asyncio.run(run())
    assert MigrationJob.objects.get(pk=job.pk).throughput_samples[-1] == 7_000_000


def test_a_burst_of_changes_is_coalesced(make_user: UserFactory) -> None:
    """Many progress writes between two relay ticks become one message per group, not one each."""
    from live.outbox import announce

    job = make_jobs(1, state=JobState.REPLICATING, disks=1)[0]
    headers = headers_for(make_user("viewer"))

    async def run() -> None:
        communicator, connected, _ = await connect("/ws/live/?page=dashboard", headers)
        assert connected
        await communicator.receive_from(timeout=10)
        sent_before = relay.sent

        def burst() -> float:
            started = time.monotonic()
            try:
                for _ in range(200):
                    announce("job", job.pk)
            finally:
                connections.close_all()
            return time.monotonic() - started

        took = await asyncio.to_thread(burst)
        await receive_until(communicator, f'id="job-card-{job.pk}"')
        await asyncio.sleep(0.5)
        # One message per group per MIN_SEND_INTERVAL at most, plus the tail after the burst.
        allowed = took / MIN_SEND_INTERVAL + 3
        assert relay.sent - sent_before <= allowed, f"200 writes in {took:.2f}s became {relay.sent - sent_before}"
        await communicator.disconnect()

    asyncio.run(run())


def session_cookie(user: User) -> tuple[Client, list[tuple[bytes, bytes]]]:
    client = Client()
    client.force_login(user)
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    return client, [(b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1"), (b"cookie", cookie)]


async def closed_with(communicator: WebsocketCommunicator, timeout: float = 5) -> int:
    """Drain messages until the server closes the socket; its close code."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = await communicator.receive_output(timeout=deadline - time.monotonic())
        if message["type"] == "websocket.close":
            return int(message.get("code", 1000))
    raise AssertionError("the socket was not closed")


@pytest.mark.parametrize("change", ["deactivated", "logged_out", "role_removed", "role_changed", "nothing"])
def test_an_open_socket_closes_when_its_user_may_no_longer_watch(
    make_user: UserFactory, settings: Any, change: str
) -> None:
    settings.OMA_LIVE_RECHECK_SECONDS = 0.2
    user = make_user("operator")
    client, headers = session_cookie(user)

    def apply() -> None:
        if change == "deactivated":
            User.objects.filter(pk=user.pk).update(is_active=False)
        elif change == "logged_out":
            client.logout()
        elif change == "role_removed":
            user.groups.clear()
        elif change == "role_changed":
            from django.contrib.auth.models import Group

            user.groups.set([Group.objects.get(name="viewer")])

    async def run() -> None:
        communicator, connected, _ = await connect("/ws/live/?page=dashboard", headers)
        assert connected
        await communicator.receive_from(timeout=10)  # the snapshot
        await sync_to_async(apply, thread_sensitive=True)()
        if change == "nothing":
            assert await communicator.receive_nothing(timeout=1.0)  # five rechecks passed: still open, quiet
        else:
            code = await closed_with(communicator)
            assert code == (4409 if change == "role_changed" else 4403)
        await communicator.disconnect()

    asyncio.run(run())
