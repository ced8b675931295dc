"""Live failover of N VMs through the cloudstack backend against the fake CloudStack (signed requests,
async jobs, CloudStack's rules for moving volumes), the VMA simulator and real nbdkit, run by the
portal's own runtime (django-q2 workers and the progress follower).

Each VM is fully synced first; then every failover starts at once: the guest shuts down writing
``--changed-pct`` % of its blocks on its way (what the final sync must carry), the final incremental
sync runs, the VM is created, its volumes move onto it (disk 0 as root) and it starts. Every
destination VM's volumes are compared with the source disks (sha256). Then every failover is rolled
back, and a rollback counts as ok when the VM is gone, the volumes are attached to the OMA again with
their exports served, and the source runs.

    .venv/bin/python -m bench.failover --vms 10 --size-mib 256 --changed-pct 2

downtime = source shutdown requested -> destination Running. control_overhead = downtime minus the final
copy (the VMA's replication) minus the fake CloudStack's modelled latency (``--cloud-latency`` seconds
for each async job on the failover's path, counted from the fake's own job log for that VM).

Last line: one JSON object (vms, running, sha256_mismatches, rollbacks_ok, final_sync_ms_p50,
downtime_ms_p50, downtime_ms_p95, control_overhead_ms_p95, ...).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.harness import helper, percentile, portal_env, scratch_postgres, sha, start_oma, stop_oma, worker_init
from devtools.devserver import free_port, write_layout

TOKEN = "bench-vma-token"  # noqa: S105 - the simulator's, on loopback
# The async CloudStack jobs on a live failover's path after the source is off (their modelled time is
# the cloud's, not the portal's).
MODELLED = {
    "deployVirtualMachine",
    "createTags",
    "detachVolume",
    "attachVolume",
    "startVirtualMachine",
}


def wait_final(pks: set[int], timeout: float) -> None:
    from migrations_app.models import FINAL_STATES, JobState, MigrationJob

    deadline = time.monotonic() + timeout
    waiting = set(pks)
    while waiting and time.monotonic() < deadline:
        done = MigrationJob.objects.filter(pk__in=waiting, state__in=[*FINAL_STATES, JobState.TESTING])
        waiting -= set(done.values_list("pk", flat=True))
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=10)
    parser.add_argument("--disks", type=int, default=1)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--changed-pct", type=float, default=2.0)
    parser.add_argument("--cloud-latency", type=float, default=0.2, help="seconds each fake async job takes")
    parser.add_argument("--postgres", metavar="URL", help="run on a scratch database made on this server")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()

    shm = Path("/dev/shm")
    needed = int(2.5 * args.vms * args.disks * args.size_mib) << 20
    on_tmpfs = shm.is_dir() and shutil.disk_usage(shm).free > needed
    root = Path(tempfile.mkdtemp(prefix="oma-failover-", dir=shm if on_tmpfs else None))
    procs: list[Any] = []
    drop = None
    fake = None
    result: dict[str, Any] = {}
    try:
        database_url = None
        if args.postgres:
            database_url, drop = scratch_postgres(args.postgres)
        layout = write_layout(root / "nbd", "nbdkit", "127.0.0.1", free_port(), tls=True)
        from tests.support.fake_cloudstack import FakeCloudStack

        (layout.volume_root / "by-id").mkdir(parents=True, exist_ok=True)
        fake = FakeCloudStack(layout.volume_root / "by-id", data_dir=layout.volume_root / "cloudstack").start()
        fake.pending_polls = 0
        fake.job_seconds = dict.fromkeys(MODELLED, args.cloud_latency)
        vma_port = free_port()
        env = portal_env(layout, root / "var", 2.0, database_url)
        env.update(
            {
                "OMA_VOLUME_ROOT": str(layout.volume_root),
                **fake.portal_env(),
                "OMA_CLOUDSTACK_POLL_INTERVAL": "0.05",
                "OMA_VMA_URL": f"http://127.0.0.1:{vma_port}",
                "OMA_VMA_TOKEN": TOKEN,
                "OMA_VMA_NBD_PORT": str(layout.port),
            }
        )
        worker_init(env)
        from django.core.management import call_command
        from django.db import connections

        call_command("migrate", verbosity=0)
        from devtools.cloud import map_cloud
        from devtools.vma_sim import VmaSimulator, make_inventory
        from migrations_app.actions import rollback_failover, start_failover, start_migration, sync_inventory
        from migrations_app.backends import get_compute_backend
        from migrations_app.models import DestinationVolume, JobEvent, JobKind, JobState, MigrationJob
        from migrations_app.vma_client import VmaClient

        if not helper(layout, "start")["ok"]:
            raise SystemExit("cannot start nbdkit")
        specs = [(f"fo-vm-{n:03d}", args.disks) for n in range(args.vms)]
        vms = make_inventory(root / "vma", specs, args.size_mib, dense=True)
        by_name = {vm.name: vm for vm in vms}
        sim = VmaSimulator(vms, TOKEN, tls_credentials=layout.vma_tls)
        server = sim.serve("127.0.0.1", vma_port)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        client = VmaClient(f"http://127.0.0.1:{vma_port}", TOKEN)
        sync_inventory(client.inventory())
        client.close()
        map_cloud(get_compute_backend())
        connections.close_all()
        procs = start_oma(env, root / "oma.log")

        started = time.perf_counter()
        syncs = [start_migration(vm_id=vm.id, requested_by="bench-sync") for vm in vms]
        wait_final({j.pk for j in syncs}, args.timeout)
        full_sync_s = time.perf_counter() - started
        synced = MigrationJob.objects.filter(pk__in=[j.pk for j in syncs], state=JobState.COMPLETED).count()
        print(f"full syncs: {synced}/{len(vms)} in {full_sync_s:.1f} s", file=sys.stderr)
        for vm in vms:
            vm.shutdown_change_pct = args.changed_pct
            vm.shutdown_seconds = 0.2

        started = time.perf_counter()
        failovers = [start_failover(vm_id=vm.id, kind=JobKind.LIVE_FAILOVER, requested_by="bench") for vm in vms]
        wait_final({j.pk for j in failovers}, args.timeout)
        failover_wall_s = time.perf_counter() - started

        running, mismatches = 0, 0
        downtimes, finals, overheads = [], [], []
        for job in MigrationJob.objects.filter(pk__in=[j.pk for j in failovers]).select_related("vm"):
            if job.state != JobState.COMPLETED:
                print(f"{job.vm.name}: {job.state} {job.error}", file=sys.stderr)
                continue
            made = fake.vms.get(job.destination_vm_id)
            running += bool(made and made["state"] == "Running")
            source = by_name[job.vm.name]
            for volume in DestinationVolume.objects.filter(source_disk__vm=job.vm).select_related("source_disk"):
                disk = source.disks[volume.source_disk.unit_number]
                attached = fake.volumes.get(volume.volume_id, {})
                on_vm = attached.get("virtualmachineid") == job.destination_vm_id
                as_root = (attached.get("deviceid") == 0) == (disk.unit_number == 0)
                same = sha(fake.file_of(volume.volume_id), disk.capacity_bytes) == sha(disk.image, disk.capacity_bytes)
                mismatches += not (on_vm and as_root and same)
            events = list(JobEvent.objects.filter(job=job).order_by("id"))
            shutdown = next(e for e in events if e.kind == "step.started" and e.step == JobState.SHUTTING_DOWN)
            running_at = next(e for e in events if e.kind == "vm.running")
            downtime = (running_at.created_at - shutdown.created_at).total_seconds()
            replication = sim.replications.get(f"{job.job_id}-{job.attempt}")
            copy_s = (replication.finished_at or replication.started_at) - replication.started_at if replication else 0
            sync_start = next(e for e in events if e.kind == "step.started" and e.step == JobState.PROVISIONING)
            verified = next(e for e in events if e.kind == "step.finished" and e.step == JobState.VERIFYING)
            finals.append((verified.created_at - sync_start.created_at).total_seconds() * 1000)
            # The cloud's own time on this failover's path: its async jobs, each --cloud-latency long.
            jobs_on_path = 3 + 1 + 2 * args.disks + 1  # deploy and its two tags, root out, each disk off and on, start
            modelled = jobs_on_path * args.cloud_latency
            downtimes.append(downtime * 1000)
            overheads.append((downtime - copy_s - modelled) * 1000)

        # Every failover is rolled back, the way an operator would after a failed acceptance test.
        for job in failovers:
            rollback_failover(vm_id=job.vm.vm_id, actor="bench")
        wait_final({j.pk for j in failovers}, args.timeout)
        rollbacks_ok = 0
        for job in MigrationJob.objects.filter(pk__in=[j.pk for j in failovers]).select_related("vm"):
            volumes = DestinationVolume.objects.filter(source_disk__vm=job.vm)
            back = all(
                v.state == DestinationVolume.State.ATTACHED
                and fake.volumes[v.volume_id].get("virtualmachineid") == fake.oma_vm_id
                for v in volumes
            )
            ok = (
                job.state == JobState.ROLLED_BACK
                and job.destination_vm_id not in fake.vms
                and back
                and by_name[job.vm.name].power_state == "poweredOn"
            )
            rollbacks_ok += ok
        stop_oma(procs)
        procs = []
        server.shutdown()
        helper(layout, "stop")
        result = {
            "database": "postgresql" if database_url else "sqlite",
            "vms": args.vms,
            "disks": args.disks,
            "size_mib": args.size_mib,
            "changed_pct": args.changed_pct,
            "cloud_latency_s": args.cloud_latency,
            "full_synced": synced,
            "full_sync_s": round(full_sync_s, 1),
            "failover_wall_s": round(failover_wall_s, 1),
            "running": running,
            "sha256_mismatches": mismatches,
            "rollbacks_ok": rollbacks_ok,
            "final_sync_ms_p50": percentile(finals, 50),
            "downtime_ms_p50": percentile(downtimes, 50),
            "downtime_ms_p95": percentile(downtimes, 95),
            "control_overhead_ms_p50": percentile(overheads, 50),
            "control_overhead_ms_p95": percentile(overheads, 95),
        }
    finally:
        if procs:
            stop_oma(procs)
        if fake is not None:
            fake.stop()
        if drop is not None:
            drop()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
