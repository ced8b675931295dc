"""The VMA simulator served on a loopback port, and helpers to drive and check its copies."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

from devtools.vma_sim import Faults, SimVM, VmaSimulator, demo_inventory
from exports import actions
from migrations_app.vma_client import DiskProgress, Replication, ReplicationTarget, VmaClient
from tests.support.nbd import RunningServer

TOKEN = "sim-token-for-tests"


class Sim:
    def __init__(self, tmp_path: Path, faults: Faults | None = None, size_mib: int = 16) -> None:
        self.vms = demo_inventory(tmp_path / "vma", size_mib=size_mib)
        self.sim = VmaSimulator(self.vms, TOKEN, faults)
        self.server = self.sim.serve()
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.client = VmaClient(self.url, TOKEN, timeout=5)
        self.closed = False

    def vm(self, name: str) -> SimVM:
        return next(vm for vm in self.vms if vm.name == name)

    def go_offline(self) -> None:
        """The VMA becomes unreachable (its copies go on, as a real agent's would behind a dead link)."""
        self.server.shutdown()
        self.server.server_close()

    def come_back(self) -> None:
        """Reachable again on the same port, with the same replications."""
        self.server = self.sim.serve(port=int(self.url.rsplit(":", 1)[1]))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.client.close()
        self.server.shutdown()
        self.server.server_close()


class ExportedDisk(ReplicationTarget):
    device: str  # the volume behind the export, to compare with the source


def export_disks(server: RunningServer, vm: SimVM, sim: Sim) -> list[ExportedDisk]:
    """Volumes and exports for every disk of ``vm``; returns the replication's disk list, with the URLs
    the portal would hand the VMA (nbds:// with the VMA's identity when the server requires TLS)."""
    sim.sim.tls_credentials = server.layout.vma_tls if server.layout.tls else None
    disks: list[ExportedDisk] = []
    for disk in vm.disks:
        device = server.volume(f"{vm.name}-{disk.unit_number}.img", size=disk.capacity_bytes)
        mapping = actions.ensure_export(vm_id=vm.id, vm_name=vm.name, disk_unit=disk.unit_number, device=device)
        url = server.vma_url(mapping.export_name)
        disks.append({"unit_number": disk.unit_number, "nbd_url": url, "previous_change_id": "", "device": device})
    return disks


def wait_done(client: VmaClient, replication_id: str, timeout: float = 60) -> Replication:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.replication(replication_id)
        if state["state"] not in ("running", "cancelling"):
            return state
        time.sleep(0.05)
    raise AssertionError(f"replication {replication_id} still {state['state']}")


def sha(path: str | Path, length: int | None = None) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read(length) if length else fh.read()).hexdigest()


SimFactory = Callable[..., Sim]


def progress(unit: int, done: int, total: int, rate: int, change_id: str = "") -> DiskProgress:
    """One disk's progress as the VMA reports it, mid-copy."""
    return {
        "unit_number": unit,
        "state": "copying",
        "mode": "full",
        "bytes_done": done,
        "bytes_total": total,
        "throughput_bps": rate,
        "change_id": change_id,
    }
