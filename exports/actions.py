"""Every write that matters to an export: ensure (create, reuse, retarget) and retire, with the audit
recorders at the bottom. Server health is in ``health.py``, reconciliation in ``reconcile.py``.

Views, admin actions, management commands and workflow steps call these; none saves a mapping
itself, and nothing but the privileged helper touches a link or a conf file.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from live.outbox import announce

from .backends import get_backend
from .conf import nbd_conf
from .helper_client import HelperFailed, LinkResult
from .models import (
    ExportEvent,
    NbdServerState,
    VMExportMapping,
    export_name_for,
    normalize_vm_id,
    validate_device_path,
    validate_disk_unit,
)
from .nbd_protocol import NbdError
from .nbd_servers import ExportNotServed, NbdBackend, ServeReport
from .topics import NBD

log = logging.getLogger(__name__)
Status = VMExportMapping.Status


class ExportError(Exception):
    """An export could not be ensured; the message says why in an operator's words."""


class ExportRefused(ExportError):
    """Bad input: nothing was changed."""


class ExportConflict(ExportError):
    """The request contradicts an existing mapping (for example, a device already exported)."""


class ExportUnavailable(ExportError):
    """The mapping and link are written but the server does not serve the export (yet)."""


def require_no_transaction(what: str) -> None:
    """Refuse to run inside a caller's transaction (the check Django's durable atomic makes, so a test
    case's own wrapping transaction is allowed)."""
    connection = transaction.get_connection()
    if connection.in_atomic_block and connection.atomic_blocks and not connection.atomic_blocks[-1]._from_testcase:
        raise RuntimeError(f"{what} must run outside any transaction (it waits on the NBD server)")


def _validated(vm_id: str, disk_unit: int, device: str) -> tuple[str, str]:
    try:
        vm_id = normalize_vm_id(vm_id)
        validate_disk_unit(disk_unit)
        validate_device_path(device)
    except ValidationError as exc:
        raise ExportRefused("; ".join(exc.messages)) from exc
    return vm_id, export_name_for(vm_id, disk_unit)


@dataclass(frozen=True)
class ExportRequest:
    """One VM disk that should be exported from ``device``."""

    vm_id: str
    vm_name: str
    disk_unit: int
    device: str


def ensure_export(*, vm_id: str, vm_name: str, disk_unit: int, device: str, actor: str = "system") -> VMExportMapping:
    """Return the VM disk's persistent export, served by the NBD server and pointing at ``device``.

    Reuse (mapping, link and served name all right): no helper call, no reload. New name: mapping
    row, link (+ conf file), one coalesced reload on nbd-server only, then verified served.
    Retarget (same VM disk, new device): the link is replaced atomically, no reload.
    Raises ExportRefused (nothing changed), ExportConflict, or ExportUnavailable.
    """
    return ensure_exports([ExportRequest(vm_id, vm_name, disk_unit, device)], actor=actor)[0]


def ensure_exports(requests: list[ExportRequest], *, actor: str = "system") -> list[VMExportMapping]:
    """ensure_export for several disks at once (a VM's disks): every request is validated and checked
    for conflicts before anything is written, and all new names share one reload.

    Never inside a transaction: it may wait for an nbd-server reload, and a caller's open transaction
    would hold its locks meanwhile (on SQLite, the write lock every worker's progress write needs)."""
    require_no_transaction("ensure_exports")
    checked = []
    for req in requests:
        vm_id, name = _validated(req.vm_id, req.disk_unit, req.device)
        checked.append((ExportRequest(vm_id, req.vm_name, req.disk_unit, req.device), name))
    devices = [req.device for req, _ in checked]
    if len(set(devices)) != len(devices):
        raise ExportConflict("two disks of one request name the same device")
    conflict = _device_conflict([req for req, _ in checked])
    if conflict is not None:
        raise conflict
    backend = get_backend()
    results = _reuse(backend, checked)
    to_serve: list[VMExportMapping] = []
    written_at = 0.0
    fresh = [(req, name) for (req, name), reused in zip(checked, results, strict=True) if reused is None]
    if fresh:
        try:
            to_serve, written_at = _write_exports(backend, fresh, actor)
        except IntegrityError as exc:
            # Lost a race with another request for the same device (the unique constraint decided).
            conflict = _device_conflict([req for req, _ in fresh])
            if conflict is not None:
                raise conflict from exc
            raise ExportConflict(str(exc)) from exc
    # Outside any transaction: a reload may wait for its spacing, and must not hold row locks.
    made = {
        (m.vm_id, m.disk_unit_number): m
        for m in (_make_served(backend, to_serve, written_at, actor) if to_serve else [])
    }
    return [
        mapping if mapping is not None else made[(req.vm_id, req.disk_unit)]
        for mapping, (req, _) in zip(results, checked, strict=True)
    ]


