"""Destination volumes, behind one interface. Adapters only: no ORM here.

``local`` (embedded default): sparse files under a volume root, which is the privileged helper's
dev volume root. Attaching models what KVM does for a CloudStack volume: a stable by-id link
``<root>/by-id/virtio-<serial>`` appears (and goes away on detach), and exports point at that link,
so a volume detached to free its slot and attached again is served under the same export with no
helper write and no reload. ``loop=True`` (root only) attaches each file as a loop device instead.
The ``cloudstack`` backend (``cloudstack.py``) does the same against the cloud.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

GIB = 1 << 30
LOSETUP = shutil.which("losetup") or "/usr/sbin/losetup"
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


class VolumeError(Exception):
    """The volume backend refused or failed; the message says why."""


@dataclass
class Volume:
    id: str
    name: str
    size_bytes: int
    attached_device: str = ""  # attached to the OMA: the device it shows as
    vm_id: str = ""  # attached to a (destination) VM instead
    device_id: int | None = None  # its place on that VM (0: the root)
    type: str = "DATADISK"
    state: str = ""  # the cloud's word for it (CloudStack: Allocated, Ready, ...); local volumes have none
    attached_node: str = ""  # local volumes on a shared root: the OMA node it is attached to


class VolumeBackend(Protocol):
    name: str

    def create_volume(self, name: str, size_bytes: int) -> Volume: ...
    def attach_volume(self, volume_id: str) -> str: ...
    def detach_volume(self, volume_id: str) -> None: ...
    def delete_volume(self, volume_id: str) -> None: ...
    def resize_volume(self, volume_id: str, size_bytes: int) -> Volume: ...
    def get_volume(self, volume_id: str) -> Volume | None: ...
    def find_volume(self, name: str) -> Volume | None: ...
    def list_volumes(self) -> list[Volume]: ...
    def detach_from_node(self, volume_id: str, node_name: str, node_vm_id: str) -> None: ...


def by_id_serial(volume_id: str) -> str:
    """The virtio serial KVM shows for a CloudStack volume: its uuid without hyphens, 20 characters."""
    return volume_id.replace("-", "")[:20]


def volume_name_for(vm_id: str, unit_number: int) -> str:
    """The volume's name: one per VM disk, so a retry (or a cleanup) finds a volume whose create
    timed out on our side but finished on the cloud's."""
    return f"oma-{vm_id}-disk{unit_number}"


