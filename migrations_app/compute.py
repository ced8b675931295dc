"""Destination VMs, behind one interface (what failover needs of the cloud). Adapters only: no ORM here.

A failover creates the VM stopped from a placeholder template, takes its placeholder root away, moves
the migrated volumes onto it (disk 0 with device id 0, so it becomes the root) and starts it. The
``cloudstack`` adapter (``cloudstack.py``) does it through the API; ``local`` (the embedded default)
models the same cloud in the local volume root: VMs, networks, offerings and templates as JSON next to
the volumes, VM snapshots as copies of the volume files. Both enforce CloudStack's rules for moving
volumes (VolumeApiServiceImpl): a root volume moves only while its VM is stopped, no volume moves while
the VM has VM snapshots, device id 0 only on a VM without a root, and no VM starts without a root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .volumes import GIB, LocalVolumeBackend, Volume, VolumeError

CP = shutil.which("cp") or "/bin/cp"


class ComputeError(VolumeError):
    """The cloud refused or failed a VM operation; the message says why."""


@dataclass
class Choice:
    """A network, service offering or template the cloud offers."""

    id: str
    name: str
    cpus: int | None = None  # offerings: what they give (None: a custom offering, sized per VM)
    memory_mib: int | None = None
    isolated: bool = False  # networks: no route out (for test failovers)
    boot: str = ""  # templates: bios or efi


@dataclass
class AttachedDisk:
    volume_id: str
    type: str  # ROOT or DATADISK
    device_id: int


@dataclass
class CloudVM:
    id: str
    name: str
    state: str  # Stopped, Starting, Running, Stopping, Destroyed
    disks: list[AttachedDisk] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)

    @property
    def root(self) -> AttachedDisk | None:
        return next((d for d in self.disks if d.device_id == 0), None)


@dataclass
class Nic:
    network_id: str
    mac: str = ""  # kept from the source where the cloud allows it


class ComputeBackend(Protocol):
    name: str

    def check(self) -> None: ...
    def networks(self) -> list[Choice]: ...
    def offerings(self) -> list[Choice]: ...
    def templates(self) -> list[Choice]: ...
    def find_vm(self, name: str) -> CloudVM | None: ...
    def get_vm(self, vm_id: str) -> CloudVM | None: ...
    def deploy_vm(
        self, name: str, *, template_id: str, offering_id: str, nics: list[Nic], cpus: int, memory_mib: int, efi: bool
    ) -> CloudVM: ...
    def attach(self, volume_id: str, vm_id: str, device_id: int | None = None) -> None: ...
    def detach(self, volume_id: str) -> None: ...
    def delete_volume(self, volume_id: str) -> None: ...
    def start_vm(self, vm_id: str) -> None: ...
    def stop_vm(self, vm_id: str) -> None: ...
    def destroy_vm(self, vm_id: str) -> None: ...
    def snapshot_vm(self, vm_id: str, name: str) -> str: ...
    def revert_snapshot(self, snapshot_id: str) -> None: ...
    def delete_snapshot(self, snapshot_id: str) -> None: ...


def _id(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"oma-local-cloud/{name}"))


# The local cloud's catalogue (fixed ids, so the demo can map to them).
LOCAL_NETWORKS = [
    Choice(_id("net/prod"), "prod-net"),
    Choice(_id("net/storage"), "storage-net"),
    Choice(_id("net/test"), "test-isolated", isolated=True),
]
LOCAL_OFFERINGS = [
    Choice(_id("offering/small"), "Small (1 vCPU, 2 GiB)", 1, 2048),
    Choice(_id("offering/medium"), "Medium (2 vCPU, 4 GiB)", 2, 4096),
    Choice(_id("offering/large"), "Large (4 vCPU, 8 GiB)", 4, 8192),
    Choice(_id("offering/xlarge"), "XLarge (8 vCPU, 16 GiB)", 8, 16384),
    Choice(_id("offering/custom"), "Custom"),
]
LOCAL_TEMPLATES = [
    Choice(_id("template/bios"), "placeholder (BIOS)", boot="bios"),
    Choice(_id("template/efi"), "placeholder (UEFI)", boot="efi"),
]


class LocalComputeBackend:
    """The embedded cloud: VMs as ``vms/<id>.json`` beside the local volumes (one lock for both)."""

    name = "local"

    def __init__(self, volumes: LocalVolumeBackend) -> None:
        self.volumes = volumes
        self.dir = volumes.root / "vms"
        self.dir.mkdir(exist_ok=True)

    def _path(self, vm_id: str) -> Path:
        try:
            return self.dir / f"{uuid.UUID(vm_id)}.json"
        except ValueError as exc:
            raise ComputeError(f"not a VM id: {vm_id!r}") from exc

    def _load(self, vm_id: str) -> dict[str, Any]:
        try:
            raw: dict[str, Any] = json.loads(self._path(vm_id).read_text())
        except FileNotFoundError:
            raise ComputeError(f"no VM {vm_id}") from None
        return raw

    def _save(self, raw: dict[str, Any]) -> None:
        path = self._path(raw["id"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(raw))
        os.replace(tmp, path)

    def _vm(self, raw: dict[str, Any]) -> CloudVM:
        disks = [
            AttachedDisk(v.id, v.type, v.device_id if v.device_id is not None else -1)
            for v in self.volumes.list_volumes()
            if v.vm_id == raw["id"]
        ]
        return CloudVM(
            raw["id"],
            raw["name"],
            raw["state"],
            sorted(disks, key=lambda d: d.device_id),
            sorted(raw.get("snapshots", {})),
        )

    def check(self) -> None:
        if not self.dir.is_dir():
            raise ComputeError(f"the local cloud at {self.dir} is gone")

    def networks(self) -> list[Choice]:
        return list(LOCAL_NETWORKS)

    def offerings(self) -> list[Choice]:
        return list(LOCAL_OFFERINGS)

    def templates(self) -> list[Choice]:
        return list(LOCAL_TEMPLATES)

    def get_vm(self, vm_id: str) -> CloudVM | None:
        try:
            return self._vm(self._load(vm_id))
        except ComputeError:
            return None

    def find_vm(self, name: str) -> CloudVM | None:
        for path in sorted(self.dir.glob("*.json")):
            raw = json.loads(path.read_text())
            if raw["name"] == name and raw["state"] != "Destroyed":
                return self._vm(raw)
        return None

    def deploy_vm(
        self, name: str, *, template_id: str, offering_id: str, nics: list[Nic], cpus: int, memory_mib: int, efi: bool
    ) -> CloudVM:
        """Create the VM stopped, with a placeholder root from the template (idempotent on its name)."""
        existing = self.find_vm(name)
        if existing is not None:
            return existing
        if template_id not in {t.id for t in LOCAL_TEMPLATES}:
            raise ComputeError(f"no template {template_id}")
        offering = next((o for o in LOCAL_OFFERINGS if o.id == offering_id), None)
        if offering is None:
            raise ComputeError(f"no service offering {offering_id}")
        networks = {n.id for n in LOCAL_NETWORKS}
        if not nics or any(n.network_id not in networks for n in nics):
            raise ComputeError("every NIC needs one of the cloud's networks")
        with self.volumes._locked():
            raw: dict[str, Any] = {
                "id": str(uuid.uuid4()),
                "name": name,
                "state": "Stopped",
                "template_id": template_id,
                "offering_id": offering_id,
                "cpus": offering.cpus or cpus,
                "memory_mib": offering.memory_mib or memory_mib,
                "efi": efi,
                "nics": [asdict(n) for n in nics],
                "snapshots": {},
            }
            root = Volume(
                id=str(uuid.uuid4()), name=f"ROOT-{name}", size_bytes=GIB, vm_id=raw["id"], device_id=0, type="ROOT"
            )
            with open(self.volumes.image_path(root.id), "xb") as fh:
                fh.truncate(GIB)
            self.volumes._save(root)
            self._save(raw)
        return self._vm(raw)

    def attach(self, volume_id: str, vm_id: str, device_id: int | None = None) -> None:
        with self.volumes._locked():
            raw = self._load(vm_id)
            volume = self.volumes._require(volume_id)
            if volume.vm_id == vm_id:
                return
            if volume.vm_id or volume.attached_device:
                raise ComputeError(f"volume {volume.name} is attached elsewhere; detach it first")
            if raw.get("snapshots"):
                raise ComputeError("Unable to attach volume, please specify a VM that does not have VM snapshots")
            vm = self._vm(raw)
            if device_id == 0:
                if vm.root is not None:
                    raise ComputeError("Vm already has root volume attached to it")
                if raw["state"] != "Stopped":
                    raise ComputeError("a root volume is attached only while the VM is stopped")
                volume.type = "ROOT"
            else:
                used = {d.device_id for d in vm.disks}
                device_id = device_id if device_id is not None else next(i for i in range(1, 64) if i not in used)
                if device_id in used:
                    raise ComputeError(f"device id {device_id} is in use on {raw['name']}")
                volume.type = "DATADISK"
            volume.vm_id, volume.device_id = vm_id, device_id
            self.volumes._save(volume)

    def detach(self, volume_id: str) -> None:
        with self.volumes._locked():
            volume = self.volumes._require(volume_id)
            if not volume.vm_id:
                return
            raw = self._load(volume.vm_id)
            if raw.get("snapshots"):
                raise ComputeError("Unable to detach volume, please specify a VM that does not have VM snapshots")
            if volume.device_id == 0 and raw["state"] != "Stopped":
                raise ComputeError("a root volume is detached only while the VM is stopped")
            volume.vm_id, volume.device_id = "", None
            self.volumes._save(volume)

    def delete_volume(self, volume_id: str) -> None:
        self.volumes.delete_volume(volume_id)

    def start_vm(self, vm_id: str) -> None:
        with self.volumes._locked():
            raw = self._load(vm_id)
            if raw["state"] == "Running":
                return
            if self._vm(raw).root is None:
                raise ComputeError(f"VM {raw['name']} has no root volume; it cannot start")
            raw["state"] = "Running"
            self._save(raw)

    def stop_vm(self, vm_id: str) -> None:
        with self.volumes._locked():
            raw = self._load(vm_id)
            raw["state"] = "Stopped" if raw["state"] != "Destroyed" else "Destroyed"
            self._save(raw)

    def destroy_vm(self, vm_id: str) -> None:
        """Destroy the VM and expunge its placeholder root; a migrated volume still on it is refused."""
        with self.volumes._locked():
            try:
                raw = self._load(vm_id)
            except ComputeError:
                return
            if raw.get("snapshots"):
                raise ComputeError(f"VM {raw['name']} still has VM snapshots")
            for disk in self._vm(raw).disks:
                volume = self.volumes._require(disk.volume_id)
                if not volume.name.startswith("ROOT-"):
                    raise ComputeError(f"VM {raw['name']} still holds volume {volume.name}; detach it first")
                volume.vm_id, volume.device_id = "", None
                self.volumes._save(volume)
                self.volumes.image_path(volume.id).unlink(missing_ok=True)
                self.volumes._meta_path(volume.id).unlink()
            self._path(vm_id).unlink()

    def snapshot_vm(self, vm_id: str, name: str) -> str:
        """A disk-only VM snapshot: a sparse copy of each of its volumes."""
        with self.volumes._locked():
            raw = self._load(vm_id)
            for snapshot_id, snapshot in raw["snapshots"].items():
                if snapshot["name"] == name:
                    return str(snapshot_id)
            snapshot_id = str(uuid.uuid4())
            copies = {}
            for disk in self._vm(raw).disks:
                copy = self.dir / f"{snapshot_id}-{disk.volume_id}.img"
                _sparse_copy(self.volumes.image_path(disk.volume_id), copy)
                copies[disk.volume_id] = str(copy)
            raw["snapshots"][snapshot_id] = {"name": name, "copies": copies}
            self._save(raw)
            return snapshot_id

    def _snapshot_owner(self, snapshot_id: str) -> dict[str, Any] | None:
        for path in self.dir.glob("*.json"):
            raw: dict[str, Any] = json.loads(path.read_text())
            if snapshot_id in raw.get("snapshots", {}):
                return raw
        return None

    def revert_snapshot(self, snapshot_id: str) -> None:
        with self.volumes._locked():
            raw = self._snapshot_owner(snapshot_id)
            if raw is None:
                raise ComputeError(f"no VM snapshot {snapshot_id}")
            if raw["state"] != "Stopped":
                raise ComputeError("a VM is reverted to a snapshot only while it is stopped")
            for volume_id, copy in raw["snapshots"][snapshot_id]["copies"].items():
                _sparse_copy(Path(copy), self.volumes.image_path(volume_id))

    def delete_snapshot(self, snapshot_id: str) -> None:
        with self.volumes._locked():
            raw = self._snapshot_owner(snapshot_id)
            if raw is None:
                return
            for copy in raw["snapshots"].pop(snapshot_id)["copies"].values():
                Path(copy).unlink(missing_ok=True)
            self._save(raw)


def _sparse_copy(source: Path, target: Path) -> None:
    """Copy a volume file in place (the target keeps its inode: an export's link stays valid)."""
    proc = subprocess.run(  # noqa: S603 - fixed program, our own files
        [CP, "--sparse=always", str(source), str(target)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise ComputeError(f"copying {source.name} failed: {proc.stderr.strip()}")
