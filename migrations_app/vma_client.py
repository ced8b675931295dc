"""Client of the VMA agent's HTTP JSON contract (docs/vma-api.md), on httpx.

Every answer is read with a size cap and an overall deadline (a VMA that drips bytes cannot hold a
worker), and checked against the contract before anything uses it: a malformed answer is a clear
VmaError("malformed"), never a 500 or a job following numbers that mean nothing. Plain http:// is
refused for any VMA that is not on this host; https can trust a private CA."""

from __future__ import annotations

import functools
import ipaddress
import json as jsonlib
import os
import re
import ssl
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NotRequired, TypedDict, cast
from urllib.parse import urlsplit

import httpx

MAX_RESPONSE_BYTES = 16 << 20  # an inventory of thousands of VMs fits; anything larger is not the VMA
MAX_VMS = 10_000
MAX_DISKS = 64
MAX_CAPACITY = 64 << 40  # 64 TiB, VMware's largest virtual disk
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# The contract's shapes (docs/vma-api.md).
class VmaHealth(TypedDict):
    status: str
    version: str
    active_replications: int


class VmaDisk(TypedDict):
    unit_number: int
    key: int  # VMware device key
    capacity_bytes: int
    label: NotRequired[str]
    path: NotRequired[str]  # datastore path of the disk file


class VmaNic(TypedDict):
    network: str  # the source network (port group) name: what a network mapping maps
    mac: str  # aa:bb:cc:dd:ee:ff, lower case
    adapter: NotRequired[str]  # vmxnet3, e1000e, ...


class VmaVM(TypedDict):
    id: str  # VMware instance UUID
    name: str
    disks: list[VmaDisk]
    path: NotRequired[str]  # inventory path in vCenter
    power_state: NotRequired[str]  # poweredOn, poweredOff, suspended, shuttingDown
    guest_os: NotRequired[str]
    cpus: NotRequired[int]
    memory_mib: NotRequired[int]
    firmware: NotRequired[str]  # bios or efi
    disk_controller: NotRequired[str]  # pvscsi, lsilogic, sata, nvme, ide
    nics: NotRequired[list[VmaNic]]


class PowerState(TypedDict):
    """A VM's power state and the power action under way, if any."""

    vm_id: str
    power_state: str
    action: NotRequired[str]  # the last power action asked for: shutdown, off or on
    error: NotRequired[str]  # why that action failed (e.g. the guest has no VMware Tools running)


class ReplicationTarget(TypedDict):
    """One disk of a replication request: where to copy it, and from which change on."""

    unit_number: int
    nbd_url: str
    previous_change_id: str  # empty: a full copy
    resume_from: NotRequired[str]  # a checkpoint of an interrupted replication of this sync


class Digest(TypedDict):
    """What a disk's sync wrote: the sha256 of the bytes of ``ranges`` ([offset, length] pairs, in order:
    the whole disk for a full copy, the changed ranges of an incremental)."""

    algorithm: str
    ranges: list[list[int]]
    value: str


class DiskProgress(TypedDict):
    unit_number: int
    state: str  # queued, copying, done, failed, cancelled
    mode: str  # full or incremental
    bytes_done: int
    bytes_total: int
    throughput_bps: int
    change_id: str  # set when the disk is done: the next sync's previous_change_id
    error: NotRequired[str]
    digest: NotRequired[Digest]  # set when the disk is done
    checkpoint: NotRequired[str]  # what is confirmed written so far: hand it back as resume_from
    checkpoint_bytes: NotRequired[int]


class Replication(TypedDict):
    replication_id: str
    vm_id: str
    state: str  # running, completed, failed, cancelling, cancelled
    error: str
    disks: list[DiskProgress]
    error_kind: NotRequired[str]  # when failed: "transient" (the NBD target or network: resume) or "permanent"


class VmaError(Exception):
    """The VMA answered with an error, or could not be reached; ``code`` is machine-readable."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"VMA {code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class VmaUnavailable(VmaError):
    pass


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(base_url: str) -> None:
    """https anywhere; plain http only to this host (the token and the NBD URLs would cross the wire)."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise VmaError("bad_url", f"the VMA URL {base_url!r} is not http(s)://host[:port]")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        raise VmaError("insecure", f"plain http to a VMA on another host ({parts.hostname}) is refused: use https")


