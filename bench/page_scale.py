#!/usr/bin/env python3
"""Page cost as the tables grow: server time and query count of every operator page, first with 10
rows, then (in the same run, same process) with --jobs jobs and --mappings export mappings.

Each page is requested --repeat times through Django's full request path (middleware, auth, view,
template) as a logged-in operator. Last line: one JSON object with, per page, p50_ms, p95_ms, queries,
and queries_at_10 (the count with 10 rows; equal means the page does not grow with the data). The
progress follower reads the same tables ten times a second while work flows: ``follower_tick`` is one
of its ticks (recovery included) measured the same way, with ``tick_ratio`` its p50 with the full
history over its p50 with 10 rows (1.0: a tick does not grow with the history). Every job belongs to
the node, as a node's finished jobs do. On SQLite the tick is measured before the pages' ANALYZE, as an
OMA's SQLite runs (nothing runs ANALYZE there; without the stat4 histograms Debian's SQLite lacks, its
planner would then read the whole history for a node's few active jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.harness import percentile, scratch_postgres

BATCH = 2000


def populate(jobs: int, mappings: int, start: int) -> None:
    """VMs with two disks (one mapping per disk), one job per VM with its disks and three events;
    a few jobs stay active so the dashboard has cards to draw."""
    from django.utils import timezone

    from exports.models import VMExportMapping, export_name_for
    from migrations_app.models import JobDisk, JobEvent, JobState, MigrationJob, SourceDisk, SourceVM
    from migrations_app.slots import this_node

    node = this_node()

    vms_needed = max(jobs, (mappings + 1) // 2)
    now = timezone.now()
    states = [JobState.COMPLETED] * 7 + [JobState.FAILED, JobState.CANCELLED]
    for offset in range(0, vms_needed, BATCH):
        count = min(BATCH, vms_needed - offset)
        vms = SourceVM.objects.bulk_create(
            [
                SourceVM(vm_id=str(uuid.uuid4()), name=f"vm-{start + offset + n:06d}", power_state="poweredOn")
                for n in range(count)
            ]
        )
        vms = list(SourceVM.objects.filter(name__in=[vm.name for vm in vms]))
        disks = SourceDisk.objects.bulk_create(
            [SourceDisk(vm=vm, unit_number=u, key=2000 + u, capacity_bytes=(u + 1) << 34) for vm in vms for u in (0, 1)]
        )
        disks = list(SourceDisk.objects.filter(vm__in=vms).select_related("vm"))
        mapping_rows = [
            VMExportMapping(
                vm_id=d.vm.vm_id,
                vm_name=d.vm.name,
                disk_unit_number=d.unit_number,
                export_name=export_name_for(d.vm.vm_id, d.unit_number),
                device_path=f"/dev/disk/by-id/virtio-{uuid.uuid4().hex[:20]}",
                status=VMExportMapping.Status.ACTIVE,
                last_used_at=now,
            )
            for d in disks
        ][: max(0, mappings - 2 * offset)]
        VMExportMapping.objects.bulk_create(mapping_rows)
        job_vms = vms[: max(0, jobs - offset)]
        job_rows = MigrationJob.objects.bulk_create(
            [
                MigrationJob(
                    job_id=f"job-bench-{start + offset + n:07d}",
                    vm=vm,
                    node=node,
                    state=(JobState.REPLICATING if n < 3 and offset == 0 else states[n % len(states)]),
                    current_step=JobState.REPLICATING,
                    requested_by="bench",
                    finished_at=now - timedelta(minutes=n),
                    throughput_samples=[1e8, 1.2e8, 9e7],
                )
                for n, vm in enumerate(job_vms)
            ]
        )
        job_rows = list(MigrationJob.objects.filter(vm__in=job_vms))
        by_vm: dict[int, list[Any]] = {}
        for d in disks:
            by_vm.setdefault(d.vm_id, []).append(d)
        JobDisk.objects.bulk_create(
            [
                JobDisk(job=j, source_disk=d, bytes_total=d.capacity_bytes, bytes_done=d.capacity_bytes // 2)
                for j in job_rows
                for d in by_vm.get(j.vm_id, [])
            ]
        )
        JobEvent.objects.bulk_create(
            [
                JobEvent(job=j, kind=k, step=s)
                for j in job_rows
                for k, s in (("job.created", ""), ("step.started", "provisioning"), ("job.completed", ""))
            ]
        )


def measure(client: Any, pages: dict[str, str], repeat: int) -> dict[str, dict[str, float]]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    out = {}
    for name, url in pages.items():
        times = []
        queries = 0
        for _ in range(repeat):
            with CaptureQueriesContext(connection) as ctx:
                started = time.perf_counter()
                response = client.get(url)
                times.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                raise SystemExit(f"{url}: HTTP {response.status_code}")
            queries = len(ctx.captured_queries)
        out[name] = {"p50_ms": percentile(times, 50), "p95_ms": percentile(times, 95), "queries": queries}
    return out


def measure_tick(repeat: int) -> dict[str, float]:
    """The follower's tick, ``repeat`` times: its time and its query count (no copy runs, so the VMA is
    not asked; the recovery scans are included, as once a poll interval)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from migrations_app.follower import Follower

    follower = Follower(enqueue=lambda task, pk: None, detach=lambda pk: None, verify=lambda pk: None)
    times = []
    queries = 0
    try:
        follower.tick()  # the node's first tick registers it
        for _ in range(repeat):
            follower.checked_at = -1e9
            with CaptureQueriesContext(connection) as ctx:
                started = time.perf_counter()
                follower.tick()
                times.append((time.perf_counter() - started) * 1000)
            queries = len(ctx.captured_queries)
    finally:
        follower.close()
    return {"p50_ms": percentile(times, 50), "p95_ms": percentile(times, 95), "queries": queries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--mappings", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--postgres", metavar="URL", help="run on a scratch database made on this server")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="oma-pages-"))
    drop = None
    try:
        os.environ.update(
            {"DJANGO_SETTINGS_MODULE": "omaportal.settings", "OMA_VAR_DIR": str(root), "OMA_LOG_LEVEL": "WARNING"}
        )
        os.environ.pop("DATABASE_URL", None)
        if args.postgres:
            database_url, drop = scratch_postgres(args.postgres)
            os.environ["DATABASE_URL"] = database_url
        import django

        django.setup()
        from django.conf import settings
        from django.contrib.auth.models import Group, User
        from django.core.management import call_command
        from django.db import connection
        from django.test import Client
        from django.test.utils import setup_test_environment

        from exports.models import NbdServerState, VMExportMapping
        from omaportal.web.roles import OPERATOR, setup_roles

        setup_test_environment()
        settings.ALLOWED_HOSTS = ["*"]
        call_command("migrate", verbosity=0)
        setup_roles()
        user = User.objects.create_user("bench-operator", password=None)
        user.groups.add(Group.objects.get(name=OPERATOR))
        NbdServerState.objects.create(backend="nbdkit", version="1.32.5", health="ok")
        client = Client()
        client.force_login(user)

        populate(10, 10, 0)
        from migrations_app.models import MigrationJob

        first = MigrationJob.objects.order_by("pk").first()
        if first is None:
            raise SystemExit("no job was made")
        pages = {
            "dashboard": "/",
            "inventory": "/vms/",
            "jobs": "/jobs/",
            "jobs_failed": "/jobs/?state=failed",
            "jobs_last_page": "/jobs/?page=last",
            "job_detail": f"/jobs/{first.job_id}/",
            "mappings": "/exports/",
            "mappings_search": "/exports/?q=vm-0000",
            "nbd": "/nbd/",
        }
        small = measure(client, pages, 5)
        small_tick = measure_tick(max(5, args.repeat))
        started = time.perf_counter()
        populate(args.jobs - 10, args.mappings - 10, 10)
        fill_s = time.perf_counter() - started
        large_tick = measure_tick(max(5, args.repeat))
        if connection.vendor == "sqlite":
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE")
        large = measure(client, pages, args.repeat)
        result: dict[str, Any] = {
            "database": connection.vendor,
            "jobs": MigrationJob.objects.count(),
            "mappings": VMExportMapping.objects.count(),
            "fill_s": round(fill_s, 1),
            "pages": {
                name: {**large[name], "queries_at_10": small[name]["queries"], "p95_ms_at_10": small[name]["p95_ms"]}
                for name in pages
            },
            "max_p95_ms": max(v["p95_ms"] for v in large.values()),
            "constant_queries": all(large[n]["queries"] == small[n]["queries"] for n in pages)
            and large_tick["queries"] == small_tick["queries"],
            "follower_tick": {
                **large_tick,
                "queries_at_10": small_tick["queries"],
                "p50_ms_at_10": small_tick["p50_ms"],
            },
            "tick_ratio": round(large_tick["p50_ms"] / max(small_tick["p50_ms"], 1e-6), 2),
        }
        print(json.dumps(result, sort_keys=True))
    finally:
        if drop is not None:
            drop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
