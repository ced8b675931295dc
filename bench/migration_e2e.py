#!/usr/bin/env python
"""Migration end to end: N VMs x D disks of S MiB through the whole stack (django-q2 cluster, local
volumes, the NBD server through the helper, the VMA simulator copying with nbdcopy), then, in the same
run, a bare nbdcopy of the same bytes into fresh exports with the same parallelism.

    .venv/bin/python -m bench.migration_e2e --vms 3 --disks 2 --size-mib 256

With ``--repeat N`` bare and stack runs alternate N times on fresh VMs (this VM is noisy: one 2-second
run measured 0.55 and 1.31 within an hour). Last line: one JSON object (jobs, completed,
sha256_mismatches, reloads, data_mb, wall_s, mb_s, bare_nbdcopy_mb_s, ratio = the median round's, ratios,
ratio_spread, overhead_p95_ms). Overhead = a job's wall time minus the VMA's copy time.

With ``--tls`` the server requires TLS (the production default: pre-shared keys on nbdkit, client
certificates on nbd-server): the stack and the
bare nbdcopy both copy over TLS (ratio), and a plain nbdkit on a side port over the same exports gives
bare nbdcopy without TLS in the same round: ``tls_vs_plain`` = plain wall / TLS wall (1.0: TLS is free).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.harness import (
    helper,
    nbd_target,
    percentile,
    portal_env,
    scratch_postgres,
    sha,
    start_oma,
    stop_oma,
    worker_init,
)
from devtools.devserver import DevServerLayout, free_port, write_layout

TOKEN = "bench-vma-token"  # noqa: S105 - the simulator's, on loopback


def bare_copy(layout: DevServerLayout, vms: list[Any], backend: str, round_no: int, port: int | None = None) -> float:
    """Copy every image with plain nbdcopy into fresh exports, all disks in parallel as the simulator
    copies them; returns the wall time. The volumes are removed again afterwards. ``port``: another
    server over the same exports (the plain side port of a --tls run)."""
    targets, volumes = [], []
    sim_disks = [sim_disk for vm in vms for sim_disk in vm.disks]
    for n, sim_disk in enumerate(sim_disks):
        name = f"migration-vm-00000000-0000-4000-8000-{round_no:04x}{n:08x}-disk0"
        volume = layout.volume_root / f"bare-{round_no}-{n}.img"
        with open(volume, "wb") as fh:
            fh.truncate(sim_disk.capacity_bytes)
        if not helper(layout, "link", name, str(volume))["ok"]:
            raise SystemExit("cannot link a bare-copy export")
        target = nbd_target(layout, name) if port is None else f"nbd://127.0.0.1:{port}/{name}"
        targets.append((sim_disk.image, target))
        volumes.append((name, volume))
    if backend == "nbd-server":
        helper(layout, "reload")
        time.sleep(1)
    os.sync()
    started = time.perf_counter()
    with ThreadPoolExecutor(len(targets)) as pool:
        codes = list(
            pool.map(lambda t: subprocess.run(["nbdcopy", "--flush", str(t[0]), t[1]], check=False).returncode, targets)
        )
    wall = time.perf_counter() - started
    if any(codes):
        raise SystemExit(f"bare nbdcopy failed: {codes}")
    for name, volume in volumes:
        helper(layout, "unlink", name)
        volume.unlink()
    return wall


def measure_round(
    number: int,
    layout: DevServerLayout,
    args: argparse.Namespace,
    root: Path,
    vma_port: int,
    plain_port: int | None = None,
) -> dict[str, Any]:
    """One measured round on fresh VMs: bare nbdcopy of their images, then the whole stack on the same
    bytes, then bare nbdcopy again (the reference is the faster bare run: drift of this shared VM during
    the round cannot flatter the ratio). The round's images and volumes are removed afterwards."""
    from devtools.vma_sim import VmaSimulator, make_inventory
    from exports.models import NbdServerState
    from migrations_app.actions import start_migration, sync_inventory
    from migrations_app.models import JobDisk, JobEvent, JobState, MigrationJob
    from migrations_app.vma_client import VmaClient

    specs = [(f"bench-r{number}-vm-{n}", args.disks) for n in range(args.vms)]
    vms = make_inventory(root / "vma", specs, args.size_mib, dense=not args.sparse)
    sim = VmaSimulator(vms, TOKEN, tls_credentials=layout.vma_tls if layout.tls else None)
    server = sim.serve("127.0.0.1", vma_port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = VmaClient(f"http://127.0.0.1:{vma_port}", TOKEN)
        sync_inventory(client.inventory())
        client.close()
        bare_walls = [bare_copy(layout, vms, args.backend, 2 * number)]
        plain_walls = [bare_copy(layout, vms, args.backend, 2 * number, plain_port)] if plain_port else []
        # Both phases start with no dirty pages, so neither pays the other's writeback (--flush waits).
        os.sync()
        reloads_before = getattr(NbdServerState.objects.first(), "reload_count", 0)

        t0 = time.perf_counter()
        jobs = [start_migration(vm_id=vm.id, requested_by="bench") for vm in vms]
        pending = {job.pk for job in jobs}
        deadline = time.monotonic() + 1800
        while pending and time.monotonic() < deadline:
            finished = MigrationJob.objects.filter(
                pk__in=pending, state__in=[JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED]
            ).values_list("pk", flat=True)
            pending -= set(finished)
            time.sleep(0.05)
        wall = time.perf_counter() - t0

        completed, mismatches, overheads = 0, 0, []
        slowest: list[tuple[str, str, int]] = []
        data_bytes = 0
        by_name = {vm.name: vm for vm in vms}
        for job in MigrationJob.objects.filter(pk__in=[j.pk for j in jobs]).select_related("vm"):
            if job.state != JobState.COMPLETED:
                continue
            completed += 1
            replication = sim.replications[f"{job.job_id}-{job.attempt}"]
            copy_s = (replication.finished_at or replication.started_at) - replication.started_at
            if job.finished_at is None:
                continue
            overheads.append(((job.finished_at - job.created_at).total_seconds() - copy_s) * 1000)
            if overheads[-1] == max(overheads):
                # Where the slowest job's time went: each event, in ms since the job was created.
                slowest = [
                    (e.kind, e.step, round((e.created_at - job.created_at).total_seconds() * 1000))
                    for e in job.events.order_by("id")
                ] + [("copy", "", round(copy_s * 1000))]
            for disk in JobDisk.objects.filter(job=job).select_related("source_disk"):
                source = by_name[job.vm.name].disks[disk.source_disk.unit_number]
                data_bytes += source.capacity_bytes
                if sha(Path(disk.device_path), source.capacity_bytes) != sha(source.image, source.capacity_bytes):
                    mismatches += 1
        pickups = [
            (e.created_at - e.job.created_at).total_seconds() * 1000
            for e in JobEvent.objects.filter(job__in=jobs, kind="job.started").select_related("job")
        ]
        tails = []
        for job in MigrationJob.objects.filter(pk__in=[j.pk for j in jobs]):
            ended = getattr(sim.replications.get(f"{job.job_id}-{job.attempt}"), "finished_at", None)
            if job.finished_at and ended:
                tails.append((job.finished_at.timestamp() - ended) * 1000)
        steps: dict[str, list[float]] = {}
        for event in JobEvent.objects.filter(job__in=jobs, kind="step.finished"):
            steps.setdefault(event.step, []).append(event.duration_ms or 0)
        reloads = getattr(NbdServerState.objects.first(), "reload_count", 0) - reloads_before
        bare_walls.append(bare_copy(layout, vms, args.backend, 2 * number + 1))
        if plain_port:
            plain_walls.append(bare_copy(layout, vms, args.backend, 2 * number + 1, plain_port))
        bare_wall = min(bare_walls)
        bare_bytes = sum(d.capacity_bytes for vm in vms for d in vm.disks)
        mb_s = data_bytes / 1e6 / wall if wall else 0.0
        bare_mb_s = bare_bytes / 1e6 / bare_wall if bare_wall else 0.0
        return {
            "jobs": len(jobs),
            "completed": completed,
            "sha256_mismatches": mismatches,
            "reloads": reloads,
            "data_mb": round(data_bytes / 1e6, 1),
            "wall_s": round(wall, 2),
            "mb_s": round(mb_s, 1),
            "bare_nbdcopy_wall_s": round(bare_wall, 2),
            "bare_nbdcopy_walls_s": [round(w, 2) for w in bare_walls],
            "bare_nbdcopy_mb_s": round(bare_mb_s, 1),
            "ratio": round(mb_s / bare_mb_s, 3) if bare_mb_s else None,
            "bare_plain_walls_s": [round(w, 2) for w in plain_walls],
            "tls_vs_plain": round(min(plain_walls) / bare_wall, 3) if plain_walls and bare_wall else None,
            "overhead_p50_ms": percentile(overheads, 50),
            "overhead_p95_ms": percentile(overheads, 95),
            "overheads_ms": sorted(round(o) for o in overheads),
            "slowest_job_timeline_ms": slowest,
            "step_p50_ms": {step: percentile(values, 50) for step, values in steps.items()},
            "queue_pickup_p50_ms": percentile(pickups, 50),
            "copy_end_to_job_end_p50_ms": percentile(tails, 50),
        }
    finally:
        server.shutdown()
        server.server_close()
        for sim_vm in vms:
            for sim_disk in sim_vm.disks:
                sim_disk.image.unlink(missing_ok=True)
        for volume in layout.volume_root.glob("*.img"):
            volume.unlink()  # checked already; the next round needs the room (tmpfs is memory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=3)
    parser.add_argument("--disks", type=int, default=2)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--backend", choices=["nbdkit", "nbd-server"], default="nbdkit")
    parser.add_argument("--workers", type=int, default=4, help="django-q2 workers")
    parser.add_argument("--sparse", action="store_true", help="mostly sparse disks instead of fully written ones")
    parser.add_argument("--postgres", metavar="URL", help="run on a scratch database made on this server")
    parser.add_argument(
        "--tls", action="store_true", help="NBD over TLS (nbdkit: pre-shared keys; nbd-server: certificates)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds of bare copy then stack, each on fresh VMs: median and spread"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="also run the rounds with verification off (OMA_VERIFY_WRITES=0) and report what verifying costs",
    )
    parser.add_argument(
        "--storage",
        choices=["tmpfs", "disk"],
        default="tmpfs",
        help="where images and volumes live: tmpfs (/dev/shm) compares the stack with bare nbdcopy on CPU alone; "
        "on disk, writeback noise of this VM's disk swamps the ratio (the same copy took 0.8 s to 4.4 s)",
    )
    args = parser.parse_args()

    needed = 3 * args.vms * args.disks * args.size_mib << 20
    shm = Path("/dev/shm")
    on_tmpfs = args.storage == "tmpfs" and shm.is_dir() and shutil.disk_usage(shm).free > needed
    root = Path(tempfile.mkdtemp(prefix="oma-e2e-", dir=shm if on_tmpfs else None))
    drop = None
    cluster = None
    plain_server: subprocess.Popen[bytes] | None = None
    try:
        database_url = None
        if args.postgres:
            database_url, drop = scratch_postgres(args.postgres)
        layout = write_layout(root / "nbd", args.backend, "127.0.0.1", free_port(), tls=args.tls)
        env = portal_env(layout, root / "var", 2.0, database_url)
        vma_port = free_port()
        env.update(
            {
                "OMA_VOLUME_ROOT": str(layout.volume_root),
                "OMA_VMA_URL": f"http://127.0.0.1:{vma_port}",
                "OMA_VMA_TOKEN": TOKEN,
                "OMA_VMA_NBD_PORT": str(layout.port),
                "OMA_PROGRESS_POLL_INTERVAL": "0.1",
                "OMA_Q_WORKERS": str(args.workers),
            }
        )
        worker_init(env)
        from django.core.management import call_command
        from django.db import connections

        call_command("migrate", verbosity=0)
        if not helper(layout, "start")["ok"]:
            raise SystemExit(f"cannot start {args.backend}")
        connections.close_all()
        cluster = start_oma(env)
        time.sleep(3)  # let the workers and the follower start before the clock runs
        plain_port = None
        if args.tls:
            # bare nbdcopy without TLS, same exports, same round: what TLS itself costs on this machine
            plain_port = free_port()
            plain_server = subprocess.Popen(
                ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(plain_port), "file", f"dir={layout.export_root}"]
            )
            time.sleep(0.5)
        rounds = [measure_round(n, layout, args, root, vma_port, plain_port) for n in range(args.repeat)]
        unverified: list[dict[str, Any]] = []
        if args.verify:
            # The same rounds with the portal trusting the VMA's word (no read-back): what verifying costs.
            stop_oma(cluster)
            cluster = start_oma({**env, "OMA_VERIFY_WRITES": "0"})
            time.sleep(3)
            unverified = [measure_round(args.repeat + n, layout, args, root, vma_port) for n in range(args.repeat)]
        helper(layout, "stop")
    finally:
        if plain_server is not None:
            plain_server.terminate()
            plain_server.wait()
        if cluster is not None:
            stop_oma(cluster)
        if drop is not None:
            drop()
        shutil.rmtree(root, ignore_errors=True)
    ratios = sorted(r["ratio"] for r in rounds if r["ratio"] is not None)
    result: dict[str, Any] = {
        **rounds[len(rounds) // 2],  # the median round's own figures
        "backend": args.backend,
        "database": "postgresql" if database_url else "sqlite",
        "storage": "tmpfs" if on_tmpfs else "disk",
        "jobs": sum(r["jobs"] for r in rounds),
        "completed": sum(r["completed"] for r in rounds),
        "sha256_mismatches": sum(r["sha256_mismatches"] for r in rounds),
        "reloads": sum(r["reloads"] for r in rounds),
        "repeat": args.repeat,
        "ratio": statistics.median(ratios) if ratios else None,
        "ratios": ratios,
        "ratio_spread": round(ratios[-1] - ratios[0], 3) if ratios else None,
        "overhead_p95_ms": statistics.median(r["overhead_p95_ms"] for r in rounds),
        "verify_ms_p50": statistics.median(r["step_p50_ms"].get("verifying", 0) for r in rounds),
        "tls": bool(args.tls),
    }
    tls_costs = sorted(r["tls_vs_plain"] for r in rounds if r["tls_vs_plain"] is not None)
    if tls_costs:
        result["tls_vs_plain"] = statistics.median(tls_costs)
        result["tls_vs_plain_all"] = tls_costs
    if unverified:
        plain = sorted(r["ratio"] for r in unverified if r["ratio"] is not None)
        result["ratio_without_verify"] = statistics.median(plain) if plain else None
        result["ratios_without_verify"] = plain
        result["jobs"] += sum(r["jobs"] for r in unverified)
        result["completed"] += sum(r["completed"] for r in unverified)
        result["sha256_mismatches"] += sum(r["sha256_mismatches"] for r in unverified)
        result["verify_cost"] = (
            round(1 - result["ratio"] / result["ratio_without_verify"], 3)
            if result["ratio"] and result["ratio_without_verify"]
            else None
        )
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