def _mtime(path: str | None) -> int | None:
    try:
        return os.stat(path).st_mtime_ns if path else None
    except OSError:
        return None  # ssl reports the missing file, with its name


@functools.cache
def tls_context(ca_file: str | None, mtime: int | None = None) -> ssl.SSLContext:
    """The TLS context a VMA client verifies the VMA with: one per process and CA file (a new CA file,
    or the same one rewritten, makes a new one). Building one loads a whole CA bundle, about 20 ms of
    CPU, and workers make a client for each step that talks to the VMA."""
    return ssl.create_default_context(cafile=ca_file) if ca_file else httpx.create_ssl_context()


class VmaClient:
    """Every call of the contract is idempotent, so connection failures are retried for all of them."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 10.0,
        retries: int = 3,
        deadline: float = 30.0,
        ca_file: str | None = None,
    ) -> None:
        check_url(base_url)
        self.deadline = deadline  # seconds one call may take in all, however the VMA paces its bytes
        verify = tls_context(ca_file, _mtime(ca_file))
        self.http = httpx.Client(
            base_url=base_url.rstrip("/") + "/api/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            verify=verify,
            transport=httpx.HTTPTransport(retries=retries, verify=verify),
        )

    def close(self) -> None:
        self.http.close()

    def _read(self, method: str, path: str, json: dict[str, Any] | None) -> tuple[int, bytes]:
        started = time.monotonic()
        with self.http.stream(method, path, json=json) as response:
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > MAX_RESPONSE_BYTES:
                raise VmaError("too_large", f"{method} {path}: the VMA answered {int(length)} bytes", 502)
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    raise VmaError("too_large", f"{method} {path}: the VMA answered more than {MAX_RESPONSE_BYTES}")
                if time.monotonic() - started > self.deadline:
                    raise VmaUnavailable("deadline", f"{method} {path}: no whole answer in {self.deadline:.0f} s")
                chunks.append(chunk)
            return response.status_code, b"".join(chunks)

    def _request(self, method: str, path: str, json: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            status, raw = self._read(method, path, json)
        except httpx.HTTPError as exc:
            raise VmaUnavailable("unreachable", f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        try:
            body = jsonlib.loads(raw)
        except ValueError:
            body = None
        if status >= 400 or not isinstance(body, dict):
            error = body.get("error", {}) if isinstance(body, dict) else {}
            error = error if isinstance(error, dict) else {}
            text = raw[:300].decode("utf-8", errors="replace")
            raise VmaError(
                _text(error.get("code"), 64) or f"http_{status}",
                _text(error.get("message"), 300) or _text(text, 300),
                status,
            )
        return body

    def health(self) -> VmaHealth:
        body = self._request("GET", "/health")
        if not isinstance(body.get("status"), str) or not isinstance(body.get("version", ""), str):
            raise VmaError("malformed", "the VMA answered a health the contract does not allow")
        return cast(VmaHealth, body)

    def inventory(self) -> list[VmaVM]:
        return checked_inventory(self._request("GET", "/inventory"))

    def vm(self, vm_id: str) -> VmaVM:
        """One VM as it is now (its power state is read live, not from the last inventory)."""
        body = self._request("GET", f"/vms/{vm_id}")
        return checked_inventory({"vms": [body]})[0]

    def power(self, vm_id: str, action: str, timeout_seconds: int = 300) -> PowerState:
        """Ask for a power action: ``shutdown`` (the guest shuts itself down, through VMware Tools, within
        ``timeout_seconds``), ``off`` (hard power-off) or ``on``. It returns at once; follow it with
        ``vm()``. Asking for the state the VM is in (or heading to) changes nothing."""
        if action not in POWER_ACTIONS:
            raise VmaError("bad_request", f"power action {action!r} is not one of {sorted(POWER_ACTIONS)}")
        body = self._request("POST", f"/vms/{vm_id}/power", json={"action": action, "timeout_seconds": timeout_seconds})
        return checked_power(body)

    def start_replication(self, replication_id: str, vm_id: str, disks: Sequence[ReplicationTarget]) -> Replication:
        payload = {"replication_id": replication_id, "vm_id": vm_id, "disks": disks}
        return checked_replication(self._request("POST", "/replications", json=payload))

    def replication(self, replication_id: str) -> Replication:
        return checked_replication(self._request("GET", f"/replications/{replication_id}"))

    def cancel(self, replication_id: str) -> Replication:
        return checked_replication(self._request("POST", f"/replications/{replication_id}/cancel"))


POWER_ACTIONS = {"shutdown", "off", "on"}
POWER_STATES = {"poweredOn", "poweredOff", "suspended", "shuttingDown"}
FIRMWARES = {"bios", "efi"}
MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
REPLICATION_STATES = {"running", "completed", "failed", "cancelling", "cancelled"}
DISK_COUNTERS = ("bytes_done", "bytes_total", "throughput_bps")


def _text(value: object, limit: int) -> str:
    """Text from the VMA as it may be stored and shown: printable, bounded."""
    return CONTROL.sub("?", str(value) if value is not None else "")[:limit]


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def checked_inventory(body: dict[str, Any]) -> list[VmaVM]:
    """The inventory as the contract says it looks, every VM checked before any is stored."""

    def bad(what: str) -> VmaError:
        return VmaError("malformed", f"the VMA answered an inventory the contract does not allow: {what}")

    vms = body.get("vms")
    if not isinstance(vms, list) or len(vms) > MAX_VMS:
        raise bad(f"vms is not a list of at most {MAX_VMS}")
    for vm in vms:
        if not isinstance(vm, dict):
            raise bad("a VM is not an object")
        try:
            uuid.UUID(str(vm.get("id")))
        except ValueError:
            raise bad(f"VM id {_text(vm.get('id'), 60)!r} is not a UUID") from None
        name = vm.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= 255 or CONTROL.search(name):
            raise bad(f"VM {vm['id']}: name {_text(name, 60)!r}")
        for field, limit in (("path", 1024), ("power_state", 32), ("guest_os", 128)):
            value = vm.get(field, "")
            if not isinstance(value, str) or len(value) > limit or CONTROL.search(value):
                raise bad(f"VM {name}: {field} is not text of at most {limit} characters")
        _check_hardware(vm, name, bad)
        disks = vm.get("disks")
        if not isinstance(disks, list) or len(disks) > MAX_DISKS:
            raise bad(f"VM {name}: disks is not a list of at most {MAX_DISKS}")
        units = set()
        for disk in disks:
            if not isinstance(disk, dict):
                raise bad(f"VM {name}: a disk is not an object")
            unit = disk.get("unit_number")
            if not _is_int(unit, 0, 63) or unit in units:
                raise bad(f"VM {name}: unit_number {_text(unit, 20)!r} (0-63, each once)")
            units.add(unit)
            if not _is_int(disk.get("key"), 0, 2**31 - 1):
                raise bad(f"VM {name} disk {unit}: key {_text(disk.get('key'), 20)!r}")
            if not _is_int(disk.get("capacity_bytes"), 1, MAX_CAPACITY):
                raise bad(f"VM {name} disk {unit}: capacity_bytes {_text(disk.get('capacity_bytes'), 20)!r}")
            for field, limit in (("label", 255), ("path", 1024)):
                value = disk.get(field, "")
                if not isinstance(value, str) or len(value) > limit or CONTROL.search(value):
                    raise bad(f"VM {name} disk {unit}: {field} is not text of at most {limit} characters")
    return cast(list[VmaVM], vms)


def _check_hardware(vm: dict[str, Any], name: str, bad: Callable[[str], VmaError]) -> None:
    """What failover needs to know of a VM: its size, firmware, controller and NICs (all optional)."""
    if "cpus" in vm and not _is_int(vm["cpus"], 1, 768):
        raise bad(f"VM {name}: cpus {_text(vm['cpus'], 20)!r} (1-768)")
    if "memory_mib" in vm and not _is_int(vm["memory_mib"], 4, 24 << 20):
        raise bad(f"VM {name}: memory_mib {_text(vm['memory_mib'], 20)!r}")
    if "firmware" in vm and vm["firmware"] not in FIRMWARES:
        raise bad(f"VM {name}: firmware {_text(vm['firmware'], 20)!r} is not bios or efi")
    if "power_state" in vm and vm["power_state"] not in ("", *POWER_STATES):
        raise bad(f"VM {name}: power_state {_text(vm['power_state'], 20)!r}")
    controller = vm.get("disk_controller", "")
    if not isinstance(controller, str) or not re.fullmatch(r"[a-z0-9]{0,32}", controller):
        raise bad(f"VM {name}: disk_controller {_text(controller, 40)!r}")
    nics = vm.get("nics", [])
    if not isinstance(nics, list) or len(nics) > 10:
        raise bad(f"VM {name}: nics is not a list of at most 10")
    for index, nic in enumerate(nics):
        if not isinstance(nic, dict):
            raise bad(f"VM {name}: NIC {index} is not an object")
        network = nic.get("network")
        if not isinstance(network, str) or not 1 <= len(network) <= 255 or CONTROL.search(network):
            raise bad(f"VM {name}: NIC {index} network {_text(network, 60)!r}")
        if not isinstance(nic.get("mac"), str) or not MAC_RE.fullmatch(nic["mac"]):
            raise bad(f"VM {name}: NIC {index} mac {_text(nic.get('mac'), 40)!r} is not aa:bb:cc:dd:ee:ff")
        adapter = nic.get("adapter", "")
        if not isinstance(adapter, str) or not re.fullmatch(r"[a-z0-9]{0,32}", adapter):
            raise bad(f"VM {name}: NIC {index} adapter {_text(adapter, 40)!r}")


def checked_power(body: dict[str, Any]) -> PowerState:
    def bad(what: str) -> VmaError:
        return VmaError("malformed", f"the VMA answered a power state the contract does not allow: {what}")

    try:
        uuid.UUID(str(body.get("vm_id")))
    except ValueError:
        raise bad(f"vm_id {_text(body.get('vm_id'), 60)!r}") from None
    if body.get("power_state") not in POWER_STATES:
        raise bad(f"power_state {_text(body.get('power_state'), 40)!r}")
    if body.get("action", "") not in ("", *POWER_ACTIONS):
        raise bad(f"action {_text(body.get('action'), 40)!r}")
    body["error"] = _text(body.get("error", ""), 2000)
    return cast(PowerState, body)


def checked_replication(body: dict[str, Any]) -> Replication:
    """A replication as the contract says it looks, or VmaError("malformed"): a job is never left
    following numbers that mean nothing."""

    def bad(what: str) -> VmaError:
        return VmaError("malformed", f"the VMA answered a replication the contract does not allow: {what}")

    if body.get("state") not in REPLICATION_STATES:
        raise bad(f"state {str(body.get('state'))[:40]!r}")
    disks = body.get("disks")
    if not isinstance(disks, list):
        raise bad("disks is not a list")
    for disk in disks:
        if not isinstance(disk, dict):
            raise bad("a disk is not an object")
        unit = disk.get("unit_number")
        if not isinstance(unit, int) or isinstance(unit, bool) or not 0 <= unit <= 63:
            raise bad(f"unit_number {str(unit)[:20]!r}")
        for counter in DISK_COUNTERS:
            value = disk.get(counter)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(f"disk {unit} {counter} {str(value)[:20]!r}")
        for field in ("change_id", "checkpoint"):
            value = disk.get(field, "")
            if not isinstance(value, str) or len(value) > 255 or CONTROL.search(value):
                raise bad(f"disk {unit} {field} is not text of at most 255 characters")
        digest = disk.get("digest")
        if digest is not None and not _valid_digest(digest):
            raise bad(f"disk {unit} digest")
        if "error" in disk:
            disk["error"] = _text(disk["error"], 2000)
    body["error"] = _text(body.get("error", ""), 2000)
    return cast(Replication, body)


def _valid_digest(digest: object) -> bool:
    if not isinstance(digest, dict) or not isinstance(digest.get("algorithm"), str):
        return False
    ranges, value = digest.get("ranges"), digest.get("value")
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        return False
    return isinstance(ranges, list) and all(
        isinstance(r, list) and len(r) == 2 and _is_int(r[0], 0, MAX_CAPACITY) and _is_int(r[1], 0, MAX_CAPACITY)
        for r in ranges
    )
