"""CloudStack ("OSSEA") volumes through PyPI ``cs``: signed API requests and async job polling.

The OMA is itself a CloudStack VM: each migrated disk becomes a data volume attached to it, and
KVM exposes it as ``/dev/disk/by-id/virtio-<first 20 hex chars of the volume uuid>`` (device ids
and /dev/vdX order are not reliable). The export must be withdrawn before a detach.

The account is shared with other tenants' volumes, so everything this portal creates carries an owner
tag (``oma-owner=<owner>``), and the backend lists, attaches, detaches and deletes only volumes that
carry it: a cleanup can never touch a volume the portal did not make.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from cs import CloudStack, CloudStackApiException, CloudStackException

from .compute import AttachedDisk, Choice, CloudVM, ComputeError, Nic
from .volumes import NAME_RE, Volume, VolumeError, by_id_serial, round_up_gib

GIB = 1 << 30
OWNER_TAG = "oma-owner"


class CloudStackVolumeBackend:
    name = "cloudstack"

    def __init__(
        self,
        *,
        endpoint: str,
        key: str,
        secret: str,
        zone_id: str,
        disk_offering_id: str,
        oma_vm_id: str,
        job_timeout: int = 300,
        poll_interval: float = 2.0,
        request_timeout: int = 30,
        device_root: str = "/dev/disk/by-id",
        device_timeout: float = 60,
        owner: str = "",
    ) -> None:
        if job_timeout < 1:
            # cs keeps whole seconds, and 0 would mean "wait forever".
            raise VolumeError(f"job_timeout must be at least 1 second, got {job_timeout}")
        self.api = CloudStack(
            endpoint=endpoint,
            key=key,
            secret=secret,
            timeout=request_timeout,
            job_timeout=job_timeout,
            poll_interval=poll_interval,
            retry=2,  # cs retries only list* and queryAsync* calls, which are safe to repeat
            fetch_result=True,
        )
        self.zone_id = zone_id
        self.disk_offering_id = disk_offering_id
        self.oma_vm_id = oma_vm_id
        self.job_timeout = job_timeout
        self.device_root = Path(device_root)
        self.device_timeout = device_timeout
        # Who created a volume: one portal installation (its nodes share it). Default: the OMA VM.
        self.owner = owner or f"oma-portal:{oma_vm_id}"

    def _call(self, command: str, **params: Any) -> Any:
        try:
            return getattr(self.api, command)(**params)
        except CloudStackApiException as exc:
            error = exc.error if isinstance(exc.error, dict) else {}
            code = error.get("errorcode", "?")
            text = error.get("errortext") or str(exc)
            raise VolumeError(f"CloudStack {command} failed ({code}): {text}") from exc
        except CloudStackException as exc:
            if "Timeout waiting for async job" in str(exc):
                raise VolumeError(f"CloudStack {command} did not finish within {self.job_timeout:g}s") from exc
            raise VolumeError(f"CloudStack {command} failed: {exc}") from exc
        except OSError as exc:
            raise VolumeError(f"CloudStack unreachable during {command}: {exc}") from exc

    @staticmethod
    def _volume(raw: dict[str, Any], device: str = "") -> Volume:
        return Volume(
            id=raw["id"],
            name=raw["name"],
            size_bytes=int(raw.get("size", 0)),
            attached_device=device,
            state=str(raw.get("state", "")),
        )

    @staticmethod
    def _owner_of(raw: dict[str, Any]) -> str | None:
        for tag in raw.get("tags") or []:
            if tag.get("key") == OWNER_TAG:
                return str(tag.get("value", ""))
        return None

    def _ours(self, raw: dict[str, Any]) -> bool:
        return self._owner_of(raw) == self.owner

    def _tag(self, volume_id: str) -> None:
        self._call(
            "createTags", resourceids=volume_id, resourcetype="Volume", tags={"key": OWNER_TAG, "value": self.owner}
        )

    def device_for(self, volume_id: str) -> str:
        return str(self.device_root / f"virtio-{by_id_serial(volume_id)}")

    def _raw(self, volume_id: str) -> dict[str, Any] | None:
        """The volume if it exists and this portal owns it; a volume of anyone else is refused."""
        found = self._call("listVolumes", id=volume_id, listall=True)
        volumes = found.get("volume", []) if isinstance(found, dict) else []
        if not volumes:
            return None
        if not self._ours(volumes[0]):
            raise VolumeError(
                f"volume {volumes[0].get('name', volume_id)} was not created by this portal; not touching it"
            )
        return volumes[0]

    def get_volume(self, volume_id: str) -> Volume | None:
        raw = self._raw(volume_id)
        if raw is None:
            return None
        attached = raw.get("virtualmachineid") == self.oma_vm_id
        return self._volume(raw, self.device_for(volume_id) if attached else "")

    def list_volumes(self) -> list[Volume]:
        """This portal's volumes only (by its owner tag), never another tenant's."""
        found = self._call(
            "listVolumes",
            zoneid=self.zone_id,
            type="DATADISK",
            listall=True,
            tags={"key": OWNER_TAG, "value": self.owner},
            fetch_list=True,
        )
        return [self._volume(raw) for raw in found if self._ours(raw)]

    def create_volume(self, name: str, size_bytes: int) -> Volume:
        """Find the named volume or create it (size rounded up to whole GiB); waits for the async job."""
        if not NAME_RE.fullmatch(name):
            raise VolumeError(f"volume name {name!r} must be 1-128 letters, digits, '.', '_' or '-'")
        size_gib = round_up_gib(size_bytes) // GIB
        existing = self.find_volume(name)
        if existing is not None:
            return existing
        result = self._call(
            "createVolume", name=name, zoneid=self.zone_id, diskofferingid=self.disk_offering_id, size=size_gib
        )
        self._tag(result["volume"]["id"])
        return self._volume(result["volume"])

    def find_volume(self, name: str) -> Volume | None:
        """The volume of that name this portal made, also one whose create finished after we stopped
        waiting (its owner tag was never set: it is tagged now; the names are ours, oma-<vm>-disk<n>).
        A volume of that name tagged by another portal is refused."""
        if not NAME_RE.fullmatch(name):
            raise VolumeError(f"volume name {name!r} must be 1-128 letters, digits, '.', '_' or '-'")
        existing = self._call("listVolumes", name=name, zoneid=self.zone_id, listall=True)
        for raw in existing.get("volume", []) if isinstance(existing, dict) else []:
            if raw["name"] != name or raw.get("state") in ("Destroy", "Expunging", "Expunged"):
                continue
            owner = self._owner_of(raw)
            if owner is None:
                self._tag(raw["id"])
            elif owner != self.owner:
                raise VolumeError(f"a volume named {name} belongs to another portal ({owner}); not using it")
            return self._volume(raw)
        return None

    def attach_volume(self, volume_id: str) -> str:
        """Attach to the OMA itself and return the by-id device once it has appeared. Idempotent."""
        raw = self._raw(volume_id)
        if raw is None:
            raise VolumeError(f"no CloudStack volume {volume_id}")
        owner = raw.get("virtualmachineid")
        if owner and owner != self.oma_vm_id:
            raise VolumeError(f"volume {raw['name']} is attached to another VM ({owner})")
        if not owner:
            self._call("attachVolume", id=volume_id, virtualmachineid=self.oma_vm_id)
        return self._wait_for_device(volume_id)

    def _wait_for_device(self, volume_id: str) -> str:
        device = self.device_for(volume_id)
        deadline = time.monotonic() + self.device_timeout
        while not os.path.exists(device):
            if time.monotonic() > deadline:
                raise VolumeError(f"{device} did not appear within {self.device_timeout:g}s after attach")
            time.sleep(0.2)
        return device

    def detach_volume(self, volume_id: str) -> None:
        """Detach from the OMA. The caller withdraws the volume's export first."""
        raw = self._raw(volume_id)
        if raw is None or not raw.get("virtualmachineid"):
            return
        if raw["virtualmachineid"] != self.oma_vm_id:
            raise VolumeError(f"volume {raw['name']} is attached to another VM; not detaching it")
        self._call("detachVolume", id=volume_id)

    def detach_from_node(self, volume_id: str, node_name: str, node_vm_id: str) -> None:
        """Take the volume from another OMA node that was lost (its VM ``node_vm_id``), so this one can
        attach it; nothing when it is not attached there (any more). Every node of one portal shares its
        owner tag (OMA_CLOUDSTACK_OWNER), or it could not touch the others' volumes."""
        if not node_vm_id:
            raise VolumeError(f"OMA node {node_name} never registered its CloudStack VM; detach its volumes by hand")
        raw = self._raw(volume_id)
        if raw is None or raw.get("virtualmachineid") != node_vm_id:
            return
        self._call("detachVolume", id=volume_id)

    def resize_volume(self, volume_id: str, size_bytes: int) -> Volume:
        """Grow the volume (resizeVolume, whole GiB, never shrink); KVM grows an attached one online."""
        raw = self._raw(volume_id)
        if raw is None:
            raise VolumeError(f"no CloudStack volume {volume_id}")
        size_gib = round_up_gib(size_bytes) // GIB
        if int(raw.get("size", 0)) >= size_gib * GIB:
            return self._volume(raw)
        result = self._call("resizeVolume", id=volume_id, size=size_gib, shrinkok=False)
        return self._volume(result["volume"])

    def delete_volume(self, volume_id: str) -> None:
        raw = self._raw(volume_id)
        if raw is None:
            return
        if raw.get("virtualmachineid"):
            raise VolumeError(f"volume {raw['name']} is attached; detach it first")
        self._call("deleteVolume", id=volume_id)


