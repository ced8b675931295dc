"""A fleet on one or more OMA nodes: N VMs x D disks of S MiB through K attach slots a node, for R rounds.

The simulator serves N generated VMs; every VM gets a job at once in each round (round 1 full, later
rounds incremental: the simulator changes some blocks first), and the portal's own runtime (the default
django-q2 worker count and one progress follower) works through them: slots reserved per VM, idle volumes
detached least recently used first and attached again for their next sync. After each round every
volume's bytes are checked against its source. In the same run, the same bytes are copied by bare nbdcopy
at the same concurrency (the slots' worth of disks at once): ``ratio = ideal_wall_s / wall_s``.

    .venv/bin/python -m bench.fleet --vms 100 --disks 2 --size-mib 32 --slots 25 --rounds 2

With ``--nodes M`` (PostgreSQL only: ``--postgres URL``) M OMA nodes run as separate process groups on one
database, each with its own nbdkit, helper config, device folder and django-q2 queue, over one shared
volume root (as a zone's volumes are shared by its VMs). ``--kill-node-at PCT`` SIGKILLs one node (its
workers, follower and NBD server; the one with the most jobs under way) once PCT percent of round 1's jobs
finished: the live nodes must take its work over and finish every job with every byte intact.

Last line: one JSON object (vms, rounds, completed, sha256_mismatches, slots, max_attached,
max_concurrent_copies, detaches, reattaches, helper_writes_after_reattach, reloads, duplicate_tasks,
worker_processes, peak_rss_mb, slot_utilization, overhead_p95_ms, data_mb, wall_s, ideal_wall_s, ratio,
database, nodes, per_node_max_attached, replaced_after_node_loss, cross_node_double_attach).
slot_utilization is the time-averaged share of the live nodes' slots (K each) holding a running copy
while jobs wait for slots: a copy running at the VMA (a job's disk whose copy ended is not counted while
its job waits for the follower to notice; slot_replicating_share counts it, as stops before 2026-12-05
did). per_node_max_attached: the most volumes any one node had attached at once;
replaced_after_node_loss: jobs a live node took over from the killed one; cross_node_double_attach:
volumes seen attached to two nodes at the same moment. volumes_made_ahead: volumes the workers created
for syncs still waiting for attach slots (their slots not held through it). round_slot_holders: per
round, while jobs wait, the time-averaged share of the slots held by disks of jobs in each step
("copying": at the VMA; "replicating": started or ended there but not yet followed), by idle attached
volumes, by detaching ones, and free: where a slot's time goes when it is not copying. cpu_busy_share:
how busy the machine's cores were over the rounds; cpu_s: CPU seconds over the rounds of the whole
machine, of the OMA's processes (oma_workers with their helper calls, oma_follower, oma_nbd_server) and
of this process (the VMA simulator with its copies).
``--events FILE`` writes each job's timeline (its events, its copy's start and end at the VMA) as JSON lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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


@dataclass
class Node:
    """One OMA node of the bench: its NBD layout (its own nbdkit and helper config, the shared volume
    root), its environment, its helper-call log and its processes (workers and follower)."""

    name: str
    layout: DevServerLayout
    env: dict[str, str]
    calls: Path
    device_root: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    alive: bool = True

    def kill(self) -> None:
        """SIGKILL, at once: its workers, its follower and its NBD server (a node that lost power)."""
        self.alive = False
        # run_workers runs the cluster in a session of its own (which a group signal would not reach, and
        # which stops in order, finishing its steps, when its parent dies): every process goes at once.
        members = []
        for proc in self.procs:
            with contextlib.suppress(psutil.Error):
                members += [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for member in members:
            with contextlib.suppress(psutil.Error):
                member.kill()
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=30)
        psutil.wait_procs(members, timeout=30)
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(self.layout.pidfile.read_text()), signal.SIGKILL)
        self.procs = []


def stop_server(node: Node) -> None:
    """Stop the node's NBD server through the helper; when the helper cannot (it says why on stderr),
    the process its pidfile names is killed: a bench never leaves a server behind."""
    try:
        said: Any = helper(node.layout, "stop")
    except (OSError, ValueError, IndexError) as exc:
        said = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    if said.get("ok") and said.get("stopped"):
        return
    with contextlib.suppress(OSError, ValueError, psutil.Error):
        server = psutil.Process(int(node.layout.pidfile.read_text()))
        if str(node.layout.port) in " ".join(server.cmdline()):
            server.kill()
            why = f"node {node.name}: the helper did not stop its server ({said}); killed {server.pid}"
            print(why, file=sys.stderr)


def make_nodes(
    root: Path, count: int, slots: int, tls: bool, database_url: str | None, stale_seconds: float | None
) -> list[Node]:
    """``count`` nodes over one volume root. One node keeps the single-node layout (its devices under the
    volume root's by-id, the default node name); several each get a name and a device folder. Every
    server takes the same keys (one VMA, one portal)."""
    shared = root / "volumes"
    nodes: list[Node] = []
    for n in range(count):
        name = f"oma-{n + 1}" if count > 1 else ""
        base = root / (f"node-{n + 1}" if count > 1 else "node")
        if nodes and nodes[0].layout.psk_file.exists():
            (base / "nbd").mkdir(parents=True)
            shutil.copy(nodes[0].layout.psk_file, base / "nbd" / "nbd.psk")  # write_layout keeps its keys
        layout = write_layout(base / "nbd", "nbdkit", "127.0.0.1", free_port(), tls=tls, volume_root=shared)
        env = portal_env(layout, base / "var", 2.0, database_url)
        wrapper, calls = counting_helper(base)
        device_root = shared / (f"by-id-{name}" if name else "by-id")
        env.update(
            {
                "OMA_NBD_HELPER": wrapper,
                "OMA_VOLUME_ROOT": str(shared),
                "OMA_VOLUME_DEVICE_ROOT": str(device_root),
                "OMA_VMA_NBD_PORT": str(layout.port),
                "OMA_ATTACH_SLOTS": str(slots),
                "OMA_MAX_ACTIVE_JOBS": str(slots),
            }
        )
        if name:
            env["OMA_NODE_NAME"] = name
        if stale_seconds:
            env["OMA_HEARTBEAT_STALE_SECONDS"] = str(stale_seconds)
        nodes.append(Node(name or "local", layout, env, calls, device_root))
    return nodes


class Killer(threading.Thread):
    """Once ``pct`` percent of the round's jobs finished, kill the node with the most jobs under way (at
    the first moment after that when some node has any: a node killed idle tests nothing)."""

    def __init__(self, nodes: list[Node], jobs: list[Any], pct: float) -> None:
        super().__init__(daemon=True)
        self.nodes, self.jobs, self.pct = nodes, jobs, pct
        self.killed: dict[str, Any] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        from django.db import connections
        from django.db.models import Count

        from migrations_app.models import FINAL_STATES, WORKER_STEPS, MigrationJob

        try:
            pks = [job.pk for job in self.jobs]
            while not self.stop.wait(0.05):
                done = MigrationJob.objects.filter(pk__in=pks, state__in=FINAL_STATES).count()
                if done * 100 < self.pct * len(pks) or done == len(pks):
                    continue
                copying = dict(
                    MigrationJob.objects.filter(state__in=WORKER_STEPS, node__isnull=False)
                    .values_list("node__name")
                    .annotate(n=Count("pk"))
                    .values_list("node__name", "n")
                )
                victim = max(self.nodes, key=lambda node: copying.get(node.name, 0))
                if not copying.get(victim.name):
                    continue  # between two jobs: the next ones are being placed
                victim.kill()
                self.killed = {"node": victim.name, "at_done": done, "its_jobs": copying.get(victim.name, 0)}
                print(f"killed {victim.name} at {done}/{len(pks)} done: {self.killed}", file=sys.stderr)
                return
        finally:
            connections.close_all()


class Sampler(threading.Thread):
    """Every quarter second: attached volumes per node (the by-id links that exist in each node's device
    folder: what is really attached there), running copies, waiting jobs, and the OMA processes' memory."""

    def __init__(self, nodes: list[Node], slots: int, sim: Any) -> None:
        super().__init__(daemon=True)
        self.nodes, self.slots, self.sim = nodes, slots, sim
        self.stop = threading.Event()
        self.max_attached = 0
        self.per_node_max = {node.name: 0 for node in nodes}
        self.double_attached: set[str] = set()
        self.max_copies = 0
        self.peak_rss = 0
        self.busy_share: list[float] = []
        self.replicating_share: list[float] = []  # the same with every disk of a replicating job counted
        self.round_shares: list[list[float]] = [[]]
        # Per round, while jobs wait: what the slots hold, summed over samples (divided by samples x slots
        # at the end): disks of jobs in each step, idle attached volumes, detaching ones, free slots.
        self.holders: list[dict[str, float]] = [{}]
        self.holder_samples: list[int] = [0]
        # CPU seconds of the OMA's long-lived processes (its workers, follower and NBD server, each with
        # the helper calls it waited for): the first and the last reading of each.
        self.oma_cpu: dict[int, tuple[str, float, float]] = {}  # pid -> role, first, last

    def run(self) -> None:
        from django.db import connections

        from migrations_app.models import JobDisk, JobState, MigrationJob

        try:
            while not self.stop.wait(0.25):
                seen: dict[str, int] = {}
                for node in self.nodes:
                    here = node.device_root
                    attached = {p.name for p in here.glob("virtio-*")} if here.exists() else set()
                    self.per_node_max[node.name] = max(self.per_node_max[node.name], len(attached))
                    for serial in attached:
                        seen[serial] = seen.get(serial, 0) + 1
                self.double_attached |= {serial for serial, count in seen.items() if count > 1}
                self.max_attached = max(self.max_attached, len(seen))
                copies = sum(
                    sum(1 for c in list(r.copies) if c.state in ("queued", "copying"))
                    for r in list(self.sim.replications.values())
                    if r.state == "running"
                )
                self.max_copies = max(self.max_copies, copies)
                if MigrationJob.objects.filter(state=JobState.PENDING).exists():
                    live = sum(1 for node in self.nodes if node.alive)
                    replicating = JobDisk.objects.filter(job__state=JobState.REPLICATING).count()
                    slots = self.slots * max(1, live)
                    # A disk whose copy ended at the VMA holds no running copy, though its job stays
                    # replicating until the follower notices the end.
                    self.busy_share.append(min(1.0, min(copies, replicating) / slots))
                    self.replicating_share.append(min(1.0, replicating / slots))
                    self.round_shares[-1].append(self.busy_share[-1])
                    self.count_holders(live, copies)
                self.peak_rss = max(self.peak_rss, self.rss())
        finally:
            connections.close_all()

    def count_holders(self, live: int, copies: int) -> None:
        from django.db.models import Count

        from migrations_app.models import WORKER_STEPS, DestinationVolume, JobDisk, JobState

        held = dict(
            DestinationVolume.objects.filter(state__in=DestinationVolume.SLOT_STATES)
            .values_list("state")
            .annotate(n=Count("pk"))
            .values_list("state", "n")
        )
        by_step = dict(
            JobDisk.objects.filter(job__state__in=[*WORKER_STEPS, JobState.CANCELLING])
            .values_list("job__state")
            .annotate(n=Count("pk"))
            .values_list("job__state", "n")
        )
        # A replicating job's disks: copying at the VMA, or waiting there (not started, or ended but not
        # noticed yet)
        by_step["copying"] = min(copies, by_step.get(JobState.REPLICATING, 0))
        by_step[JobState.REPLICATING] = by_step.get(JobState.REPLICATING, 0) - by_step["copying"]
        in_jobs = sum(by_step.values())
        detaching = held.get(DestinationVolume.State.DETACHING, 0)
        total = sum(held.values())
        sample = {**by_step, "idle": max(0, total - detaching - in_jobs), "detaching": detaching}
        slots = self.slots * max(1, live)
        sample["free"] = max(0, slots - total)
        for key, n in sample.items():
            self.holders[-1][key] = self.holders[-1].get(key, 0) + n / slots
        self.holder_samples[-1] += 1

    def next_round(self) -> None:
        self.round_shares.append([])
        self.holders.append({})
        self.holder_samples.append(0)

    def rss(self) -> int:
        total = 0
        for proc in (p for node in self.nodes for p in node.procs):
            try:
                group = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.Error:
                continue
            for member in group:
                with contextlib.suppress(psutil.Error):
                    total += member.memory_info().rss
                    command = " ".join(member.cmdline())
                    if "manage.py" in command:
                        self.read_cpu(member, "follower" if "run_follower" in command else "workers")
        for node in self.nodes:
            with contextlib.suppress(psutil.Error, OSError, ValueError):
                self.read_cpu(psutil.Process(int(node.layout.pidfile.read_text())), "nbd_server")
        return total

    def read_cpu(self, process: psutil.Process, role: str) -> None:
        times = process.cpu_times()
        now = times.user + times.system + times.children_user + times.children_system
        _, first, _ = self.oma_cpu.get(process.pid, (role, now, now))
        self.oma_cpu[process.pid] = (role, first, now)

    def oma_cpu_by_role(self) -> dict[str, float]:
        spent: dict[str, float] = {}
        for role, first, last in self.oma_cpu.values():
            spent[f"oma_{role}"] = spent.get(f"oma_{role}", 0.0) + last - first
        return {key: round(value, 1) for key, value in sorted(spent.items())}


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


