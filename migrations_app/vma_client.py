"""Client of the VMA agent's HTTP JSON contract (docs/vma-api.md), on httpx."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NotRequired, TypedDict, cast

import httpx


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


class VmaVM(TypedDict):
    id: str  # VMware instance UUID
    name: str
    disks: list[VmaDisk]
    path: NotRequired[str]  # inventory path in vCenter
    power_state: NotRequired[str]
    guest_os: NotRequired[str]


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


class VmaClient:
    """Every call of the contract is idempotent, so connection failures are retried for all of them."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 10.0, retries: int = 3) -> None:
        self.http = httpx.Client(
            base_url=base_url.rstrip("/") + "/api/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            transport=httpx.HTTPTransport(retries=retries),
        )

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, path: str, json: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = self.http.request(method, path, json=json)
        except httpx.HTTPError as exc:
            raise VmaUnavailable("unreachable", f"{method} {path}: {exc}") from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400 or not isinstance(body, dict):
            error = body.get("error", {}) if isinstance(body, dict) else {}
            raise VmaError(
                str(error.get("code", f"http_{response.status_code}")),
                str(error.get("message", response.text[:300])),
                response.status_code,
            )
        return body

    def health(self) -> VmaHealth:
        return cast(VmaHealth, self._request("GET", "/health"))

    def inventory(self) -> list[VmaVM]:
        return cast(list[VmaVM], self._request("GET", "/inventory")["vms"])

    def start_replication(self, replication_id: str, vm_id: str, disks: Sequence[ReplicationTarget]) -> Replication:
        payload = {"replication_id": replication_id, "vm_id": vm_id, "disks": disks}
        return checked_replication(self._request("POST", "/replications", json=payload))

    def replication(self, replication_id: str) -> Replication:
        return checked_replication(self._request("GET", f"/replications/{replication_id}"))

    def cancel(self, replication_id: str) -> Replication:
        return checked_replication(self._request("POST", f"/replications/{replication_id}/cancel"))


REPLICATION_STATES = {"running", "completed", "failed", "cancelling", "cancelled"}
DISK_COUNTERS = ("bytes_done", "bytes_total", "throughput_bps")


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
        if not isinstance(disk.get("change_id", ""), str) or not isinstance(disk.get("checkpoint", ""), str):
            raise bad(f"disk {unit} change_id or checkpoint is not text")
    return cast(Replication, body)
