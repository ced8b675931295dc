"""A VMA agent simulator that serves docs/vma-api.md and moves real bytes.

Its inventory is a handful of demo VMs whose disks are deterministic image files. A full copy runs
``nbdcopy`` from the image into the export; an incremental sync first changes a few blocks of the
source (as a running guest would) and writes only the blocks changed since the given change id,
through the NBD protocol. Faults can be injected: fail or drop the connection at N %, or stall.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from devtools.devserver import libnbd_tls_query
from exports.nbd_protocol import NbdConnection, NbdError, tls_from_path
from migrations_app.vma_client import Digest, DiskProgress, PowerState, VmaNic, VmaVM
from migrations_app.vma_client import Replication as ReplicationJson

BLOCK = 1 << 20
# A copy flushes and reports a checkpoint every this many blocks.
CHECKPOINT_BLOCKS = 4
NBDCOPY = shutil.which("nbdcopy") or "/usr/bin/nbdcopy"
NBDKIT = shutil.which("nbdkit") or "/usr/bin/nbdkit"
# Written part of each data block: the images stay mostly sparse, so they are quick to make.
DATA_PER_BLOCK = 64 << 10
DEMO_VMS = [("web-01", 1), ("db-01", 2), ("app-01", 3), ("file-01", 2)]
# What the demo VMs look like to failover: size, firmware, networks.
DEMO_HARDWARE: dict[str, dict[str, Any]] = {
    "web-01": {"cpus": 2, "memory_mib": 2048, "networks": ("VM Network",)},
    "db-01": {"cpus": 4, "memory_mib": 8192, "networks": ("VM Network", "Storage")},
    "app-01": {"cpus": 2, "memory_mib": 4096, "firmware": "efi", "networks": ("VM Network",)},
    "file-01": {"cpus": 1, "memory_mib": 2048, "guest_os": "windows2019srv_64Guest", "networks": ("VM Network",)},
}
# nbd://host:port/export, or nbds://identity@host:port/export (TLS with the VMA's pre-shared key).
NBD_URL_RE = re.compile(
    r"(?P<scheme>nbds?)://(?:(?P<identity>[A-Za-z0-9][A-Za-z0-9._-]{0,63})@)?"
    r"(?P<host>[0-9.]+|\[[0-9a-f:]+\]|localhost):(?P<port>\d+)/(?P<export>[A-Za-z0-9._-]+)"
)


@dataclass
class Faults:
    fail_at_percent: int | None = None
    drop_at_percent: int | None = None
    stall: bool = False
    rate_bits_per_second: int | None = None  # slow full copies down, as a WAN link would
    gate: threading.Event | None = None  # copies wait until it is set (tests: hold a copy in flight)
    # After a disk is copied, its first written block is zeroed on the way (a silent corruption the
    # VMA does not see): its digest is still the source's.
    corrupt: bool = False
    malformed: bool = False  # progress answers break the contract (a byte count that is not a number)
    api_rtt_seconds: float = 0.0  # each API call answers this much later: the WAN round trip to the VMA


class SimServer(ThreadingHTTPServer):
    # A real agent's HTTP server listens with the kernel's backlog (net.core.somaxconn), not socketserver's
    # 5: a follower asking about its copies side by side must not wait out a dropped SYN's one-second
    # retransmit.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.connections: set[socket.socket] = set()  # open keep-alive connections
        self.connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        """Stop listening and cut every open connection: a stopped agent answers no one, not even a
        client whose keep-alive connection was open."""
        super().server_close()
        with self.connections_lock:
            open_now = list(self.connections)
        for conn in open_now:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def coalesce(blocks: list[int]) -> list[list[int]]:
    """Sorted block numbers as [offset, length] byte ranges, neighbours merged."""
    ranges: list[list[int]] = []
    for block in blocks:
        if ranges and ranges[-1][0] + ranges[-1][1] == block * BLOCK:
            ranges[-1][1] += BLOCK
        else:
            ranges.append([block * BLOCK, BLOCK])
    return ranges


def digest_of(image: Path, ranges: list[list[int]]) -> Digest:
    """The sha256 of ``ranges`` of a file, read in order."""
    hasher = hashlib.sha256()
    with open(image, "rb") as fh:
        for offset, length in ranges:
            fh.seek(offset)
            left = length
            while left:
                chunk = fh.read(min(left, 8 << 20))
                if not chunk:
                    break
                hasher.update(chunk)
                left -= len(chunk)
    return {"algorithm": "sha256", "ranges": ranges, "value": hasher.hexdigest()}


def block_bytes(seed: str, block: int, generation: int) -> bytes:
    digest = hashlib.sha256(f"{seed}:{block}:{generation}".encode()).digest()
    return digest * (DATA_PER_BLOCK // len(digest))


@dataclass
class SimDisk:
    unit_number: int
    key: int
    label: str
    path: str
    capacity_bytes: int
    image: Path
    dense: bool = False  # every byte written (a full guest disk), not a mostly sparse one
    generation: int = 0
    changes: dict[int, list[int]] = field(default_factory=dict)
    # The whole image's digest at a generation: a full copy's, made once (a real VMA hashes as it reads).
    full_digest: tuple[int, Digest] | None = None

    def whole_digest(self) -> Digest:
        if self.full_digest is None or self.full_digest[0] != self.generation:
            self.full_digest = (self.generation, digest_of(self.image, [[0, self.capacity_bytes]]))
        return self.full_digest[1]

    @property
    def blocks(self) -> int:
        return self.capacity_bytes // BLOCK

    @property
    def change_id(self) -> str:
        return f"sim:{self.key}:{self.generation}"

    def make_image(self) -> None:
        if self.image.exists() and self.image.stat().st_size == self.capacity_bytes:
            return
        with open(self.image, "wb") as fh:
            fh.truncate(self.capacity_bytes)
            for block in range(0, self.blocks, 1 if self.dense else 4):
                fh.seek(block * BLOCK)
                data = block_bytes(str(self.image.name), block, 0)
                fh.write(data * (BLOCK // len(data)) if self.dense else data)

    def guest_writes(self, percent: float | None = None) -> list[int]:
        """What a running guest changed since the last sync: a new generation of a few blocks (one in
        sixteen, or ``percent`` of them)."""
        self.generation += 1
        count = max(1, round(self.blocks * percent / 100) if percent is not None else self.blocks // 16)
        changed = sorted({(self.generation * 7 + i * 13) % self.blocks for i in range(count)})
        with open(self.image, "r+b") as fh:
            for block in changed:
                fh.seek(block * BLOCK)
                fh.write(block_bytes(self.image.name, block, self.generation))
        self.changes[self.generation] = changed
        return changed

    def changed_since(self, change_id: str) -> list[int] | None:
        """Blocks changed after ``change_id``, or None when that id is not one of this disk's."""
        prefix = f"sim:{self.key}:"
        if not change_id.startswith(prefix) or not change_id[len(prefix) :].isdigit():
            return None
        since = int(change_id[len(prefix) :])
        if since > self.generation:
            return None
        return sorted({b for gen, blocks in self.changes.items() if gen > since for b in blocks})