def round_up_gib(size_bytes: int) -> int:
    """CloudStack sizes volumes in whole GiB; local volumes follow, so both behave alike."""
    if size_bytes <= 0:
        raise VolumeError(f"volume size must be positive, got {size_bytes}")
    return -(-size_bytes // GIB) * GIB


class LocalVolumeBackend:
    """Sparse files under ``root``; ``<id>.img`` with its metadata in ``<id>.json``.

    Several OMA nodes may share one root (as CloudStack volumes are shared by every VM of a zone): each
    node then names itself (``node``) and has its own ``device_root`` for its by-id links, a volume is
    attached to one node at a time, and another node attaches it only once it was detached there."""

    name = "local"

    def __init__(
        self, root: Path | str, loop: bool = False, node: str = "", device_root: Path | str | None = None
    ) -> None:
        self.root = Path(root)
        self.loop = loop
        self.node = node
        self.device_root = Path(device_root) if device_root else self.root / "by-id"
        self.root.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / ".volumes.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _meta_path(self, volume_id: str) -> Path:
        try:
            parsed = uuid.UUID(volume_id)
        except ValueError as exc:
            raise VolumeError(f"not a volume id: {volume_id!r}") from exc
        return self.root / f"{parsed}.json"

    def image_path(self, volume_id: str) -> Path:
        return self._meta_path(volume_id).with_suffix(".img")

    def device_path(self, volume_id: str) -> Path:
        """Where the attached volume shows, as /dev/disk/by-id/virtio-<serial> does on a KVM guest."""
        return self.device_root / f"virtio-{by_id_serial(volume_id)}"

    def _save(self, volume: Volume) -> None:
        path = self._meta_path(volume.id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(volume)))
        os.replace(tmp, path)

    def get_volume(self, volume_id: str) -> Volume | None:
        try:
            return Volume(**json.loads(self._meta_path(volume_id).read_text()))
        except FileNotFoundError:
            return None

    def list_volumes(self) -> list[Volume]:
        return sorted(
            (Volume(**json.loads(p.read_text())) for p in self.root.glob("*.json")),
            key=lambda v: v.name,
        )

    def find_volume(self, name: str) -> Volume | None:
        with self._locked():
            return self._named(name)

    def _name_path(self, name: str) -> Path | None:
        """The name's entry in the index; None for a name no volume can have (never a path elsewhere:
        a valid name is letters, digits, '.', '_' and '-', and with the suffix never "." or "..")."""
        return self.root / "names" / f"{name}.id" if NAME_RE.fullmatch(name) else None

    def _named(self, name: str) -> Volume | None:
        """The volume with this name, through the name index (one file per name holding its volume's
        id), not by reading every volume's metadata: a fleet's root holds hundreds. Call it locked."""
        if not (self.root / "names").is_dir():
            self._index_names()
        entry = self._name_path(name)
        if entry is None:
            return None
        try:
            volume_id = entry.read_text().strip()
        except FileNotFoundError:
            return None
        try:
            volume = self.get_volume(volume_id)
        except VolumeError:
            return None
        return volume if volume is not None and volume.name == name else None

    def _index_names(self) -> None:
        """Index the names of a root made before the index, once, whole or not at all."""
        building = self.root / ".names.tmp"
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir()
        for volume in self.list_volumes():
            entry = self._name_path(volume.name)
            if entry is not None:  # (a metadata file's name never makes a path)
                (building / entry.name).write_text(volume.id)
        os.replace(building, self.root / "names")

    def _index(self, volume: Volume) -> None:
        path = self._name_path(volume.name)
        if path is None:
            raise VolumeError(f"volume name {volume.name!r} must be 1-128 letters, digits, '.', '_' or '-'")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(volume.id)
        os.replace(tmp, path)

    def create_volume(self, name: str, size_bytes: int) -> Volume:
        """Create the named volume, or return the one that already has this name (idempotent)."""
        if not NAME_RE.fullmatch(name):
            raise VolumeError(f"volume name {name!r} must be 1-128 letters, digits, '.', '_' or '-'")
        size = round_up_gib(size_bytes)
        with self._locked():
            volume = self._named(name)
            if volume is not None:
                if volume.size_bytes < size_bytes:
                    raise VolumeError(f"volume {name} exists with {volume.size_bytes} bytes, fewer than {size_bytes}")
                return volume
            volume = Volume(id=str(uuid.uuid4()), name=name, size_bytes=size)
            # The name first: a crash before the metadata leaves an entry that names no volume (ignored
            # and replaced), never a volume its name cannot find (a second one would be made).
            self._index(volume)
            with open(self.image_path(volume.id), "xb") as fh:
                fh.truncate(size)
            self._save(volume)
            return volume

    def attach_volume(self, volume_id: str) -> str:
        """The device to export: the image file itself, or a loop device when ``loop``. Idempotent."""
        with self._locked():
            volume = self._require(volume_id)
            if volume.attached_device and volume.attached_node not in ("", self.node):
                raise VolumeError(
                    f"volume {volume.name} is attached to OMA node {volume.attached_node}; detach it there first"
                )
            if volume.attached_device:
                return volume.attached_device
            if volume.vm_id:
                raise VolumeError(f"volume {volume.name} is attached to VM {volume.vm_id}; detach it first")
            image = self.image_path(volume_id)
            if not self.loop:
                device = self.device_path(volume_id)
                device.parent.mkdir(parents=True, exist_ok=True)
                tmp = device.with_name(f".{device.name}.tmp")
                tmp.unlink(missing_ok=True)
                tmp.symlink_to(image)
                os.replace(tmp, device)
                volume.attached_device = str(device)
            else:
                proc = subprocess.run(  # noqa: S603 - fixed program, our own file path
                    [LOSETUP, "--find", "--show", str(image)], capture_output=True, text=True, check=False
                )
                if proc.returncode != 0:
                    raise VolumeError(f"losetup failed for {image}: {proc.stderr.strip()}")
                volume.attached_device = proc.stdout.strip()
            volume.attached_node = self.node
            self._save(volume)
            return volume.attached_device

    def detach_volume(self, volume_id: str) -> None:
        with self._locked():
            volume = self._require(volume_id)
            if not volume.attached_device:
                return
            if volume.attached_node not in ("", self.node):
                raise VolumeError(f"volume {volume.name} is attached to OMA node {volume.attached_node}; not detaching")
            self._detach(volume)

    def detach_from_node(self, volume_id: str, node_name: str, node_vm_id: str) -> None:
        """Take the volume from another OMA node that was lost (as CloudStack detaches a volume from a VM
        that is gone); nothing when it is not attached there (any more)."""
        with self._locked():
            volume = self._require(volume_id)
            if not volume.attached_device or volume.attached_node != node_name:
                return
            self._detach(volume)

    def _detach(self, volume: Volume) -> None:
        if volume.attached_device:
            if self.loop:
                proc = subprocess.run(  # noqa: S603
                    [LOSETUP, "-d", volume.attached_device], capture_output=True, text=True, check=False
                )
                if proc.returncode != 0 and "No such device" not in proc.stderr:
                    raise VolumeError(f"losetup -d {volume.attached_device} failed: {proc.stderr.strip()}")
            else:
                # The link it was attached as (on whichever node); our own metadata names it.
                link = Path(volume.attached_device)
                if link.is_symlink() and link.resolve() == self.image_path(volume.id).resolve():
                    link.unlink()
        volume.attached_device, volume.attached_node = "", ""
        self._save(volume)

    def resize_volume(self, volume_id: str, size_bytes: int) -> Volume:
        """Grow the volume to at least ``size_bytes`` (whole GiB), attached or not; never shrink it."""
        size = round_up_gib(size_bytes)
        with self._locked():
            volume = self._require(volume_id)
            if volume.size_bytes >= size:
                return volume
            with open(self.image_path(volume_id), "r+b") as fh:
                fh.truncate(size)
            if self.loop and volume.attached_device:
                subprocess.run([LOSETUP, "-c", volume.attached_device], check=False)  # noqa: S603
            volume.size_bytes = size
            self._save(volume)
            return volume

    def delete_volume(self, volume_id: str) -> None:
        with self._locked():
            volume = self.get_volume(volume_id)
            if volume is None:
                return
            if volume.attached_device or volume.vm_id:
                where = volume.attached_device or f"VM {volume.vm_id}"
                raise VolumeError(f"volume {volume.name} is attached to {where}; detach it first")
            self.image_path(volume_id).unlink(missing_ok=True)
            self._meta_path(volume_id).unlink()
            entry = self._name_path(volume.name)
            with contextlib.suppress(FileNotFoundError):
                if entry is not None and entry.read_text().strip() == volume.id:
                    entry.unlink()

    def _require(self, volume_id: str) -> Volume:
        volume = self.get_volume(volume_id)
        if volume is None:
            raise VolumeError(f"no volume {volume_id}")
        return volume