class _ServedNames:
    """The served names, listed at most once per call (an nbd-server list forks a child)."""

    def __init__(self, backend: NbdBackend) -> None:
        self.backend = backend
        self.names: set[str] | None = None

    def __contains__(self, name: object) -> bool:
        if self.names is None:
            try:
                self.names = self.backend.served_names()
            except NbdError:
                self.names = set()
        return name in self.names


def _reuse(backend: NbdBackend, checked: list[tuple[ExportRequest, str]]) -> list[VMExportMapping | None]:
    """Each request's mapping if it is served as asked already (its row, link and served name all
    right), else None. The rows are read in one query and the reused ones touched in one write."""
    node = nbd_conf().node
    wanted = {(req.vm_id, req.disk_unit) for req, _ in checked}
    current = {
        (m.vm_id, m.disk_unit_number): m
        for m in VMExportMapping.objects.filter(
            vm_id__in={vm_id for vm_id, _ in wanted}, disk_unit_number__in={unit for _, unit in wanted}
        )
    }
    served = _ServedNames(backend)
    results: list[VMExportMapping | None] = []
    for req, name in checked:
        mapping = current.get((req.vm_id, req.disk_unit))
        if (
            mapping is None
            or mapping.node != node
            or mapping.status != Status.ACTIVE
            or mapping.device_path != req.device
            or backend.link_target(name) != req.device
            or name not in served
        ):
            mapping = None
        results.append(mapping)
    reused = [m for m in results if m is not None]
    if reused:
        now = timezone.now()
        VMExportMapping.objects.filter(pk__in=[m.pk for m in reused]).update(last_used_at=now)
        for mapping in reused:
            mapping.last_used_at = now
    return results


def _device_conflict(requests: list[ExportRequest]) -> ExportConflict | None:
    """The first request whose device another VM disk's live export on this node holds (one query)."""
    holders = {
        m.device_path: m
        for m in VMExportMapping.objects.filter(
            device_path__in={req.device for req in requests}, node=nbd_conf().node
        ).exclude(status=Status.RETIRED)  # at most one live export per device and node (a constraint)
    }
    for req in requests:
        other = holders.get(req.device)
        if other is not None and (other.vm_id, other.disk_unit_number) != (req.vm_id, req.disk_unit):
            return ExportConflict(f"device {req.device} is already exported as {other.export_name} ({other.vm_name})")
    return None


def _write_exports(
    backend: NbdBackend, requests: list[tuple[ExportRequest, str]], actor: str
) -> tuple[list[VMExportMapping], float]:
    """Rows and links for the disks that are not served as asked: every row is locked (in disk order,
    so two callers cannot deadlock), then one helper call links them all, then the rows are saved.
    Holding the row locks across the helper call keeps link and row in agreement under races."""
    conflict = _device_conflict([req for req, _ in requests])
    if conflict is not None:
        raise conflict
    node = nbd_conf().node
    with transaction.atomic(durable=True):
        rows = []
        for req, name in sorted(requests, key=lambda r: (r[0].vm_id, r[0].disk_unit)):
            mapping, created = VMExportMapping.objects.select_for_update().get_or_create(
                vm_id=req.vm_id,
                disk_unit_number=req.disk_unit,
                defaults={
                    "vm_name": req.vm_name,
                    "export_name": name,
                    "device_path": req.device,
                    "status": Status.PENDING,
                    "node": node,
                },
            )
            moved_here = mapping.node != node  # the VM's volumes are on this node now: its server serves it
            needs_link = created or moved_here or backend.needs_reload or backend.link_target(name) != req.device
            rows.append((req, name, mapping, created, mapping.device_path, mapping.status, needs_link))
        written_at = time.time()
        results: dict[str, LinkResult] = {}
        pairs = [(name, req.device) for req, name, *_, needs_link in rows if needs_link]
        if pairs:
            try:
                results = {r["name"]: r for r in backend.publish_many(pairs)}
            except HelperFailed as exc:
                if exc.refused:
                    raise ExportRefused(exc.message) from exc
                raise ExportError(str(exc)) from exc
            # When its conf file was written decides whether a reload since then already covers it.
            written_at = max(r["conf_mtime"] or written_at for r in results.values())
        mappings = []
        for req, name, mapping, created, old_device, previous_status, _ in rows:
            previous_device: str | None = old_device
            result = results.get(name)
            written = result is not None and (result["link_changed"] or result["conf_changed"])
            mapping.vm_name = req.vm_name
            mapping.device_path = req.device
            mapping.node = node
            if mapping.status != Status.ACTIVE or written:
                mapping.status = Status.PENDING
            mapping.status_detail = ""
            mapping.save()
            if created:
                kind = "export.created"
                previous_device = None
            elif previous_device != req.device:
                kind = "export.retargeted"
            elif previous_status == Status.RETIRED:
                kind = "export.reactivated"
            else:
                kind = "export.relinked" if written else "export.rechecked"
            record_event(
                kind,
                mapping=mapping,
                message=f"{name} -> {req.device}",
                data={"device": req.device, "previous_device": previous_device, "written": written},
                actor=actor,
            )
            mappings.append(mapping)
    return mappings, written_at


