#!/usr/bin/env python
"""Export storm: N VMs x D disks of concurrent ensure_export calls, then the same calls again (reuse),
while nbdcopy keeps streaming into an existing export; then, in the same run, the seed's way
(append a section to one config file and SIGHUP the first pgrep PID, once per export) as a baseline.

Starts its own NBD server(s) on free loopback ports under a temporary folder and its own database
(SQLite in that folder, or a scratch PostgreSQL database with --postgres). Last line: one JSON object.

    .venv/bin/python -m bench.export_storm --backend nbdkit --vms 50 --disks 2 --workers 8
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.harness import helper, percentile, portal_env, scratch_postgres, worker_init
from devtools.devserver import DevServerLayout, free_port, write_layout
from exports.nbd_protocol import NbdError, list_exports

VOLUME_SIZE = 64 << 20
STREAM_SIZE = 8 << 20
STREAM_RATE = "32M"  # bits per second: each streamed copy takes a couple of seconds


def vm_id(n: int) -> str:
    return f"4210{n:04x}-0000-4000-8000-{n:012x}"


def warm_up(_: int) -> None:
    from exports.models import VMExportMapping

    VMExportMapping.objects.exists()
    time.sleep(0.05)


def ensure_group(jobs: list[tuple[str, str, int, str]]) -> list[tuple[float, str | None]]:
    """One call for the group (a VM's disks, or a single disk); each disk gets the call's latency."""
    from exports.actions import ExportError, ExportRequest, ensure_exports

    started = time.perf_counter()
    error = None
    try:
        ensure_exports([ExportRequest(*job) for job in jobs], actor="bench")
    except ExportError as exc:
        error = str(exc)
    elapsed = (time.perf_counter() - started) * 1000
    return [(elapsed, error)] * len(jobs)


class Streamer(threading.Thread):
    """Copies a source image into one export again and again (rate-limited nbdcopy), verifying each copy."""

    def __init__(self, layout: DevServerLayout, export: str, volume: Path, source: Path) -> None:
        super().__init__(daemon=True)
        self.layout, self.export, self.volume, self.source = layout, export, volume, source
        self.stop = threading.Event()
        self.completed = 0
        self.interrupted = 0
        self.connect_failures = 0
        self.errors: list[str] = []
        self.expected = hashlib.sha256(source.read_bytes()).hexdigest()

    def run(self) -> None:
        url = f"nbd://{self.layout.host}:{self.layout.port}/{self.export}"
        while not self.stop.is_set():
            proc = subprocess.run(
                ["nbdcopy", "--connections=1", "--requests=4", "--", "[", "nbdkit", "--filter=rate", "file",
                 str(self.source), f"rate={STREAM_RATE}", "]", url],
                capture_output=True, text=True, check=False, timeout=300,
            )  # fmt: skip
            with open(self.volume, "rb") as fh:
                written = hashlib.sha256(fh.read(STREAM_SIZE)).hexdigest()
            if proc.returncode != 0 and "nbd_connect" in proc.stderr:
                # Refused at connect (no byte written yet): a client retries; count it, go on.
                self.connect_failures += 1
                self.errors.append(proc.stderr.strip()[-300:])
                time.sleep(0.2)
                continue
            if proc.returncode != 0 or written != self.expected:
                # A copy in flight broke: a migration would have failed here. Count it, stop.
                self.interrupted += 1
                self.errors.append(proc.stderr.strip()[-300:] or "data mismatch")
                return
            else:
                self.completed += 1


def server_state() -> dict[str, int]:
    from exports.models import NbdServerState

    state = NbdServerState.objects.first()
    if state is None:
        return {"reloads": 0, "restarts": 0, "crashes": 0, "lost": 0, "repairs": 0}
    return {
        "reloads": state.reload_count,
        "restarts": state.restarts_detected,
        "crashes": state.crashes_detected,
        "lost": state.lost_exports_detected,
        "repairs": state.repairs,
    }


def storm(args: argparse.Namespace, root: Path, database_url: str | None) -> dict[str, Any]:
    # Plain NBD: this bench measures export churn and reloads, not the data path's TLS.
    layout = write_layout(root / "nbd", args.backend, "127.0.0.1", free_port(), tls=False)
    env = portal_env(layout, root / "var", args.min_reload_spacing, database_url)
    worker_init(env)
    from django.core.management import call_command
    from django.db import connections

    call_command("migrate", verbosity=0)
    from exports.actions import ensure_export
    from exports.health import check_nbd_server

    started = helper(layout, "start")
    if not started["ok"]:
        raise SystemExit(f"cannot start {args.backend}: {started}")

    # The transfer that must survive everything: an export that exists before the storm.
    stream_volume = layout.volume_root / "stream.img"
    with open(stream_volume, "wb") as fh:
        fh.truncate(VOLUME_SIZE)
    stream_export = ensure_export(vm_id=vm_id(0xFFFF), vm_name="streaming", disk_unit=0, device=str(stream_volume))
    source = root / "stream-source.bin"
    source.write_bytes(os.urandom(STREAM_SIZE))
    first_pid = check_nbd_server().pid
    before = server_state()

    jobs = []
    for n in range(args.vms):
        for disk in range(args.disks):
            device = layout.volume_root / f"vm{n}-disk{disk}.img"
            with open(device, "wb") as fh:
                fh.truncate(VOLUME_SIZE)
            jobs.append((vm_id(n), f"vm-{n}", disk, str(device)))

    if args.grouping == "vm":
        groups = [[job for job in jobs if job[0] == vm_id(n)] for n in range(args.vms)]
    else:
        groups = [[job] for job in jobs]
    streamer = Streamer(layout, stream_export.export_name, stream_volume, source)
    streamer.start()
    time.sleep(0.5)
    connections.close_all()
    # spawn, not fork: a forked worker would share this process's database socket.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=spawn, initializer=worker_init, initargs=(env,)) as pool:
        list(pool.map(warm_up, range(args.workers * 4)))  # start every worker before timing
        t0 = time.perf_counter()
        new = [r for group in pool.map(ensure_group, groups) for r in group]
        new_wall = time.perf_counter() - t0
        after_new = server_state()
        t0 = time.perf_counter()
        reuse = [r for group in pool.map(ensure_group, groups) for r in group]
        reuse_wall = time.perf_counter() - t0
    after_reuse = server_state()
    # Let the transfer in flight finish, so it is judged whole.
    streamer.stop.set()
    streamer.join(timeout=120)

    names = {f"migration-vm-{vm}-disk{disk}" for vm, _, disk, _ in jobs}
    try:
        listed = len(names & set(list_exports(layout.host, layout.port)))
    except NbdError:
        listed = 0
    final = check_nbd_server()
    totals = server_state()
    helper(layout, "stop")
    return {
        "backend": args.backend,
        "exports": len(jobs),
        "listed": listed,
        "errors": [e for _, e in new + reuse if e][:5],
        "reloads": after_new["reloads"] - before["reloads"],
        "restarts": totals["restarts"] - before["restarts"],
        "crashes": totals["crashes"] - before["crashes"],
        "lost_exports_repaired": totals["lost"] - before["lost"],
        "repairs": totals["repairs"] - before["repairs"],
        "final_check_incidents": final.incidents,
        "interrupted_transfers": streamer.interrupted,
        "completed_transfers": streamer.completed,
        "transfer_connect_failures": streamer.connect_failures,
        "transfer_errors": streamer.errors[:3],
        "grouping": args.grouping,
        "workers": args.workers,
        "main_pid_changed": final.pid != first_pid,
        "all_served_at_end": not final.missing,
        "new_wall_s": round(new_wall, 2),
        "new_p50_ms": percentile([ms for ms, _ in new], 50),
        "new_p99_ms": percentile([ms for ms, _ in new], 99),
        "reuse_wall_s": round(reuse_wall, 2),
        "reuse_p50_ms": percentile([ms for ms, _ in reuse], 50),
        "reuse_p99_ms": percentile([ms for ms, _ in reuse], 99),
        "reuse_reloads": after_reuse["reloads"] - after_new["reloads"],
    }


def first_pgrep_pid(marker: str) -> int | None:
    # The seed's helper signalled the first PID pgrep printed. Matching our own config path keeps the
    # baseline from signalling any other nbd-server on this machine.
    proc = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True, check=False)
    pids = sorted(int(p) for p in proc.stdout.split())
    return pids[0] if pids else None


def sighup_first(marker: str) -> bool:
    """Signal the first process pgrep finds, as the seed's helper did; say whether a reload was asked for."""
    pid = first_pgrep_pid(marker)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        # What pgrep found (a connection's child, or the server the bug just killed) exited before the
        # signal: the seed's helper failed the same way, and no reload happened.
        return False
    return True


def pid_alive(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return raw[raw.rindex(")") + 2] not in "ZX"


def baseline(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """The seed's way: one shared config file, append a section, SIGHUP, once per export."""
    layout = write_layout(root / "baseline", "nbd-server", "127.0.0.1", free_port(), tls=False)
    started = helper(layout, "start")
    main_pid = started["pid"]
    stream_volume = layout.volume_root / "stream.img"
    with open(stream_volume, "wb") as fh:
        fh.truncate(VOLUME_SIZE)
    with open(layout.server_config, "a") as fh:
        fh.write(f"[stream]\n    exportname = {stream_volume}\n")
    os.kill(main_pid, signal.SIGHUP)
    time.sleep(1.0)
    source = root / "stream-source.bin"
    streamer = Streamer(layout, "stream", stream_volume, source)
    streamer.start()
    time.sleep(0.5)
    names = []
    reloads = 0
    t0 = time.perf_counter()
    for n in range(args.vms):
        for disk in range(args.disks):
            name = f"migration-vm-{vm_id(n)}-disk{disk}"
            device = layout.volume_root / f"vm{n}-disk{disk}.img"
            with open(device, "wb") as fh:
                fh.truncate(VOLUME_SIZE)
            with open(layout.server_config, "a") as fh:
                fh.write(f"[{name}]\n    exportname = {device}\n")
            names.append(name)
            reloads += sighup_first(str(layout.server_config))
    wall = time.perf_counter() - t0
    time.sleep(1.0)
    streamer.stop.set()
    streamer.join(timeout=120)
    try:
        listed = len(set(names) & set(list_exports(layout.host, layout.port)))
    except NbdError:
        listed = 0
    crashed = not pid_alive(main_pid)
    helper(layout, "stop")
    return {
        "reloads": reloads,
        "crashes": int(crashed),
        "listed": listed,
        "interrupted_transfers": streamer.interrupted,
        "completed_transfers": streamer.completed,
        "transfer_connect_failures": streamer.connect_failures,
        "wall_s": round(wall, 2),
    }


def main() -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["nbdkit", "nbd-server"], default="nbdkit")
    parser.add_argument("--vms", type=int, default=50)
    parser.add_argument("--disks", type=int, default=2)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument(
        "--grouping",
        choices=["vm", "disk"],
        default="vm",
        help="vm: one ensure_exports call per VM (its disks together, as the workflow does); disk: one per disk",
    )
    parser.add_argument("--min-reload-spacing", type=float, default=2.0)
    parser.add_argument("--postgres", metavar="URL", help="run on a scratch database made on this server")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="oma-storm-"))
    drop = None
    try:
        database_url = None
        if args.postgres:
            database_url, drop = scratch_postgres(args.postgres)
        result = storm(args, root, database_url)
        result["database"] = "postgresql" if database_url else "sqlite"
        if not args.no_baseline:
            result["baseline"] = baseline(args, root)
    finally:
        if drop is not None:
            drop()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