@dataclass
class SimVM:
    id: str
    name: str
    disks: list[SimDisk]
    power_state: str = "poweredOn"
    guest_os: str = "ubuntu64Guest"
    cpus: int = 2
    memory_mib: int = 4096
    firmware: str = "bios"
    disk_controller: str = "pvscsi"
    networks: tuple[str, ...] = ("VM Network",)
    tools_running: bool = True  # VMware Tools answer: a guest shutdown is possible
    shutdown_seconds: float = 0.3  # how long the guest takes to shut down
    shutdown_hangs: bool = False  # the guest never finishes shutting down
    shutdown_change_pct: float | None = None  # blocks the guest writes on its way down (None: one in 16)
    power_action: str = ""
    power_error: str = ""

    def nics(self) -> list[VmaNic]:
        digest = hashlib.sha256(self.id.encode()).digest()
        return [
            {
                "network": network,
                "mac": "00:50:56:" + ":".join(f"{b:02x}" for b in (digest[0] & 0x3F, digest[1], i)),
                "adapter": "vmxnet3",
            }
            for i, network in enumerate(self.networks)
        ]

    def power_json(self) -> PowerState:
        body: PowerState = {"vm_id": self.id, "power_state": self.power_state}
        if self.power_action:
            body["action"] = self.power_action
        if self.power_error:
            body["error"] = self.power_error
        return body

    def as_json(self) -> VmaVM:
        return {
            "id": self.id,
            "name": self.name,
            "path": f"/DC1/vm/{self.name}",
            "power_state": self.power_state,
            "guest_os": self.guest_os,
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
            "firmware": self.firmware,
            "disk_controller": self.disk_controller,
            "nics": self.nics(),
            "disks": [
                {
                    "unit_number": d.unit_number,
                    "key": d.key,
                    "label": d.label,
                    "path": d.path,
                    "capacity_bytes": d.capacity_bytes,
                }
                for d in self.disks
            ],
        }


