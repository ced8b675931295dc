"""A fake CloudStack API server that speaks the real wire protocol, for the volume backend's tests.

It verifies request signatures the way CloudStack's ApiServer does (parameters sorted by name,
values URL-encoded, the whole string lower-cased, HMAC-SHA1 with the secret key, base64; and the
``expires`` deadline of signatureVersion 3), runs createVolume/attachVolume/detachVolume as async
jobs that stay pending for a number of polls, and models volume states. Faults can be injected.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlparse

# Hypervisors on which CloudStack moves a root volume between VMs (VolumeApiServiceImpl).
ROOT_MOVE_HYPERVISORS = {"KVM", "XenServer", "VMware"}


def cloudstack_signature(params: dict[str, str], secret: str) -> str:
    unsigned = "&".join(f"{k}={quote(v, safe='.-*_')}" for k, v in sorted(params.items()) if k != "signature")
    digest = hmac.new(secret.encode(), unsigned.lower().encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


class FakeCloudStack:
    def __init__(
        self,
        device_root: Path,
        key: str = "test-api-key",
        secret: str = "test-secret-key",
        data_dir: Path | None = None,
    ) -> None:
        self.key, self.secret = key, secret
        self.device_root = device_root
        # Volumes are real sparse files here; an attached volume's by-id link points at its file.
        self.data_dir = data_dir or device_root.parent / "cloudstack-volumes"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.zone_id = str(uuid.uuid4())
        self.offering_id = str(uuid.uuid4())
        self.oma_vm_id = str(uuid.uuid4())
        self.volumes: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.requests: list[str] = []
        self.pending_polls = 2  # polls answered "pending" before a job finishes
        self.job_seconds: dict[str, float] = {}  # command -> at least this long before its job finishes
        self.job_failures: dict[str, tuple[int, str]] = {}  # command -> async failure (530, 533, ...)
        self.sync_failures: dict[str, tuple[int, str]] = {}  # command -> immediate error (431, ...)
        self.stall = False  # jobs never finish
        # Destination VMs, their VM snapshots, and what a deploy can choose from.
        self.vms: dict[str, dict[str, Any]] = {}
        self.vm_snapshots: dict[str, dict[str, Any]] = {}
        self.hypervisor = "KVM"
        self.networks = [
            {"id": str(uuid.uuid4()), "name": name, "type": kind, "zoneid": self.zone_id}
            for name, kind in (("prod-net", "Shared"), ("storage-net", "Shared"), ("test-isolated", "Isolated"))
        ]
        self.service_offerings = [
            {"id": str(uuid.uuid4()), "name": "Medium", "cpunumber": 2, "memory": 4096, "iscustomized": False},
            {"id": str(uuid.uuid4()), "name": "Large", "cpunumber": 4, "memory": 8192, "iscustomized": False},
            {"id": str(uuid.uuid4()), "name": "Custom", "iscustomized": True},
        ]
        self.templates = [
            {"id": str(uuid.uuid4()), "name": "placeholder-bios", "boottype": "BIOS"},
            {"id": str(uuid.uuid4()), "name": "placeholder-uefi", "boottype": "UEFI"},
        ]
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/client/api"

    def start(self) -> FakeCloudStack:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- the API -------------------------------------------------------------------------

    def handle(self, params: dict[str, str]) -> tuple[int, dict[str, Any]]:
        command = params.get("command", "")
        key = command.lower() + "response"
        if params.get("apiKey") != self.key or not hmac.compare_digest(
            params.get("signature", ""), cloudstack_signature(params, self.secret)
        ):
            return 401, {
                key: {"errorcode": 401, "errortext": "unable to verify user credentials and/or request signature"}
            }
        if params.get("signatureVersion") == "3":
            expires = dt.datetime.strptime(params.get("expires", ""), "%Y-%m-%dT%H:%M:%S%z")
            if expires < dt.datetime.now(dt.UTC):
                return 401, {key: {"errorcode": 401, "errortext": "signature expired"}}
        with self.lock:
            self._advance()
            self.requests.append(command)
            if command in self.sync_failures:
                code, text = self.sync_failures.pop(command)
                return code, {key: {"errorcode": code, "errortext": text}}
            handler = getattr(self, f"api_{command}", None)
            if handler is None:
                return 432, {key: {"errorcode": 432, "errortext": f"The given command {command} does not exist"}}
            return handler(params, key)

    def _job(self, command: str, work: Any, undo: Any = None) -> str:
        job_id = str(uuid.uuid4())
        self.jobs[job_id] = {"command": command, "work": work, "undo": undo, "polls": 0, "started": time.monotonic()}
        return job_id

    def api_queryAsyncJobResult(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        job = self.jobs.get(params.get("jobid", ""))
        if job is None:
            return 431, {key: {"errorcode": 431, "errortext": "no such job"}}
        job["polls"] += 1
        body: dict[str, Any] = {"jobid": params["jobid"], "jobstatus": 0, "jobresultcode": 0}
        slow = time.monotonic() - job["started"] < self.job_seconds.get(job["command"], 0)
        if self.stall or job["polls"] <= self.pending_polls or slow:
            return 200, {key: body}
        if "result" not in job:
            failure = self.job_failures.pop(job["command"], None)
            if failure:
                job["result"] = (2, failure[0], {"errorcode": failure[0], "errortext": failure[1]})
                if job["undo"] is not None:
                    job["undo"]()
            else:
                try:
                    job["result"] = (1, 0, job["work"]())
                except ValueError as exc:  # the cloud refused the work itself: the job fails
                    job["result"] = (2, 530, {"errorcode": 530, "errortext": str(exc)})
        status, code, result = job["result"]
        body.update(jobstatus=status, jobresultcode=code, jobresulttype="object", jobresult=result)
        return 200, {key: body}

    def _advance(self) -> None:
        """The cloud runs its jobs on its own, polled or not: one whose caller went away (a worker killed
        mid-call) still finishes, once its modelled time (or two seconds) has passed."""
        if self.stall:
            return
        now = time.monotonic()
        for job in self.jobs.values():
            due = job["started"] + max(self.job_seconds.get(job["command"], 0), 2.0)
            if "result" not in job and now >= due and job["command"] not in self.job_failures:
                try:
                    job["result"] = (1, 0, job["work"]())
                except ValueError as exc:
                    job["result"] = (2, 530, {"errorcode": 530, "errortext": str(exc)})

    def finish_jobs(self) -> None:
        """The cloud finishes every job still pending, as it does after a caller gave up waiting."""
        with self.lock:
            for job in self.jobs.values():
                if "result" not in job:
                    job["result"] = (1, 0, job["work"]())

    def api_listVolumes(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        wanted = {
            params[f"tags[{i}].key"]: params.get(f"tags[{i}].value", "")
            for i in range(10)
            if f"tags[{i}].key" in params
        }
        found = [
            v
            for v in self.volumes.values()
            if params.get("id", v["id"]) == v["id"]
            and params.get("name", v["name"]) == v["name"]
            and params.get("type", v["type"]) == v["type"]
            and params.get("virtualmachineid", v.get("virtualmachineid")) == v.get("virtualmachineid")
            and all(
                {"key": k, "value": val} in [{"key": t["key"], "value": t["value"]} for t in v["tags"]]
                for k, val in wanted.items()
            )
        ]
        page, size = int(params.get("page", 1)), int(params.get("pagesize", 500))
        found = found[(page - 1) * size : page * size]
        return 200, {key: {"count": len(found), "volume": found} if found else {}}

    def api_createVolume(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        if params.get("zoneid") != self.zone_id or params.get("diskofferingid") != self.offering_id:
            return 431, {key: {"errorcode": 431, "errortext": "Unable to find zone or disk offering"}}
        volume_id = str(uuid.uuid4())
        size = int(params["size"]) << 30
        # CloudStack records the volume when it accepts the call (listVolumes shows it at once); its job
        # then allocates it. A job that fails takes the record away again.
        volume: dict[str, Any] = {
            "id": volume_id,
            "name": params["name"],
            "size": size,
            "state": "Creating",
            "type": "DATADISK",
            "tags": [],
        }
        self.volumes[volume_id] = volume
        with open(self.file_of(volume_id), "wb") as fh:
            fh.truncate(size)

        def work() -> dict[str, Any]:
            volume["state"] = "Allocated"
            return {"volume": dict(volume)}

        def undo() -> None:
            self.volumes.pop(volume_id, None)
            self.file_of(volume_id).unlink(missing_ok=True)

        return 200, {key: {"id": volume_id, "jobid": self._job("createVolume", work, undo)}}

    def api_attachVolume(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        volume = self.volumes.get(params.get("id", ""))
        if volume is None or volume.get("virtualmachineid"):
            return 431, {key: {"errorcode": 431, "errortext": "volume not found or already attached"}}
        if params.get("virtualmachineid") != self.oma_vm_id:
            return self._attach_to_vm(volume, params, key)

        def work() -> dict[str, Any]:
            # A volume that was a VM's root joins the OMA as a data disk.
            volume.update(
                virtualmachineid=params["virtualmachineid"], state="Ready", deviceid=len(self.volumes), type="DATADISK"
            )
            # What KVM does on hot-plug: the by-id link appears.
            self.device_of(volume["id"]).symlink_to(self.file_of(volume["id"]))
            return {"volume": dict(volume)}

        return 200, {key: {"jobid": self._job("attachVolume", work)}}

    def api_detachVolume(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        volume = self.volumes.get(params.get("id", ""))
        if volume is None or not volume.get("virtualmachineid"):
            return 431, {key: {"errorcode": 431, "errortext": "volume is not attached"}}
        if volume["virtualmachineid"] != self.oma_vm_id:
            return self._detach_from_vm(volume, key)

        def work() -> dict[str, Any]:
            volume.pop("virtualmachineid", None)
            volume.pop("deviceid", None)
            self.device_of(volume["id"]).unlink(missing_ok=True)
            return {"volume": dict(volume)}

        return 200, {key: {"jobid": self._job("detachVolume", work)}}

    def api_resizeVolume(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        volume = self.volumes.get(params.get("id", ""))
        if volume is None:
            return 431, {key: {"errorcode": 431, "errortext": "Unable to find volume"}}
        size = int(params.get("size", 0)) << 30
        if size < volume["size"] and params.get("shrinkok") != "true":
            return 431, {key: {"errorcode": 431, "errortext": "Going from existing size to new size is shrinking"}}

        def work() -> dict[str, Any]:
            volume["size"] = size
            with open(self.file_of(volume["id"]), "r+b") as fh:
                fh.truncate(size)
            return {"volume": dict(volume)}

        return 200, {key: {"jobid": self._job("resizeVolume", work)}}

    def api_createTags(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        kind = params.get("resourcetype")
        if kind not in ("Volume", "UserVm"):
            return 431, {key: {"errorcode": 431, "errortext": "only Volume and UserVm tags are modelled"}}
        store = self.volumes if kind == "Volume" else self.vms
        volumes = [store.get(rid) for rid in params.get("resourceids", "").split(",")]
        if not volumes or None in volumes:
            return 431, {key: {"errorcode": 431, "errortext": "Unable to find resource by id"}}
        tags = [
            {"key": params[f"tags[{i}].key"], "value": params.get(f"tags[{i}].value", "")}
            for i in range(10)
            if f"tags[{i}].key" in params
        ]

        def work() -> dict[str, Any]:
            for volume in volumes:
                assert volume is not None
                for tag in tags:
                    if any(t["key"] == tag["key"] for t in volume["tags"]):
                        raise ValueError(f"tag {tag['key']} already exists")  # CloudStack refuses a second one
                    volume["tags"].append({**tag, "resourcetype": kind, "resourceid": volume["id"]})
            return {"success": True}

        return 200, {key: {"jobid": self._job("createTags", work)}}

    def add_foreign_volume(self, name: str, owner: str | None = None, attached_to: str | None = None) -> str:
        """Another tenant's volume (or an untagged one) in the same account and zone."""
        volume_id = str(uuid.uuid4())
        tags = (
            [{"key": "oma-owner", "value": owner, "resourcetype": "Volume", "resourceid": volume_id}] if owner else []
        )
        volume: dict[str, Any] = {
            "id": volume_id,
            "name": name,
            "size": 1 << 30,
            "state": "Ready",
            "type": "DATADISK",
            "tags": tags,
        }
        if attached_to:
            volume["virtualmachineid"] = attached_to
        with self.lock:
            self.volumes[volume_id] = volume
        return volume_id

    def api_deleteVolume(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        volume = self.volumes.get(params.get("id", ""))
        if volume is None:
            return 431, {key: {"errorcode": 431, "errortext": "Unable to find volume"}}
        if volume.get("virtualmachineid"):
            return 431, {key: {"errorcode": 431, "errortext": "Please specify a volume that is not attached to any VM"}}
        del self.volumes[volume["id"]]
        self.file_of(volume["id"]).unlink(missing_ok=True)
        return 200, {key: {"success": "true"}}

    # --- destination VMs (CloudStack's rules from VolumeApiServiceImpl and its attach validator) ----

    def _error(self, key: str, text: str, code: int = 431) -> tuple[int, dict[str, Any]]:
        return code, {key: {"errorcode": code, "errortext": text}}

    def _vm_snapshots_of(self, vm_id: str) -> list[dict[str, Any]]:
        return [s for s in self.vm_snapshots.values() if s["virtualmachineid"] == vm_id]

    def _root_of(self, vm_id: str) -> dict[str, Any] | None:
        return next(
            (v for v in self.volumes.values() if v.get("virtualmachineid") == vm_id and v.get("deviceid") == 0), None
        )

    def _attach_to_vm(self, volume: dict[str, Any], params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        vm = self.vms.get(params.get("virtualmachineid", ""))
        if vm is None:
            return self._error(key, "Unable to find virtual machine")
        if self._vm_snapshots_of(vm["id"]):
            return self._error(key, "Unable to attach volume, please specify a VM that does not have VM snapshots")
        device = params.get("deviceid")
        if device == "0":
            if self._root_of(vm["id"]) is not None:
                return self._error(key, "Vm already has root volume attached to it")
            if vm["state"] != "Stopped" or vm["hypervisor"] not in ROOT_MOVE_HYPERVISORS:
                return self._error(
                    key, "Root volume can be attached only when the VM is Stopped on KVM/XenServer/VMware"
                )
        used = {v.get("deviceid") for v in self.volumes.values() if v.get("virtualmachineid") == vm["id"]}
        device_id = int(device) if device is not None else next(i for i in range(1, 64) if i not in used and i != 3)
        if device_id in used:
            return self._error(key, f"deviceId {device_id} is used by VM {vm['name']}")

        def work() -> dict[str, Any]:
            volume.update(virtualmachineid=vm["id"], deviceid=device_id, state="Ready")
            volume["type"] = "ROOT" if device_id == 0 else "DATADISK"
            return {"volume": dict(volume)}

        return 200, {key: {"jobid": self._job("attachVolume", work)}}

    def _detach_from_vm(self, volume: dict[str, Any], key: str) -> tuple[int, dict[str, Any]]:
        vm = self.vms[volume["virtualmachineid"]]
        if self._vm_snapshots_of(vm["id"]):
            return self._error(key, "Unable to detach volume, please specify a VM that does not have VM snapshots")
        if volume.get("deviceid") == 0 and (vm["state"] != "Stopped" or vm["hypervisor"] not in ROOT_MOVE_HYPERVISORS):
            return self._error(key, "Root volume detach is supported only for a Stopped VM on KVM/XenServer/VMware")

        def work() -> dict[str, Any]:
            volume.pop("virtualmachineid", None)
            volume.pop("deviceid", None)
            return {"volume": dict(volume)}

        return 200, {key: {"jobid": self._job("detachVolume", work)}}

    def api_listZones(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        return 200, {key: {"count": 1, "zone": [{"id": self.zone_id, "name": "zone1"}]}}

    def api_listNetworks(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        return 200, {key: {"count": len(self.networks), "network": self.networks}}

    def api_listServiceOfferings(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        return 200, {key: {"count": len(self.service_offerings), "serviceoffering": self.service_offerings}}

    def api_listTemplates(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        if params.get("templatefilter") not in ("executable", "self", "featured", "community", "all"):
            return self._error(key, "templatefilter is required")
        return 200, {key: {"count": len(self.templates), "template": self.templates}}

    def _vm_json(self, vm: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in vm.items() if k != "files"}

    def api_deployVirtualMachine(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        if params.get("zoneid") != self.zone_id:
            return self._error(key, "Unable to find zone")
        template = next((t for t in self.templates if t["id"] == params.get("templateid")), None)
        offering = next((o for o in self.service_offerings if o["id"] == params.get("serviceofferingid")), None)
        if template is None or offering is None:
            return self._error(key, "Unable to find template or service offering")
        if offering["iscustomized"] and not (params.get("details[0].cpuNumber") and params.get("details[0].memory")):
            return self._error(key, "a custom offering needs details cpuNumber and memory")
        known = {n["id"] for n in self.networks}
        nics = []
        for i in range(16):
            network = params.get(f"iptonetworklist[{i}].networkid")
            if network is None:
                break
            if network not in known:
                return self._error(key, f"Unable to find network {network}")
            mac = params.get(f"iptonetworklist[{i}].mac") or "02:00:" + ":".join(
                f"{b:02x}" for b in uuid.uuid4().bytes[:4]
            )
            nics.append({"networkid": network, "macaddress": mac, "deviceid": str(i)})
        if not nics:
            return self._error(key, "a network is required")
        if any(v["name"] == params.get("name") for v in self.vms.values()):
            return self._error(key, f"The vm with hostname {params.get('name')} already exists", 431)
        vm_id = str(uuid.uuid4())
        # CloudStack records the VM when it accepts the call (listVirtualMachines shows it, Starting);
        # its job then allocates the root volume and leaves it Stopped (or starts it).
        vm: dict[str, Any] = {
            "id": vm_id,
            "name": params.get("name", vm_id),
            "state": "Starting",
            "hypervisor": params.get("hypervisor", self.hypervisor),
            "templateid": template["id"],
            "serviceofferingid": offering["id"],
            "cpunumber": int(str(params.get("details[0].cpuNumber") or offering.get("cpunumber") or 0)),
            "memory": int(str(params.get("details[0].memory") or offering.get("memory") or 0)),
            "boottype": params.get("boottype", "BIOS"),
            "nic": nics,
            "tags": [],
        }

        def work() -> dict[str, Any]:
            root_id = str(uuid.uuid4())
            self.volumes[root_id] = {
                "id": root_id,
                "name": f"ROOT-{vm['name']}",
                "size": 1 << 30,
                "state": "Ready",
                "type": "ROOT",
                "tags": [],
                "virtualmachineid": vm_id,
                "deviceid": 0,
            }
            with open(self.file_of(root_id), "wb") as fh:
                fh.truncate(1 << 30)
            vm["state"] = "Running" if params.get("startvm", "true") == "true" else "Stopped"
            return {"virtualmachine": self._vm_json(vm)}

        def undo() -> None:
            vm["state"] = "Error"  # a failed deploy leaves the VM in Error until it is destroyed

        self.vms[vm_id] = vm
        return 200, {key: {"id": vm_id, "jobid": self._job("deployVirtualMachine", work, undo)}}

    def api_listVirtualMachines(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        found = [
            self._vm_json(v)
            for v in self.vms.values()
            if params.get("id", v["id"]) == v["id"] and params.get("name", v["name"]) == v["name"]
        ]
        return 200, {key: {"count": len(found), "virtualmachine": found} if found else {}}

    def _vm_job(self, command: str, params: dict[str, str], key: str, work: Any) -> tuple[int, dict[str, Any]]:
        vm = self.vms.get(params.get("id", "") or params.get("virtualmachineid", ""))
        if vm is None:
            return self._error(key, "Unable to find virtual machine")
        return 200, {key: {"jobid": self._job(command, lambda: work(vm))}}

    def api_startVirtualMachine(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        def work(vm: dict[str, Any]) -> dict[str, Any]:
            if self._root_of(vm["id"]) is None:
                raise ValueError(f"Unable to start VM {vm['name']}: it has no root volume")
            vm["state"] = "Running"
            return {"virtualmachine": self._vm_json(vm)}

        return self._vm_job("startVirtualMachine", params, key, work)

    def api_stopVirtualMachine(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        def work(vm: dict[str, Any]) -> dict[str, Any]:
            vm["state"] = "Stopped"
            return {"virtualmachine": self._vm_json(vm)}

        return self._vm_job("stopVirtualMachine", params, key, work)

    def api_destroyVirtualMachine(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        def work(vm: dict[str, Any]) -> dict[str, Any]:
            # Expunged: its root goes with it, data disks are detached and kept; its VM snapshots go.
            for volume in list(self.volumes.values()):
                if volume.get("virtualmachineid") != vm["id"]:
                    continue
                if volume.get("deviceid") == 0:
                    del self.volumes[volume["id"]]
                    self.file_of(volume["id"]).unlink(missing_ok=True)
                else:
                    volume.pop("virtualmachineid", None)
                    volume.pop("deviceid", None)
            for snapshot in self._vm_snapshots_of(vm["id"]):
                self._drop_snapshot(snapshot)
            del self.vms[vm["id"]]
            return {"virtualmachine": {**self._vm_json(vm), "state": "Expunging"}}

        return self._vm_job("destroyVirtualMachine", params, key, work)

    def api_createVMSnapshot(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        def work(vm: dict[str, Any]) -> dict[str, Any]:
            snapshot_id = str(uuid.uuid4())
            files = {}
            for volume in self.volumes.values():
                if volume.get("virtualmachineid") == vm["id"]:
                    copy = self.data_dir / f"vmsnap-{snapshot_id}-{volume['id']}.img"
                    subprocess.run(["cp", "--sparse=always", str(self.file_of(volume["id"])), str(copy)], check=True)
                    files[volume["id"]] = str(copy)
            snapshot = {
                "id": snapshot_id,
                "name": params.get("name", snapshot_id),
                "virtualmachineid": vm["id"],
                "state": "Ready",
                "type": "Disk",
            }
            self.vm_snapshots[snapshot_id] = {**snapshot, "files": files}
            return {"vmsnapshot": snapshot}

        return self._vm_job("createVMSnapshot", params, key, work)

    def api_listVMSnapshot(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        found = [
            {k: v for k, v in s.items() if k != "files"}
            for s in self.vm_snapshots.values()
            if params.get("virtualmachineid", s["virtualmachineid"]) == s["virtualmachineid"]
            and params.get("vmsnapshotid", s["id"]) == s["id"]
        ]
        return 200, {key: {"count": len(found), "vmSnapshot": found} if found else {}}

    def api_revertToVMSnapshot(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        snapshot = self.vm_snapshots.get(params.get("vmsnapshotid", ""))
        if snapshot is None:
            return self._error(key, "Unable to find the VM snapshot")
        vm = self.vms[snapshot["virtualmachineid"]]
        if vm["state"] != "Stopped":
            return self._error(key, "VM must be Stopped to revert a disk-only VM snapshot")

        def work() -> dict[str, Any]:
            for volume_id, copy in snapshot["files"].items():
                subprocess.run(["cp", "--sparse=always", copy, str(self.file_of(volume_id))], check=True)
            return {"virtualmachine": self._vm_json(vm)}

        return 200, {key: {"jobid": self._job("revertToVMSnapshot", work)}}

    def _drop_snapshot(self, snapshot: dict[str, Any]) -> None:
        for copy in snapshot["files"].values():
            Path(copy).unlink(missing_ok=True)
        self.vm_snapshots.pop(snapshot["id"], None)

    def api_deleteVMSnapshot(self, params: dict[str, str], key: str) -> tuple[int, dict[str, Any]]:
        snapshot = self.vm_snapshots.get(params.get("vmsnapshotid", ""))
        if snapshot is None:
            return self._error(key, "Unable to find the VM snapshot")

        def work() -> dict[str, Any]:
            self._drop_snapshot(snapshot)
            return {"success": True}

        return 200, {key: {"jobid": self._job("deleteVMSnapshot", work)}}

    def add_foreign_vm(self, name: str, owner: str | None = None) -> str:
        """Another tenant's VM (tagged by another portal, or untagged), running, in the same account."""
        vm_id = str(uuid.uuid4())
        tags = [{"key": "oma-owner", "value": owner, "resourcetype": "UserVm", "resourceid": vm_id}] if owner else []
        with self.lock:
            self.vms[vm_id] = {
                "id": vm_id,
                "name": name,
                "state": "Running",
                "hypervisor": "KVM",
                "nic": [],
                "tags": tags,
            }
        return vm_id

    def portal_env(self) -> dict[str, str]:
        """The portal's environment for this fake (its processes: workers, follower, daphne)."""
        return {
            "OMA_VOLUME_BACKEND": "cloudstack",
            "OMA_CLOUDSTACK_ENDPOINT": self.endpoint,
            "OMA_CLOUDSTACK_KEY": self.key,
            "OMA_CLOUDSTACK_SECRET": self.secret,
            "OMA_CLOUDSTACK_ZONE_ID": self.zone_id,
            "OMA_CLOUDSTACK_DISK_OFFERING_ID": self.offering_id,
            "OMA_CLOUDSTACK_OMA_VM_ID": self.oma_vm_id,
            "OMA_CLOUDSTACK_POLL_INTERVAL": "0.2",
            "OMA_CLOUDSTACK_DEVICE_ROOT": str(self.device_root),
        }

    def file_of(self, volume_id: str) -> Path:
        return self.data_dir / f"{volume_id}.img"

    def device_of(self, volume_id: str) -> Path:
        return self.device_root / f"virtio-{volume_id.replace('-', '')[:20]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, params: dict[str, str]) -> None:
                status, body = fake.handle(params)
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                self._answer(dict(parse_qsl(urlparse(self.path).query, keep_blank_values=True)))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                self._answer(dict(parse_qsl(self.rfile.read(length).decode(), keep_blank_values=True)))

            def log_message(self, *args: object) -> None:
                pass

        return Handler


def use_cloud(settings: object, fake: FakeCloudStack) -> None:
    settings.OMA_VOLUMES = {  # type: ignore[attr-defined]
        "BACKEND": "cloudstack",
        "CLOUDSTACK": {
            "ENDPOINT": fake.endpoint,
            "KEY": fake.key,
            "SECRET": fake.secret,
            "ZONE_ID": fake.zone_id,
            "DISK_OFFERING_ID": fake.offering_id,
            "OMA_VM_ID": fake.oma_vm_id,
            "JOB_TIMEOUT": 20,
            "POLL_INTERVAL": 0.02,
            "DEVICE_ROOT": str(fake.device_root),
        },
    }
