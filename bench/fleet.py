"""A fleet on one OMA node: N VMs x D disks of S MiB through K attach slots, for R rounds.

The simulator serves N generated VMs; every VM gets a job at once in each round (round 1 full, later
rounds incremental: the simulator changes some blocks first), and the portal's own runtime (the default
django-q2 worker count and one progress follower) works through them: slots reserved per VM, idle volumes
detached least recently used first and attached again for their next sync. After each round every
volume's bytes are checked against its source. In the same run, the same bytes are copied by bare nbdcopy
at the same concurrency (the slots' worth of disks at once): ``ratio = ideal_wall_s / wall_s``.

    .venv/bin/python -m bench.fleet --vms 100 --disks 2 --size-mib 32 --slots 25 --rounds 2

Last line: one JSON object (vms, rounds, completed, sha256_mismatches, slots, max_attached,
max_concurrent_copies, detaches, reattaches, helper_writes_after_reattach, reloads, duplicate_tasks,
worker_processes, peak_rss_mb, slot_utilization, overhead_p95_ms, data_mb, wall_s, ideal_wall_s, ratio,
database). slot_utilization is the time-averaged share of the K slots holding a running copy while
jobs wait for slots.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from bench.harness import (
    HELPER,
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


def counting_helper(root: Path) -> tuple[str, Path]:
    """The real helper behind a wrapper that logs each verb, so the bench counts helper writes."""
    log = root / "helper-calls.log"
    wrapper = root / "helper-wrapper.sh"
    wrapper.write_text(f'#!/bin/sh\necho "$1" >> "{log}"\nexec {" ".join(HELPER)} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return str(wrapper), log


def links(log: Path) -> int:
    return log.read_text().split().count("link") if log.exists() else 0


class Sampler(threading.Thread):
    """Every quarter second: attached volumes (the by-id links that exist: what is really attached),
    running copies, waiting jobs, and the OMA processes' memory."""

    def __init__(self, by_id: Path, slots: int, procs: list[subprocess.Popen[bytes]], sim: Any) -> None:
        super().__init__(daemon=True)
        self.by_id, self.slots, self.procs, self.sim = by_id, slots, procs, sim
        self.stop = threading.Event()
        self.max_attached = 0
        self.max_copies = 0
        self.peak_rss = 0
        self.busy_share: list[float] = []
        self.round_shares: list[list[float]] = [[]]

    def run(self) -> None:
        from django.db import connections

        from migrations_app.models import JobDisk, JobState, MigrationJob

        try:
            while not self.stop.wait(0.25):
                attached = sum(1 for _ in self.by_id.glob("virtio-*")) if self.by_id.exists() else 0
                self.max_attached = max(self.max_attached, attached)
                copies = sum(
                    sum(1 for c in list(r.copies) if c.state in ("queued", "copying"))
                    for r in list(self.sim.replications.values())
                    if r.state == "running"
                )
                self.max_copies = max(self.max_copies, copies)
                if MigrationJob.objects.filter(state=JobState.PENDING).exists():
                    replicating = JobDisk.objects.filter(job__state=JobState.REPLICATING).count()
                    self.busy_share.append(min(1.0, replicating / self.slots))
                    self.round_shares[-1].append(self.busy_share[-1])
                self.peak_rss = max(self.peak_rss, self.rss())
        finally:
            connections.close_all()

    def rss(self) -> int:
        total = 0
        for proc in self.procs:
            try:
                group = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.Error:
                continue
            for member in group:
                with contextlib.suppress(psutil.Error):
                    total += member.memory_info().rss
        return total


