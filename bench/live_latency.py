#!/usr/bin/env python3
"""Live-update latency: from a progress write in one process to the fragment in C browsers' sockets.

Starts daphne (the real ASGI app, relay and consumer) on a scratch database, logs C websocket clients
in (session cookie, same origin) on the dashboard, then a separate writer process records E progress
changes of one replicating job through the workflow's own progress writer, one every --interval
seconds. Each write carries a unique byte count; a client has the event when a fragment carrying that
count arrives. Latency = arrival time minus the writer's commit time (same machine, same clock).

Last line: one JSON object with clients, events, delivered (client-events seen, of clients*events),
p50_ms, p95_ms, max_ms, database.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness import REPO, percentile, scratch_postgres
from devtools.devserver import free_port

DONE_RE = re.compile(r'data-done="(\d+)"')
BASE = 10**12  # marker byte counts: BASE + n, so they cannot collide with anything else on the page


def write_events(job_pk: int, events: int, interval: float) -> None:
    """Writer process: E progress writes through the production path; prints (marker, commit time)."""
    import django

    django.setup()
    from migrations_app.follower import record_progress
    from migrations_app.models import MigrationJob
    from migrations_app.vma_client import DiskProgress

    job = MigrationJob.objects.get(pk=job_pk)
    disks = {d.source_disk.unit_number: d for d in job.disks.select_related("source_disk")}
    sent = []
    for n in range(1, events + 1):
        reported: list[DiskProgress] = [
            {
                "unit_number": unit,
                "state": "copying",
                "mode": "full",
                "bytes_done": BASE + n,
                "bytes_total": BASE * 2,
                "throughput_bps": 100_000_000 + n,
                "change_id": "",
            }
            for unit in disks
        ]
        record_progress(job, reported)
        sent.append((BASE + n, time.time()))
        time.sleep(interval)
    print(json.dumps(sent))


def prepare() -> tuple[int, str]:
    """Schema, a viewer with a session, and one replicating job; returns (job pk, session key)."""
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.auth.models import Group, User
    from django.contrib.sessions.backends.db import SessionStore
    from django.core.management import call_command

    from migrations_app.models import JobDisk, JobState, MigrationJob, SourceDisk, SourceVM
    from omaportal.web.roles import VIEWER, setup_roles

    call_command("migrate", verbosity=0)
    setup_roles()
    user = User.objects.create_user("bench-viewer", password=None)
    user.groups.add(Group.objects.get(name=VIEWER))
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = settings.AUTHENTICATION_BACKENDS[0]
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    vm = SourceVM.objects.create(vm_id="4210aaaa-bbbb-4ccc-8ddd-eeeeffff0001", name="bench-vm")
    disk = SourceDisk.objects.create(vm=vm, unit_number=0, key=2000, capacity_bytes=BASE * 2)
    job = MigrationJob.objects.create(vm=vm, state=JobState.REPLICATING, current_step=JobState.REPLICATING)
    JobDisk.objects.create(job=job, source_disk=disk, bytes_total=BASE * 2)
    return job.pk, str(session.session_key)


async def client(
    port: int, session_key: str, seen: dict[int, float], ready: asyncio.Event, stop: asyncio.Event
) -> None:
    import websockets

    headers = {"Cookie": f"sessionid={session_key}", "Origin": f"http://127.0.0.1:{port}"}
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/ws/live/?page=dashboard", additional_headers=headers, max_size=None
    ) as ws:
        await asyncio.wait_for(ws.recv(), 30)  # the snapshot (a refused socket closes instead)
        ready.set()
        while not stop.is_set():
            try:
                message = await asyncio.wait_for(ws.recv(), 0.5)
            except TimeoutError:
                continue
            now = time.time()
            for value in DONE_RE.findall(str(message)):
                marker = int(value)
                if marker > BASE and marker not in seen:
                    seen[marker] = now


async def run_clients(
    port: int, session_key: str, clients: int, writer: list[str], env: dict[str, str]
) -> tuple[list[dict[int, float]], list[tuple[int, float]]]:
    seen: list[dict[int, float]] = [{} for _ in range(clients)]
    readies = [asyncio.Event() for _ in range(clients)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(client(port, session_key, seen[i], readies[i], stop)) for i in range(clients)]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 60)
    proc = await asyncio.create_subprocess_exec(*writer, env=env, cwd=REPO, stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    sent = [tuple(item) for item in json.loads(out.decode().strip().splitlines()[-1])]
    await asyncio.sleep(2)  # the last events' delivery
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    return seen, sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between progress writes")
    parser.add_argument("--postgres", metavar="URL", help="run on a scratch database made on this server")
    parser.add_argument("--writer", nargs=3, metavar=("JOB", "EVENTS", "INTERVAL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer:
        write_events(int(args.writer[0]), int(args.writer[1]), float(args.writer[2]))
        return

    root = Path(tempfile.mkdtemp(prefix="oma-live-"))
    drop = None
    daphne = None
    try:
        # Never the caller's DATABASE_URL (CI sets one): SQLite under the scratch folder, or a scratch
        # PostgreSQL database made for this run and dropped after it.
        os.environ.pop("DATABASE_URL", None)
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "omaportal.settings",
            "OMA_VAR_DIR": str(root),
            "OMA_LOG_LEVEL": "WARNING",
        }
        if args.postgres:
            database_url, drop = scratch_postgres(args.postgres)
            env["DATABASE_URL"] = database_url
        os.environ.update(env)
        job_pk, session_key = prepare()
        from django.db import connections

        connections.close_all()
        port = free_port()
        daphne = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "omaportal.asgi:application"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            # In this process's group: whoever kills the benchmark's group (a test timing out) kills it too.
            stderr=(root / "daphne.log").open("wb"),
        )
        import httpx

        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise SystemExit("daphne did not start") from None
                time.sleep(0.2)
        writer = [
            sys.executable,
            "-m",
            "bench.live_latency",
            "--writer",
            str(job_pk),
            str(args.events),
            str(args.interval),
        ]
        seen, sent = asyncio.run(run_clients(port, session_key, args.clients, writer, env))
        latencies = [(got[marker] - at) * 1000 for got in seen for marker, at in sent if marker in got]
        result: dict[str, Any] = {
            "database": "postgresql" if args.postgres else "sqlite",
            "clients": args.clients,
            "events": len(sent),
            "interval_s": args.interval,
            "delivered": len(latencies),
            "expected": args.clients * len(sent),
            "p50_ms": percentile(latencies, 50),
            "p95_ms": percentile(latencies, 95),
            "max_ms": round(max(latencies), 1) if latencies else None,
        }
        print(json.dumps(result, sort_keys=True))
    finally:
        if daphne is not None:
            daphne.terminate()
            try:
                daphne.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daphne.kill()
        if drop is not None:
            drop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