def make_inventory(
    data_dir: Path, specs: list[tuple[str, int]], size_mib: int = 64, dense: bool = False
) -> list[SimVM]:
    """VMs named and sized by ``specs`` ((name, disk count) pairs), with deterministic disk images."""
    data_dir.mkdir(parents=True, exist_ok=True)
    vms = []
    for name, disk_count in specs:
        vm_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"oma-vma-sim/{name}"))
        disks = [
            SimDisk(
                unit_number=unit,
                key=2000 + unit,
                label=f"Hard disk {unit + 1}",
                path=f"[datastore1] {name}/{name}_{unit}.vmdk",
                capacity_bytes=size_mib * BLOCK,
                image=data_dir / f"{name}-disk{unit}.img",
                dense=dense,
            )
            for unit in range(disk_count)
        ]
        for disk in disks:
            disk.make_image()
            disk.whole_digest()  # ahead of any copy, as a VMA reading the source would have it
        hardware = DEMO_HARDWARE.get(name, {})
        vms.append(SimVM(vm_id, name, disks, **hardware))
    return vms


def demo_inventory(data_dir: Path, size_mib: int = 64) -> list[SimVM]:
    return make_inventory(data_dir, DEMO_VMS, size_mib)


@dataclass
class DiskCopy:
    disk: SimDisk
    nbd_url: str
    previous_change_id: str
    state: str = "queued"
    mode: str = "full"
    bytes_done: int = 0
    bytes_total: int = 0
    throughput_bps: int = 0
    change_id: str = ""
    error: str = ""
    digest: Digest | None = None
    resume_from: str = ""  # a checkpoint this sync continues from (a resumed replication)
    checkpoint: str = ""  # what is confirmed written (flushed) so far: <mode>:<generation>:<blocks done>
    checkpoint_bytes: int = 0
    written: int = 0  # bytes this replication really wrote (a resumed one skips what was confirmed)
    transient: bool = False  # the failure was the NBD target or the network: worth resuming

    def as_json(self) -> DiskProgress:
        progress: DiskProgress = {
            "unit_number": self.disk.unit_number,
            "state": self.state,
            "mode": self.mode,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "throughput_bps": self.throughput_bps,
            "change_id": self.change_id,
            "error": self.error,
        }
        if self.digest is not None:
            progress["digest"] = self.digest
        if self.checkpoint:
            progress["checkpoint"] = self.checkpoint
            progress["checkpoint_bytes"] = self.checkpoint_bytes
        return progress

    def resume_skip(self) -> int:
        """Blocks of this sync confirmed written before, when the checkpoint fits this sync (same mode,
        and the source has not changed since); else 0: the sync starts over."""
        mode, _, rest = self.resume_from.partition(":")
        generation, _, done = rest.partition(":")
        if mode != self.mode or not generation.isdigit() or not done.isdigit():
            return 0
        return int(done) if int(generation) == self.disk.generation else 0


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Replication:
    def __init__(
        self,
        replication_id: str,
        vm: SimVM,
        copies: list[DiskCopy],
        faults: Faults,
        tls_credentials: Path | None = None,
    ) -> None:
        self.tls_credentials = tls_credentials
        self.id = replication_id
        self.vm = vm
        self.copies = copies
        self.faults = faults
        self.cancel_requested = threading.Event()
        self.state = "running"
        self.error = ""
        self.started_at = time.time()
        self.finished_at: float | None = None
        self.threads = [threading.Thread(target=self._run_disk, args=(c,), daemon=True) for c in copies]

    def start(self) -> None:
        for copy in self.copies:
            if copy.previous_change_id:
                changed = copy.disk.changed_since(copy.previous_change_id)
                if changed is not None:
                    copy.mode = "incremental"
                    # A running guest wrote since the last sync (a resumed sync continues the same
                    # changes); a powered-off one wrote nothing.
                    if not copy.resume_from and self.vm.power_state == "poweredOn":
                        copy.disk.guest_writes()
        for thread in self.threads:
            thread.start()
        threading.Thread(target=self._finish, daemon=True).start()

    def _finish(self) -> None:
        for thread in self.threads:
            thread.join()
        self.finished_at = time.time()
        states = {c.state for c in self.copies}
        if "failed" in states:
            self.state = "failed"
            self.error = "; ".join(f"disk {c.disk.unit_number}: {c.error}" for c in self.copies if c.error)
        elif self.cancel_requested.is_set():
            self.state = "cancelled"
        else:
            self.state = "completed"

    def as_json(self) -> ReplicationJson:
        body: ReplicationJson = {
            "replication_id": self.id,
            "vm_id": self.vm.id,
            "state": self.state,
            "error": self.error,
            "disks": [c.as_json() for c in self.copies],
        }
        if self.faults.malformed:
            body["disks"][0]["bytes_done"] = "lots"  # type: ignore[typeddict-item]
        if self.state == "failed":
            failed = [c for c in self.copies if c.state == "failed"]
            body["error_kind"] = "transient" if failed and all(c.transient for c in failed) else "permanent"
        return body

    def _fault(self, copy: DiskCopy, percent: int) -> str | None:
        if self.faults.fail_at_percent is not None and percent >= self.faults.fail_at_percent:
            return f"injected failure at {self.faults.fail_at_percent}%"
        if self.faults.drop_at_percent is not None and percent >= self.faults.drop_at_percent:
            copy.transient = True
            return f"NBD connection dropped at {self.faults.drop_at_percent}%"
        return None

    def _run_disk(self, copy: DiskCopy) -> None:
        copy.state = "copying"
        started = time.monotonic()
        try:
            if self.faults.gate is not None:
                copy.bytes_total = copy.disk.capacity_bytes
                while not self.faults.gate.wait(0.05) and not self.cancel_requested.is_set():
                    pass
            if self.faults.stall:
                copy.bytes_total = copy.disk.capacity_bytes
                self.cancel_requested.wait()
            elif copy.mode == "incremental":
                self._copy_changed(copy, started)
            else:
                self._copy_full(copy, started)
        except (NbdError, OSError) as exc:
            # The NBD target (or the network to it) went away: the portal may resume from the checkpoint.
            copy.state, copy.error, copy.transient = "failed", str(exc) or type(exc).__name__, True
            return
        except ValueError as exc:
            copy.state, copy.error = "failed", str(exc)
            return
        if copy.state == "failed":
            return
        if self.cancel_requested.is_set():
            copy.state = "cancelled"
            return
        if self.faults.corrupt:
            self._corrupt(copy)
        copy.state = "done"
        copy.change_id = copy.disk.change_id

    def _copy_full(self, copy: DiskCopy, started: float) -> None:
        copy.bytes_total = copy.disk.capacity_bytes
        if self.faults.rate_bits_per_second:
            # A slow source (VMware read over a WAN): block by block at the given rate, so progress moves
            # smoothly (nbdcopy keeps everything in flight at once and reports 0 % until the end).
            self._copy_blocks(copy, started, list(range(copy.disk.blocks)), self.faults.rate_bits_per_second)
            return
        read_fd, write_fd = os.pipe()
        source = [str(copy.disk.image)]
        proc = subprocess.Popen(  # noqa: S603 - fixed programs; the URL was validated
            [NBDCOPY, "--flush", f"--progress={write_fd}", *source, self._nbdcopy_target(copy)],
            pass_fds=(write_fd,),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(write_fd)
        with os.fdopen(read_fd) as progress:
            for line in progress:
                percent = int(line.split("/")[0]) if line.strip().split("/")[0].isdigit() else 0
                copy.bytes_done = copy.bytes_total * percent // 100
                copy.throughput_bps = int(copy.bytes_done / max(time.monotonic() - started, 1e-3))
                fault = self._fault(copy, percent)
                if fault or self.cancel_requested.is_set():
                    proc.kill()
                    if fault:
                        copy.state, copy.error = "failed", fault
                    break
        _, stderr = proc.communicate()
        if proc.returncode != 0 and copy.state != "failed" and not self.cancel_requested.is_set():
            copy.state, copy.error = "failed", f"nbdcopy exited {proc.returncode}: {stderr.decode()[-300:]}"
            copy.transient = True  # nbdcopy fails when its target does
        elif copy.state != "failed" and not self.cancel_requested.is_set():
            copy.bytes_done = copy.bytes_total
            copy.written = copy.bytes_total
            copy.digest = copy.disk.whole_digest()

    def _copy_changed(self, copy: DiskCopy, started: float) -> None:
        blocks = copy.disk.changed_since(copy.previous_change_id) or []
        copy.bytes_total = len(blocks) * BLOCK
        # The WAN link limits an incremental sync's changed blocks as it does a full copy.
        self._copy_blocks(copy, started, blocks, self.faults.rate_bits_per_second)

    def _copy_blocks(self, copy: DiskCopy, started: float, blocks: list[int], rate_bits: int | None = None) -> None:
        skip = min(copy.resume_skip(), len(blocks))
        with self._connect(copy) as conn, open(copy.disk.image, "rb") as src:
            for n, block in enumerate(blocks[skip:], start=skip + 1):
                if self.cancel_requested.is_set():
                    return
                src.seek(block * BLOCK)
                conn.pwrite(block * BLOCK, src.read(BLOCK))
                copy.written += BLOCK
                copy.bytes_done = n * BLOCK
                if rate_bits:
                    ahead = started + copy.written * 8 / rate_bits - time.monotonic()
                    if ahead > 0 and self.cancel_requested.wait(ahead):
                        return
                copy.throughput_bps = int(copy.written / max(time.monotonic() - started, 1e-3))
                if n % CHECKPOINT_BLOCKS == 0:
                    conn.flush()  # confirmed on the target: a resumed sync need not write these again
                    copy.checkpoint = f"{copy.mode}:{copy.disk.generation}:{n}"
                    copy.checkpoint_bytes = n * BLOCK
                fault = self._fault(copy, 100 * n // max(len(blocks), 1))
                if fault:
                    copy.state, copy.error = "failed", fault
                    return
            conn.flush()
        copy.checkpoint = f"{copy.mode}:{copy.disk.generation}:{len(blocks)}"
        copy.checkpoint_bytes = len(blocks) * BLOCK
        # What this sync wrote in all, including blocks an earlier, interrupted replication confirmed.
        copy.digest = digest_of(copy.disk.image, coalesce(blocks))

    def _connect(self, copy: DiskCopy) -> NbdConnection:
        """An open connection to the copy's export: over TLS with this VMA's key for an nbds:// URL."""
        match = NBD_URL_RE.fullmatch(copy.nbd_url)
        if match is None:
            raise ValueError(f"bad NBD URL {copy.nbd_url!r}")
        tls = None
        if match["scheme"] == "nbds":
            if self.tls_credentials is None:
                raise NbdError("nbds:// needs an NBD TLS key and this VMA has none")
            tls = tls_from_path(self.tls_credentials, match["identity"])
        conn = NbdConnection(match["host"].strip("[]"), int(match["port"]), tls=tls)
        try:
            conn.open(match["export"])
        except BaseException:
            conn.close()
            raise
        return conn

    def _nbdcopy_target(self, copy: DiskCopy) -> str:
        """nbdcopy's URI: libnbd takes the key file or certificate folder as a query parameter."""
        if copy.nbd_url.startswith("nbds://"):
            return f"{copy.nbd_url}?{libnbd_tls_query(Path(str(self.tls_credentials)))}"
        return copy.nbd_url

    def _corrupt(self, copy: DiskCopy) -> None:
        if copy.digest is None:
            return
        offset, length = copy.digest["ranges"][0]
        with self._connect(copy) as conn:
            conn.pwrite(offset, bytes(min(length, 4096)))
            conn.flush()


class VmaSimulator:
    """The state behind the HTTP API (usable directly in tests)."""

    version = "sim-1"

    def __init__(
        self, vms: list[SimVM], token: str, faults: Faults | None = None, tls_credentials: Path | None = None
    ) -> None:
        self.vms = {vm.id: vm for vm in vms}
        self.tls_credentials = tls_credentials  # this VMA's NBD TLS key file or certificate folder
        self.token = token
        self.faults = faults or Faults()
        self.replications: dict[str, Replication] = {}
        self.lock = threading.Lock()

    def start_replication(self, body: dict[str, Any]) -> tuple[int, Replication]:
        replication_id = str(body.get("replication_id", ""))
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", replication_id):
            raise ApiError(400, "bad_request", "replication_id must be 1-64 letters, digits, '.', '_' or '-'")
        with self.lock:
            if replication_id in self.replications:
                return 200, self.replications[replication_id]
            vm = self.vms.get(str(body.get("vm_id", "")))
            if vm is None:
                raise ApiError(404, "not_found", f"no VM {body.get('vm_id')!r}")
            if vm.power_state == "shuttingDown":
                raise ApiError(409, "conflict", f"{vm.name} is being shut down; sync it once it is off")
            running = [r for r in self.replications.values() if r.vm is vm and r.state in ("running", "cancelling")]
            if running:
                raise ApiError(409, "conflict", f"replication {running[0].id} of {vm.name} is running")
            disks = body.get("disks")
            if not isinstance(disks, list) or not disks:
                raise ApiError(400, "bad_request", "disks must be a non-empty list")
            copies = []
            for item in disks:
                disk = next((d for d in vm.disks if d.unit_number == item.get("unit_number")), None)
                if disk is None:
                    raise ApiError(404, "not_found", f"{vm.name} has no disk {item.get('unit_number')!r}")
                url = str(item.get("nbd_url", ""))
                match = NBD_URL_RE.fullmatch(url)
                if not match:
                    raise ApiError(
                        400,
                        "bad_request",
                        f"nbd_url {url!r} is not nbd://host:port/export or nbds://id@host:port/export",
                    )
                if match["scheme"] == "nbds" and self.tls_credentials is None:
                    raise ApiError(400, "bad_request", "nbds:// needs an NBD TLS key and this VMA has none")
                copies.append(
                    DiskCopy(
                        disk,
                        url,
                        str(item.get("previous_change_id") or ""),
                        resume_from=str(item.get("resume_from") or ""),
                    )
                )
            replication = Replication(replication_id, vm, copies, self.faults, self.tls_credentials)
            self.replications[replication_id] = replication
        replication.start()
        return 202, replication

    def get(self, replication_id: str) -> Replication:
        replication = self.replications.get(replication_id)
        if replication is None:
            raise ApiError(404, "not_found", f"no replication {replication_id}")
        return replication

    def restart(self) -> None:
        """What a VMA agent restart does: every copy stops where it is and every replication is forgotten
        (the portal asks again, with its checkpoints)."""
        for replication in list(self.replications.values()):
            replication.cancel_requested.set()
        for replication in list(self.replications.values()):
            for thread in replication.threads:
                thread.join(10)
        with self.lock:
            self.replications.clear()

    def vm(self, vm_id: str) -> SimVM:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise ApiError(404, "not_found", f"no VM {vm_id!r}")
        return vm

    def power(self, vm_id: str, body: dict[str, Any]) -> tuple[int, PowerState]:
        """A power action, as vCenter runs it: a guest shutdown goes through VMware Tools and takes a
        while (the guest flushes its last writes); power off and on are immediate."""
        vm = self.vm(vm_id)
        action = body.get("action")
        timeout = body.get("timeout_seconds", 300)
        if action not in ("shutdown", "off", "on") or not isinstance(timeout, int) or not 1 <= timeout <= 86400:
            raise ApiError(400, "bad_request", "action must be shutdown, off or on; timeout_seconds 1-86400")
        with self.lock:
            if action == "on":
                if vm.power_state == "shuttingDown":
                    raise ApiError(409, "conflict", f"{vm.name} is shutting down; power it on once it is off")
                vm.power_state, vm.power_action, vm.power_error = "poweredOn", "on", ""
                return 200, vm.power_json()
            if vm.power_state == "poweredOff" or (action == "shutdown" and vm.power_state == "shuttingDown"):
                return 200, vm.power_json()
            if action == "off":
                vm.power_state, vm.power_action, vm.power_error = "poweredOff", "off", ""
                return 200, vm.power_json()
            if not vm.tools_running:
                vm.power_action, vm.power_error = "shutdown", "VMware Tools are not running in the guest"
                raise ApiError(409, "tools_not_running", f"{vm.name}: VMware Tools are not running; no guest shutdown")
            vm.power_state, vm.power_action, vm.power_error = "shuttingDown", "shutdown", ""
        threading.Thread(target=self._shut_down, args=(vm, timeout), daemon=True).start()
        return 202, vm.power_json()

    def _shut_down(self, vm: SimVM, timeout: int) -> None:
        started = time.monotonic()
        takes = timeout + 1 if vm.shutdown_hangs else vm.shutdown_seconds
        while time.monotonic() - started < min(takes, timeout):
            time.sleep(0.05)
            if vm.power_state != "shuttingDown":
                return  # powered off by hand meanwhile
        with self.lock:
            if vm.power_state != "shuttingDown":
                return
            if takes > timeout:
                vm.power_state, vm.power_error = "poweredOn", f"the guest did not shut down within {timeout} s"
                return
            for disk in vm.disks:
                disk.guest_writes(vm.shutdown_change_pct)  # its last writes: the final sync carries them
            vm.power_state = "poweredOff"

    def cancel(self, replication_id: str) -> Replication:
        replication = self.get(replication_id)
        if replication.state == "running":
            replication.state = "cancelling"
            replication.cancel_requested.set()
        return replication

    def route(self, method: str, path: str, body: dict[str, Any], token: str) -> tuple[int, Mapping[str, object]]:
        if not hmac.compare_digest(token, f"Bearer {self.token}"):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token")
        parts = [p for p in urlparse(path).path.split("/") if p]
        if parts[:2] != ["api", "v1"]:
            raise ApiError(404, "not_found", f"no such endpoint {path}")
        parts = parts[2:]
        if method == "GET" and parts == ["health"]:
            active = sum(r.state == "running" for r in self.replications.values())
            return 200, {"status": "ok", "version": self.version, "active_replications": active}
        if method == "GET" and parts == ["inventory"]:
            return 200, {"vms": [vm.as_json() for vm in self.vms.values()]}
        if method == "GET" and len(parts) == 2 and parts[0] == "vms":
            return 200, self.vm(parts[1]).as_json()
        if method == "POST" and len(parts) == 3 and parts[0] == "vms" and parts[2] == "power":
            return self.power(parts[1], body)
        if method == "POST" and parts == ["replications"]:
            status, replication = self.start_replication(body)
            return status, replication.as_json()
        if method == "GET" and len(parts) == 2 and parts[0] == "replications":
            return 200, self.get(parts[1]).as_json()
        if method == "POST" and len(parts) == 3 and parts[0] == "replications" and parts[2] == "cancel":
            return 200, self.cancel(parts[1]).as_json()
        raise ApiError(404, "not_found", f"no such endpoint {method} {path}")

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
        sim = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as a real agent's HTTP server: a follower asking about its copies every tick
            # reuses its connections instead of opening one a call (over TLS, a handshake a call).
            protocol_version = "HTTP/1.1"

            def _handle(self, method: str) -> None:
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    raw = self.rfile.read(length) if length else b"{}"
                    try:
                        body = json.loads(raw or b"{}")
                    except ValueError as exc:
                        raise ApiError(400, "bad_request", "body is not JSON") from exc
                    if not isinstance(body, dict):
                        raise ApiError(400, "bad_request", "body must be a JSON object")
                    status, payload = sim.route(method, self.path, body, self.headers.get("Authorization", ""))
                except ApiError as exc:
                    status, payload = exc.status, {"error": {"code": exc.code, "message": exc.message}}
                data = json.dumps(payload).encode()
                if sim.faults.api_rtt_seconds:
                    time.sleep(sim.faults.api_rtt_seconds)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def log_message(self, *args: object) -> None:
                pass

        return SimServer((host, port), Handler)