def bare_copy(layout: DevServerLayout, images: list[tuple[Path, int]], concurrency: int, rate_mbit: float) -> float:
    """Every image by plain nbdcopy into a fresh export, ``concurrency`` at a time, each read through the
    same WAN rate as the simulator's copies (nbdkit's rate filter); the wall time."""
    targets, made = [], []
    for n, (image, size) in enumerate(images):
        name = f"migration-vm-00000000-0000-4000-8000-{n:012x}-disk0"
        volume = layout.volume_root / f"bare-{n}.img"
        with open(volume, "wb") as fh:
            fh.truncate(size)
        made.append((name, volume))
        source = [str(image)]
        if rate_mbit:
            # burstiness 0.1 s: paced from the first byte, as the simulator paces its copies (the filter's
            # default lets a fresh connection burst for two seconds).
            rate = f"rate={int(rate_mbit * 1_000_000)}"
            source = ["[", "nbdkit", "--filter=rate", "file", str(image), rate, "burstiness=0.1", "]"]
        targets.append((source, nbd_target(layout, name)))
    for start in range(0, len(made), 64):
        batch = made[start : start + 64]
        if not helper(layout, "link", *(part for name, volume in batch for part in (name, str(volume))))["ok"]:
            raise SystemExit("cannot link the bare-copy exports")
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        codes = list(
            pool.map(lambda t: subprocess.run(["nbdcopy", "--", *t[0], t[1]], check=False).returncode, targets)
        )
    wall = time.perf_counter() - started
    if any(codes):
        raise SystemExit(f"bare nbdcopy failed: {codes}")
    for name, volume in made:
        helper(layout, "unlink", name)
        volume.unlink()
    return wall


def run_round(vms: list[Any], number: int, timeout: float) -> tuple[float, list[Any]]:
    from migrations_app.actions import start_migration
    from migrations_app.models import FINAL_STATES, MigrationJob

    started = time.perf_counter()
    jobs = [start_migration(vm_id=vm.id, requested_by=f"bench-round-{number}") for vm in vms]
    waiting = {job.pk for job in jobs}
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        waiting -= set(MigrationJob.objects.filter(pk__in=waiting, state__in=FINAL_STATES).values_list("pk", flat=True))
        time.sleep(0.1)
    return time.perf_counter() - started, jobs