def run_round(vms: list[Any], number: int, timeout: float, started_jobs: Any = None) -> tuple[float, list[Any]]:
    from migrations_app.actions import start_migration
    from migrations_app.models import FINAL_STATES, MigrationJob

    started = time.perf_counter()
    jobs = [start_migration(vm_id=vm.id, requested_by=f"bench-round-{number}") for vm in vms]
    if started_jobs is not None:
        started_jobs(jobs)
    waiting = {job.pk for job in jobs}
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        waiting -= set(MigrationJob.objects.filter(pk__in=waiting, state__in=FINAL_STATES).values_list("pk", flat=True))
        time.sleep(0.1)
    return time.perf_counter() - started, jobs


def write_timelines(path: Path, jobs: list[Any], round_started: list[float], sim: Any) -> None:
    """One JSON line a job: its round, VM, and each event, each time a worker task was queued for it
    (django-q2 stamps a task's ``started`` when it is queued: it splits a placed job's wait into the
    follower's enqueue and the cluster's), and its copy's start and end at the VMA, in seconds from its
    round's start."""
    from django_q.models import Task

    from migrations_app.models import JobEvent

    with path.open("w") as out:
        for job in jobs:
            number = int(job.requested_by.rsplit("-", 1)[-1])
            zero = round_started[number - 1]
            events: list[tuple[float, str, str]] = [
                (round(e.created_at.timestamp() - zero, 3), e.kind, e.step)
                for e in JobEvent.objects.filter(job=job).order_by("id")
            ]
            events += [
                (round(queued.timestamp() - zero, 3), "task.queued", "")
                for queued in Task.objects.filter(name=f"run_job_task-{job.pk}").values_list("started", flat=True)
            ]
            replication = sim.replications.get(f"{job.job_id}-{job.attempt}")
            if replication is not None:
                events.append((round(replication.started_at - zero, 3), "vma.started", ""))
                if replication.finished_at:
                    events.append((round(replication.finished_at - zero, 3), "vma.finished", ""))
            events.sort(key=lambda e: e[0])
            out.write(json.dumps({"round": number, "job": job.job_id, "vm": str(job.vm_id), "events": events}) + "\n")


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
    parser.add_argument(
        "--vma-rtt-ms",
        type=float,
        default=0,
        help="the round trip of each call to the VMA's API (the WAN between the VMware site and the OMA)",
    )
    parser.add_argument("--postgres", metavar="URL", help="run on a scratch database made on this server")
    parser.add_argument("--tls", action="store_true", help="NBD over TLS (the production default) for both runs")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds a round may take")
    parser.add_argument(
        "--events",
        metavar="FILE",
        help="write each job's timeline (its events and its copy at the VMA, seconds from its round's start) "
        "as JSON lines, to see where a slot's time goes",
    )
    parser.add_argument("--nodes", type=int, default=1, help="OMA nodes, each its own process group (PostgreSQL)")
    parser.add_argument(
        "--kill-node-at", type=float, metavar="PCT", help="SIGKILL one node once PCT%% of round 1's jobs finished"
    )
    parser.add_argument(
        "--stale-seconds",
        type=float,
        default=15,
        help="with --kill-node-at: how long a silent node's heartbeat takes to count as lost (default 60 s)",
    )
    args = parser.parse_args()
    if args.nodes > 1 and not args.postgres:
        parser.error("--nodes needs --postgres: the nodes share one database")
    if args.kill_node_at is not None and args.nodes < 2:
        parser.error("--kill-node-at needs --nodes 2 or more: a live node takes the killed one's work")

    shm = Path("/dev/shm")
    factor = 0.1 if args.sparse else 2.2  # images and volumes, then images and the bare copy's volumes
    needed = int(factor * args.vms * args.disks * args.size_mib) << 20
    on_tmpfs = shm.is_dir() and shutil.disk_usage(shm).free > needed
    root = Path(tempfile.mkdtemp(prefix="oma-fleet-", dir=shm if on_tmpfs else None))
    drop = None
    nodes: list[Node] = []
    result: dict[str, Any] = {}
    try:
        database_url = None
        if args.postgres:
            database_url, drop = scratch_postgres(args.postgres)
        stale = args.stale_seconds if args.kill_node_at is not None else None
        nodes = make_nodes(root, args.nodes, args.slots, args.tls, database_url, stale)
        layout = nodes[0].layout
        vma_port = free_port()
        for node in nodes:
            node.env.update({"OMA_VMA_URL": f"http://127.0.0.1:{vma_port}", "OMA_VMA_TOKEN": TOKEN})
            node.env.pop("OMA_Q_WORKERS", None)  # the default worker count
        env = nodes[0].env
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

        for node in nodes:
            if not helper(node.layout, "start")["ok"]:
                raise SystemExit(f"cannot start nbdkit for {node.name}")
        specs = [(f"fleet-vm-{n:04d}", args.disks) for n in range(args.vms)]
        vms = make_inventory(root / "vma", specs, args.size_mib, dense=not args.sparse)
        by_name = {vm.name: vm for vm in vms}
        rate = int(args.rate_mbit * 1_000_000) or None
        faults = Faults(rate_bits_per_second=rate, api_rtt_seconds=args.vma_rtt_ms / 1000)
        sim = VmaSimulator(vms, TOKEN, faults, layout.vma_tls if layout.tls else None)
        server = sim.serve("127.0.0.1", vma_port)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        client = VmaClient(f"http://127.0.0.1:{vma_port}", TOKEN)
        sync_inventory(client.inventory())
        client.close()
        connections.close_all()
        for node in nodes:
            node.procs = start_oma(node.env, root / f"{node.name}.log")
        time.sleep(3 + args.nodes)  # the workers and the followers start (and register) before the clock runs
        sampler = Sampler(nodes, args.slots, sim)
        sampler.start()
        killer: Killer | None = None

        def arm(jobs: list[Any]) -> None:
            nonlocal killer
            killer = Killer(nodes, jobs, args.kill_node_at)
            killer.start()

        walls, mismatches, completed, all_jobs = [], 0, 0, []
        round_started: list[float] = []
        links_after_round_1 = 0
        machine_before, own_before = psutil.cpu_times(), os.times()
        for number in range(1, args.rounds + 1):
            kill = arm if number == 1 and args.kill_node_at is not None else None
            round_started.append(time.time())
            wall, jobs = run_round(vms, number, args.timeout, kill)
            walls.append(wall)
            all_jobs += jobs
            completed += MigrationJob.objects.filter(pk__in=[j.pk for j in jobs], state=JobState.COMPLETED).count()
            mismatches += check_bytes(jobs, by_name, layout.volume_root)
            if number == 1:
                links_after_round_1 = sum(links(node.calls) for node in nodes)
            sampler.next_round()
            print(f"round {number}: {wall:.1f} s", file=sys.stderr)
        machine_after, own_after = psutil.cpu_times(), os.times()
        sampler.stop.set()
        sampler.join(10)
        machine_busy = sum(machine_after) - sum(machine_before) - (machine_after.idle - machine_before.idle)
        # This process: the VMA simulator (its copies' nbdcopy and nbdkit processes too), the sampler and
        # the checks; in production the VMA runs on its own host.
        own_cpu = sum(own_after[:4]) - sum(own_before[:4])

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
        reloads = sum(NbdServerState.objects.values_list("reload_count", flat=True))
        moved = set(
            JobEvent.objects.filter(job__in=all_jobs, kind="job.moved").values_list("job_id", flat=True).distinct()
        )
        # A worker task that found nothing to do: a duplicate of one that ran (or runs) for the same job.
        not_taken = sum(
            1
            for result in Task.objects.filter(func="migrations_app.tasks.run_job_task").values_list("result", flat=True)
            if str(result).startswith("not taken")
        )
        # Volumes the workers created for jobs still waiting for attach slots (their slots not held meanwhile).
        made_ahead = sum(
            int(str(result).split()[0])
            for result in Task.objects.filter(func="migrations_app.tasks.prepare_volumes_task").values_list(
                "result", flat=True
            )
            if str(result).split()[:1] and str(result).split()[0].isdigit()
        )

        if args.events:
            write_timelines(Path(args.events), all_jobs, round_started, sim)

        if killer is not None:
            killer.stop.set()
            killer.join(30)
        for node in nodes:
            stop_oma(node.procs)
            node.procs = []
        for volume in layout.volume_root.glob("*.img"):
            volume.unlink()  # checked already; the bare copy needs the room (tmpfs is memory)
        images = [(disk.image, disk.capacity_bytes) for vm in vms for disk in vm.disks]
        live = next(node for node in nodes if node.alive)  # the killed node's server is gone
        ideal = bare_copy(live.layout, images, max(1, sampler.max_copies or args.slots), args.rate_mbit)
        server.shutdown()
        for node in nodes:
            if node.alive:
                helper(node.layout, "stop")
        round_1_wall = walls[0] if walls else 0.0
        result = {
            "database": "postgresql" if database_url else "sqlite",
            "vms": args.vms,
            "disks": args.disks,
            "size_mib": args.size_mib,
            "rounds": args.rounds,
            "jobs": len(all_jobs),
            "completed": completed,
            "not_completed": {
                job.job_id: f"{job.state}: {job.error}"[:300]
                for job in MigrationJob.objects.filter(pk__in=[j.pk for j in all_jobs]).exclude(
                    state=JobState.COMPLETED
                )
            },
            "sha256_mismatches": mismatches,
            "slots": args.slots,
            "max_attached": sampler.max_attached,
            "max_concurrent_copies": sampler.max_copies,
            "detaches": detaches,
            "reattaches": attaches - len(volumes),
            "helper_writes_after_reattach": sum(links(node.calls) for node in nodes) - links_after_round_1,
            "reloads": reloads,
            "duplicate_tasks": not_taken,
            "volumes_made_ahead": made_ahead,
            "worker_processes": int(str(settings.Q_CLUSTER["workers"])),
            "peak_rss_mb": round(sampler.peak_rss / 1e6, 1),
            "slot_utilization": round(sum(sampler.busy_share) / len(sampler.busy_share), 3)
            if sampler.busy_share
            else None,
            "slot_replicating_share": round(sum(sampler.replicating_share) / len(sampler.replicating_share), 3)
            if sampler.replicating_share
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
            "vma_rtt_ms": args.vma_rtt_ms,
            "round_worker_steps_p50_ms": [percentile(values, 50) for values in chains],
            "round_copy_end_noticed_p50_ms": [percentile(values, 50) for values in notices],
            "round_step_p50_ms": [{step: percentile(v, 50) for step, v in sorted(r.items())} for r in steps],
            "nodes": args.nodes,
            "per_node_max_attached": max(sampler.per_node_max.values()),
            "per_node_max_attached_by_node": sampler.per_node_max,
            "replaced_after_node_loss": len(moved),
            "cross_node_double_attach": len(sampler.double_attached),
            "killed": killer.killed if killer is not None else None,
            "cpu_busy_share": round(machine_busy / (sum(machine_after) - sum(machine_before)), 3),
            "cpu_s": {
                "machine": round(machine_busy, 1),
                **sampler.oma_cpu_by_role(),
                "vma_sim_and_bench": round(own_cpu, 1),
                "cores": psutil.cpu_count(),
            },
            "round_slot_holders": [
                {key: round(value / samples, 3) for key, value in sorted(held.items()) if value}
                for held, samples in zip(sampler.holders, sampler.holder_samples, strict=True)
                if samples
            ],
            "round_slot_utilization": [
                round(sum(shares) / len(shares), 3) if shares else None for shares in sampler.round_shares if shares
            ],
        }
    finally:
        for node in nodes:
            stop_oma(node.procs)
            if node.alive:
                stop_server(node)
        if drop is not None:
            drop()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "omaportal.settings")
    main()