class CloudStackCompute:
    """Destination VMs through the API, on the volume backend's signed client and owner tag: the VMs it
    deploys carry the tag too, and it stops, destroys or moves volumes only on VMs it made."""

    name = "cloudstack"

    def __init__(self, volumes: CloudStackVolumeBackend, hypervisor: str = "KVM") -> None:
        self.volumes = volumes
        self.hypervisor = hypervisor

    def _call(self, command: str, **params: Any) -> Any:
        try:
            return self.volumes._call(command, **params)
        except ComputeError:
            raise
        except VolumeError as exc:
            raise ComputeError(str(exc)) from exc

    def check(self) -> None:
        self._call("listZones", id=self.volumes.zone_id)

    def networks(self) -> list[Choice]:
        found = self._call("listNetworks", zoneid=self.volumes.zone_id, listall=True, fetch_list=True)
        return [
            Choice(
                n["id"],
                n.get("name", n["id"]),
                isolated=n.get("type") == "Isolated" and not n.get("egressdefaultpolicy", False),
            )
            for n in found
        ]

    def offerings(self) -> list[Choice]:
        found = self._call("listServiceOfferings", fetch_list=True)
        return [
            Choice(
                o["id"],
                o.get("name", o["id"]),
                None if o.get("iscustomized") else o.get("cpunumber"),
                None if o.get("iscustomized") else o.get("memory"),
            )
            for o in found
        ]

    def templates(self) -> list[Choice]:
        found = self._call("listTemplates", templatefilter="executable", zoneid=self.volumes.zone_id, fetch_list=True)
        return [Choice(t["id"], t.get("name", t["id"]), boot=str(t.get("boottype", "")).lower()) for t in found]

    def _raw_vms(self, **params: Any) -> list[dict[str, Any]]:
        found = self._call("listVirtualMachines", listall=True, **params)
        return [
            v
            for v in (found.get("virtualmachine", []) if isinstance(found, dict) else [])
            if v.get("state") not in ("Destroyed", "Expunging")
        ]

    def _raw_vm(self, **params: Any) -> dict[str, Any] | None:
        vms = self._raw_vms(**params)
        if not vms:
            return None
        if self.volumes._owner_of(vms[0]) != self.volumes.owner:
            raise ComputeError(f"VM {vms[0].get('name', '?')} was not created by this portal; not touching it")
        return vms[0]

    def _attached(self, vm_id: str) -> list[dict[str, Any]]:
        found = self._call("listVolumes", virtualmachineid=vm_id, listall=True)
        return list(found.get("volume", []) if isinstance(found, dict) else [])

    def _claim(self, raw: dict[str, Any]) -> None:
        """Tag a VM this portal deployed, and its placeholder root (also after a deploy whose tagging a
        dead worker never did)."""
        if self.volumes._owner_of(raw) is None:
            self._tag(raw["id"], "UserVm")
        for volume in self._attached(raw["id"]):
            if volume.get("type") == "ROOT" and self.volumes._owner_of(volume) is None:
                self._tag(volume["id"], "Volume")

    def _tag(self, resource_id: str, kind: str) -> None:
        self._call(
            "createTags",
            resourceids=resource_id,
            resourcetype=kind,
            tags={"key": OWNER_TAG, "value": self.volumes.owner},
        )

    def _vm(self, raw: dict[str, Any]) -> CloudVM:
        disks = [
            AttachedDisk(v["id"], v.get("type", "DATADISK"), int(v.get("deviceid", -1)))
            for v in self._attached(raw["id"])
        ]
        snaps = self._call("listVMSnapshot", virtualmachineid=raw["id"], listall=True)
        snapshots = [s["id"] for s in (snaps.get("vmSnapshot", []) if isinstance(snaps, dict) else [])]
        return CloudVM(
            raw["id"], raw["name"], raw.get("state", ""), sorted(disks, key=lambda d: d.device_id), snapshots
        )

    def get_vm(self, vm_id: str) -> CloudVM | None:
        raw = self._raw_vm(id=vm_id)
        return self._vm(raw) if raw else None

    def find_vm(self, name: str) -> CloudVM | None:
        """The VM of that name this portal deployed. The names are ours (they end in the source VM's id),
        so an untagged one is a deploy whose tagging never happened: it is tagged now. Another portal's
        VM of that name is refused."""
        for raw in self._raw_vms(name=name):
            owner = self.volumes._owner_of(raw)
            if owner not in (None, self.volumes.owner):
                raise ComputeError(f"a VM named {name} belongs to another portal ({owner}); not using it")
            self._claim(raw)
            return self._vm(raw)
        return None

    def deploy_vm(
        self, name: str, *, template_id: str, offering_id: str, nics: list[Nic], cpus: int, memory_mib: int, efi: bool
    ) -> CloudVM:
        """deployVirtualMachine startvm=false with the mapped networks (MACs kept), the offering (a custom
        one sized to the source) and the source's boot type; tagged as ours. Idempotent on the name."""
        existing = self.find_vm(name)
        if existing is not None:
            settled = self._settled(existing)
            if settled.state == "Error":
                raise ComputeError(f"VM {name} is in Error after a failed deploy; roll back to remove it")
            return settled
        params: dict[str, Any] = {
            "zoneid": self.volumes.zone_id,
            "templateid": template_id,
            "serviceofferingid": offering_id,
            "name": name,
            "displayname": name,
            "startvm": False,
            "hypervisor": self.hypervisor,
            "details": {"cpuNumber": str(cpus), "memory": str(memory_mib)},
        }
        if efi:
            params.update(boottype="UEFI", bootmode="LEGACY")
        for index, nic in enumerate(nics):
            params[f"iptonetworklist[{index}].networkid"] = nic.network_id
            if nic.mac:
                params[f"iptonetworklist[{index}].mac"] = nic.mac
        result = self._call("deployVirtualMachine", **params)
        vm = result["virtualmachine"]
        self._claim(vm)
        return self._vm(vm)

    def _settled(self, vm: CloudVM) -> CloudVM:
        """A VM found by its name may still be deploying (its create job outlived a worker that died):
        wait, as that job would have, until it has settled, then claim what the deploy made."""
        deadline = time.monotonic() + self.volumes.job_timeout
        while vm.state in ("Starting", "Creating", "Stopping"):
            if time.monotonic() > deadline:
                raise ComputeError(f"VM {vm.name} is still {vm.state} after {self.volumes.job_timeout:g}s")
            time.sleep(self.volumes.api.poll_interval)
            raw = self._raw_vm(id=vm.id)
            if raw is None:
                raise ComputeError(f"VM {vm.name} went away while it was deploying")
            self._claim(raw)
            vm = self._vm(raw)
        return vm

    def _ours_or_placeholder(self, volume_id: str) -> dict[str, Any]:
        """A volume this portal made: a migrated disk, or the placeholder root of a VM it deployed."""
        found = self._call("listVolumes", id=volume_id, listall=True)
        volumes = found.get("volume", []) if isinstance(found, dict) else []
        if not volumes:
            raise ComputeError(f"no CloudStack volume {volume_id}")
        if not self.volumes._ours(volumes[0]):
            raise ComputeError(
                f"volume {volumes[0].get('name', volume_id)} was not created by this portal; not touching it"
            )
        return dict(volumes[0])

    def attach(self, volume_id: str, vm_id: str, device_id: int | None = None) -> None:
        raw = self._ours_or_placeholder(volume_id)
        if raw.get("virtualmachineid") == vm_id:
            return
        if self._raw_vm(id=vm_id) is None:
            raise ComputeError(f"no VM {vm_id} of this portal")
        params: dict[str, Any] = {"id": volume_id, "virtualmachineid": vm_id}
        if device_id is not None:
            params["deviceid"] = device_id
        self._call("attachVolume", **params)

    def detach(self, volume_id: str) -> None:
        raw = self._ours_or_placeholder(volume_id)
        owner = raw.get("virtualmachineid")
        if not owner:
            return
        if owner == self.volumes.oma_vm_id:
            raise ComputeError(f"volume {raw['name']} is on the OMA; the volume backend detaches it")
        if self._raw_vm(id=owner) is None:
            raise ComputeError(f"volume {raw['name']} is attached to a VM this portal did not make")
        self._call("detachVolume", id=volume_id)

    def delete_volume(self, volume_id: str) -> None:
        self._ours_or_placeholder(volume_id)
        self._call("deleteVolume", id=volume_id)

    def start_vm(self, vm_id: str) -> None:
        raw = self._raw_vm(id=vm_id)
        if raw is None:
            raise ComputeError(f"no VM {vm_id} of this portal")
        if raw.get("state") != "Running":
            self._call("startVirtualMachine", id=vm_id)

    def stop_vm(self, vm_id: str) -> None:
        raw = self._raw_vm(id=vm_id)
        if raw is not None and raw.get("state") not in ("Stopped", "Destroyed"):
            self._call("stopVirtualMachine", id=vm_id, forced=True)

    def destroy_vm(self, vm_id: str) -> None:
        raw = self._raw_vm(id=vm_id)
        if raw is not None:
            self._call("destroyVirtualMachine", id=vm_id, expunge=True)

    def snapshot_vm(self, vm_id: str, name: str) -> str:
        snaps = self._call("listVMSnapshot", virtualmachineid=vm_id, listall=True)
        for snap in snaps.get("vmSnapshot", []) if isinstance(snaps, dict) else []:
            if snap.get("name") == name or snap.get("displayname") == name:
                return str(snap["id"])
        if self._raw_vm(id=vm_id) is None:
            raise ComputeError(f"no VM {vm_id} of this portal")
        result = self._call("createVMSnapshot", virtualmachineid=vm_id, name=name, snapshotmemory=False)
        return str(result["vmsnapshot"]["id"])

    def revert_snapshot(self, snapshot_id: str) -> None:
        self._call("revertToVMSnapshot", vmsnapshotid=snapshot_id)

    def delete_snapshot(self, snapshot_id: str) -> None:
        found = self._call("listVMSnapshot", vmsnapshotid=snapshot_id, listall=True)
        if found.get("vmSnapshot") if isinstance(found, dict) else None:
            self._call("deleteVMSnapshot", vmsnapshotid=snapshot_id)