def check_bytes(jobs: list[Any], by_name: dict[str, Any], volume_root: Path) -> int:
    """Each job's volumes against their sources (read from the volume files: a volume may be detached
    by now, its by-id device gone)."""
    from migrations_app.models import JobDisk
    from migrations_app.volumes import LocalVolumeBackend

    volumes = LocalVolumeBackend(volume_root)
    mismatches = 0
    for disk in JobDisk.objects.filter(job__in=jobs).select_related("source_disk__vm"):
        source = by_name[disk.source_disk.vm.name].disks[disk.source_disk.unit_number]
        image = volumes.image_path(disk.volume_id) if disk.volume_id else None
        if image is None or sha(image, source.capacity_bytes) != sha(source.image, source.capacity_bytes):
            mismatches += 1
    return mismatches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=100)
    parser.add_argument("--disks", type=int, default=2)
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--slots", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--sparse",
        action="store_true",
        help="mostly sparse disks (bare nbdcopy then skips the holes the simulator's rate-limited copy writes)",
    )
    parser.add_argument(
        "--rate-mbit",
        type=float,
        default=50,
        help="each disk copy's WAN link, full or incremental, for the stack and the bare copy alike (0: no limit)",
    )
    parser.add_argument("--postgres", metavar="URL", help="run on a scratch database made on this server")
    parser.add_argument("--tls", action="store_true", help="NBD over TLS (the production default) for both runs")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds a round may take")
    args = parser.parse_args()

    shm = Path("/dev/shm")
    factor = 0.1 if args.sparse else 2.2  # images and volumes, then images and the bare copy's volumes
    needed = int(factor * args.vms * args.disks * args.size_mib) << 20
    on_tmpfs = shm.is_dir() and shutil.disk_usage(shm).free > needed
    root = Path(tempfile.mkdtemp(prefix="oma-fleet-", dir=shm if on_tmpfs else None))
    drop = None
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, Any] = {}
    try:
        database_url = None
        if args.postgres:
            database_url, drop = scratch_postgres(args.postgres)
        layout = write_layout(root / "nbd", "nbdkit", "127.0.0.1", free_port(), tls=args.tls)
        env = portal_env(layout, root / "var", 2.0, database_url)
        wrapper, calls = counting_helper(root)
        vma_port = free_port()
        env.update(
            {
                "OMA_NBD_HELPER": wrapper,
                "OMA_VOLUME_ROOT": str(layout.volume_root),
                "OMA_VMA_URL": f"http://127.0.0.1:{vma_port}",
                "OMA_VMA_TOKEN": TOKEN,
                "OMA_VMA_NBD_PORT": str(layout.port),
                "OMA_ATTACH_SLOTS": str(args.slots),
                "OMA_MAX_ACTIVE_JOBS": str(args.slots),
            }
        )
        env.pop("OMA_Q_WORKERS", None)  # the default worker count
        worker_init(env)
        from django.conf import settings
        from django.core.management import call_command
        from django.db import connections

        call_command("migrate", verbosity=0)
        from django_q.models import Task

        from devtools.vma_sim import Faults, VmaSimulator, make_inventory
        from exports.models import NbdServerState
        from migrations_app.actions import sync_inventory
        from migrations_app.models import DestinationVolume, JobDisk, JobEvent, JobState, MigrationJob
        from migrations_app.vma_client import VmaClient

        if not helper(layout, "start")["ok"]:
            raise SystemExit("cannot start nbdkit")
        specs = [(f"fleet-vm-{n:04d}", args.disks) for n in range(args.vms)]
        vms = make_inventory(root / "vma", specs, args.size_mib, dense=not args.sparse)
        by_name = {vm.name: vm for vm in vms}
        rate = int(args.rate_mbit * 1_000_000) or None
        sim = VmaSimulator(vms, TOKEN, Faults(rate_bits_per_second=rate), layout.vma_psk_file if layout.tls else None)
        server = sim.serve("127.0.0.1", vma_port)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        client = VmaClient(f"http://127.0.0.1:{vma_port}", TOKEN)
        sync_inventory(client.inventory())
        client.close()
        connections.close_all()
        procs = start_oma(env, root / "oma.log")
        time.sleep(3)  # the workers and the follower start before the clock runs
        sampler = Sampler(layout.volume_root / "by-id", args.slots, procs, sim)
        sampler.start()

        walls, mismatches, completed, all_jobs = [], 0, 0, []
        links_after_round_1 = 0
        for number in range(1, args.rounds + 1):
            wall, jobs = run_round(vms, number, args.timeout)
            walls.append(wall)
            all_jobs += jobs
            completed += MigrationJob.objects.filter(pk__in=[j.pk for j in jobs], state=JobState.COMPLETED).count()
            mismatches += check_bytes(jobs, by_name, layout.volume_root)
            if number == 1:
                links_after_round_1 = links(calls)
            sampler.round_shares.append([])
            print(f"round {number}: {wall:.1f} s", file=sys.stderr)
        sampler.stop.set()
        sampler.join(10)

        # Where a slot's turnover goes, per round: the worker's steps (dispatched -> copy started at the VMA)
        # and the follower noticing a copy's end (the VMA's end -> job completed).
        chains: list[list[float]] = [[] for _ in walls]
        notices: list[list[float]] = [[] for _ in walls]
        steps: list[dict[str, list[float]]] = [{} for _ in walls]
        for job in MigrationJob.objects.filter(pk__in=[j.pk for j in all_jobs], state=JobState.COMPLETED):
            number = int(job.requested_by.rsplit("-", 1)[-1]) - 1
            log = list(JobEvent.objects.filter(job=job).order_by("id"))
            events = {e.kind: e.created_at for e in log}
            # Each step's own time, and the queue's: placed (job.started) -> the worker's first step.
            begun: dict[str, Any] = {"queue": events.get("job.started")}
            for event in log:
                if event.kind == "step.started":
                    begun[event.step] = event.created_at
                    if begun.get("queue") is not None:
                        steps[number].setdefault("queue", []).append(
                            (event.created_at - begun.pop("queue")).total_seconds() * 1000
                        )
                elif event.kind == "step.finished" and begun.get(event.step) is not None:
                    took = (event.created_at - begun.pop(event.step)).total_seconds() * 1000
                    steps[number].setdefault(event.step, []).append(took)
            replication = sim.replications.get(f"{job.job_id}-{job.attempt}")
            if "job.started" in events and replication is not None:
                chains[number].append((replication.started_at - events["job.started"].timestamp()) * 1000)
            if replication is not None and replication.finished_at and job.finished_at:
                notices[number].append((job.finished_at.timestamp() - replication.finished_at) * 1000)
        overheads = []
        for job in MigrationJob.objects.filter(pk__in=[j.pk for j in all_jobs], state=JobState.COMPLETED):
            replication = sim.replications.get(f"{job.job_id}-{job.attempt}")
            started = JobEvent.objects.filter(job=job, kind="job.started").order_by("id").first()
            if replication is None or started is None or job.finished_at is None:
                continue
            copy_s = (replication.finished_at or replication.started_at) - replication.started_at
            overheads.append(((job.finished_at - started.created_at).total_seconds() - copy_s) * 1000)
        volumes = DestinationVolume.objects.all()
        attaches = sum(v.attaches for v in volumes)
        detaches = sum(v.detaches for v in volumes)
        data_bytes = sum(JobDisk.objects.filter(job__in=all_jobs).values_list("bytes_done", flat=True))
        state = NbdServerState.objects.first()
        # A worker task that found nothing to do: a duplicate of one that ran (or runs) for the same job.
        not_taken = sum(
            1
            for result in Task.objects.filter(func="migrations_app.tasks.run_job_task").values_list("result", flat=True)
            if str(result).startswith("not taken")
        )

        stop_oma(procs)
        procs = []
        for volume in layout.volume_root.glob("*.img"):
            volume.unlink()  # checked already; the bare copy needs the room (tmpfs is memory)
        images = [(disk.image, disk.capacity_bytes) for vm in vms for disk in vm.disks]
        ideal = bare_copy(layout, images, max(1, sampler.max_copies or args.slots), args.rate_mbit)
        server.shutdown()
        helper(layout, "stop")
        round_1_wall = walls[0] if walls else 0.0
        result = {
            "database": "postgresql" if database_url else "sqlite",
            "vms": args.vms,
            "disks": args.disks,
            "size_mib": args.size_mib,
            "rounds": args.rounds,
            "jobs": len(all_jobs),
            "completed": completed,
            "sha256_mismatches": mismatches,
            "slots": args.slots,
            "max_attached": sampler.max_attached,
            "max_concurrent_copies": sampler.max_copies,
            "detaches": detaches,
            "reattaches": attaches - len(volumes),
            "helper_writes_after_reattach": links(calls) - links_after_round_1,
            "reloads": state.reload_count if state else 0,
            "duplicate_tasks": not_taken,
            "worker_processes": int(str(settings.Q_CLUSTER["workers"])),
            "peak_rss_mb": round(sampler.peak_rss / 1e6, 1),
            "slot_utilization": round(sum(sampler.busy_share) / len(sampler.busy_share), 3)
            if sampler.busy_share
            else None,
            "overhead_p50_ms": percentile(overheads, 50),
            "overhead_p95_ms": percentile(overheads, 95),
            "data_mb": round(data_bytes / 1e6, 1),
            "wall_s": round(sum(walls), 2),
            "round_walls_s": [round(w, 2) for w in walls],
            "ideal_wall_s": round(ideal, 2),
            "ratio": round(ideal / round_1_wall, 3) if round_1_wall else None,
            "storage": "tmpfs" if on_tmpfs else "disk",
            "rate_mbit": args.rate_mbit,
            "round_worker_steps_p50_ms": [percentile(values, 50) for values in chains],
            "round_copy_end_noticed_p50_ms": [percentile(values, 50) for values in notices],
            "round_step_p50_ms": [{step: percentile(v, 50) for step, v in sorted(r.items())} for r in steps],
            "round_slot_utilization": [
                round(sum(shares) / len(shares), 3) if shares else None for shares in sampler.round_shares if shares
            ],
        }
    finally:
        if procs:
            stop_oma(procs)
        if drop is not None:
            drop()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "omaportal.settings")
    main()