def _make_served(
    backend: NbdBackend, mappings: list[VMExportMapping], written_at: float, actor: str
) -> list[VMExportMapping]:
    names = {m.export_name for m in mappings}
    pks = [m.pk for m in mappings]
    report = ServeReport()
    try:
        report = backend.make_served(names, written_at, nbd_conf().serve_timeout)
    except (ExportNotServed, HelperFailed, NbdError) as exc:
        detail = str(exc)
        VMExportMapping.objects.filter(pk__in=pks).update(status=Status.ERROR, status_detail=detail[:2000])
        for mapping in mappings:
            record_event("export.not_served", mapping=mapping, message=detail, actor=actor)
        raise ExportUnavailable(detail if isinstance(exc, ExportNotServed) else f"not served: {detail}") from exc
    finally:
        record_serve_report(report, backend, actor)
    now = timezone.now()
    VMExportMapping.objects.filter(pk__in=pks).update(status=Status.ACTIVE, last_verified_at=now, last_used_at=now)
    fresh = VMExportMapping.objects.in_bulk(pks)
    if report.reloads or report.shared_reload:
        for mapping in mappings:
            record_event(
                "export.served",
                mapping=mapping,
                message=f"served after {'a shared' if report.shared_reload else 'a'} reload",
                data={"reloads": report.reloads, "restarts": report.restarts},
                actor=actor,
            )
    return [fresh[pk] for pk in pks]


def retire_export(*, vm_id: str, disk_unit: int, actor: str = "system") -> VMExportMapping:
    """Withdraw a VM disk's export (link and conf file). The row stays, so the name is never reused
    for another disk; ensure_export on the same VM disk brings it back."""
    try:
        vm_id = normalize_vm_id(vm_id)
        validate_disk_unit(disk_unit)
    except ValidationError as exc:
        raise ExportRefused("; ".join(exc.messages)) from exc
    backend = get_backend()
    with transaction.atomic(durable=True):
        try:
            mapping = VMExportMapping.objects.select_for_update().get(vm_id=vm_id, disk_unit_number=disk_unit)
        except VMExportMapping.DoesNotExist as exc:
            raise ExportRefused(f"no export mapping for VM {vm_id} disk {disk_unit}") from exc
        if mapping.status == Status.RETIRED:
            return mapping
        try:
            backend.withdraw(mapping.export_name)
        except HelperFailed as exc:
            raise ExportError(str(exc)) from exc
        mapping.status = Status.RETIRED
        mapping.status_detail = ""
        mapping.save(update_fields=["status", "status_detail", "updated_at"])
        note = " nbd-server keeps listing it until its next restart." if backend.needs_reload else ""
        record_event("export.retired", mapping=mapping, message=f"link removed.{note}", actor=actor)
    return mapping


# --- Audit: every export change and server incident leaves a row (and tells the NBD page) ---


def record_event(
    kind: str,
    *,
    mapping: VMExportMapping | None = None,
    export_name: str = "",
    message: str = "",
    data: dict[str, Any] | None = None,
    actor: str = "system",
) -> ExportEvent:
    with transaction.atomic():
        announce(NBD)
        return ExportEvent.objects.create(
            mapping=mapping,
            export_name=export_name or (mapping.export_name if mapping else ""),
            kind=kind,
            message=message,
            data=data or {},
            actor=actor,
        )


def server_state() -> NbdServerState:
    conf = nbd_conf()
    state, _ = NbdServerState.objects.get_or_create(
        node=conf.node, defaults={"backend": conf.backend, "address": conf.address}
    )
    return state


def from_epoch(value: float | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(value, tz=dt.UTC) if value else None


def record_serve_report(report: ServeReport, backend: NbdBackend, actor: str = "system") -> None:
    """Count reloads and incidents on the server state row, with an event for each incident."""
    if not (report.reloads or report.crashes or report.restarts or report.lost):
        return
    state = server_state()
    now = timezone.now()
    updates: dict[str, Any] = {
        "reload_count": F("reload_count") + report.reloads,
        "crashes_detected": F("crashes_detected") + report.crashes,
        "restarts_detected": F("restarts_detected") + report.restarts,
        "lost_exports_detected": F("lost_exports_detected") + len(report.lost),
        "repairs": F("repairs") + report.repairs,
    }
    if report.reloads:
        updates["last_reload_at"] = now
    if report.crashes or report.restarts:
        # Our own repair restarted the main process: remember the new one, so the next check
        # does not count this restart a second time.
        try:
            status = backend.helper_status()
            updates["main_pid"] = status.get("pid")
            updates["main_started_at"] = from_epoch(status.get("started_at"))
        except HelperFailed:
            pass
    NbdServerState.objects.filter(pk=state.pk).update(**updates)
    announce(NBD)
    if report.reloads:
        record_event("server.reload", message=f"{report.reloads} reload(s)", data={"reloads": report.reloads})
    for kind, message in report.incidents:
        record_event(kind, message=message, data={"lost": report.lost, "restarts": report.restarts}, actor=actor)
