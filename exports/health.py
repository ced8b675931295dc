"""The NBD server's health: observe it through the helper (verified main process) and the NBD protocol
(served names), compare with the database, record what changed, and repair on request."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from django.db.models import F
from django.utils import timezone

from live.outbox import announce

from .actions import from_epoch, record_event, record_serve_report, server_state
from .backends import get_backend
from .conf import nbd_conf
from .helper_client import HelperFailed
from .models import NbdServerState, VMExportMapping
from .nbd_protocol import NbdError
from .nbd_servers import ExportNotServed, ServeReport, device_present
from .topics import NBD

Status = VMExportMapping.Status


@dataclass
class ServerCheck:
    backend: str
    version: str
    address: str
    health: str
    pid: int | None
    started_at: float | None
    expected: list[str]
    served: list[str]
    missing: list[str]
    unknown_served: list[str]
    warnings: list[str]
    incidents: list[str] = field(default_factory=list)
    # Live mappings whose device is absent now (their volume is detached to free an attach slot): not
    # served until the volume is attached again, and not a problem meanwhile.
    parked: list[str] = field(default_factory=list)


def check_nbd_server(*, repair: bool = False, actor: str = "system") -> ServerCheck:
    """Observe the server through the helper (verified PID) and the NBD protocol (served names),
    compare with the database, record what changed; with ``repair``, start a dead server and make
    missing exports served again."""
    backend = get_backend()
    state = server_state()
    incidents: list[str] = []
    status = backend.helper_status()
    if not status.get("verified") and repair:
        report = ServeReport()
        backend.ensure_running(report)
        record_serve_report(report, backend, actor)
        incidents += report.notes
        status = backend.helper_status()
        state.refresh_from_db()
    live = VMExportMapping.objects.filter(status__in=[Status.ACTIVE, Status.PENDING], node=nbd_conf().node).values_list(
        "export_name", "device_path"
    )
    parked = {name for name, device in live if not device_present(device)}
    expected = {name for name, _ in live} - parked
    try:
        served = backend.served_names()
    except NbdError:
        served = set()
    missing = expected - served
    if missing and repair and status.get("verified"):
        try:
            report = backend.make_served(missing, time.time(), nbd_conf().serve_timeout)
            record_serve_report(report, backend, actor)
            incidents += report.notes
        except (ExportNotServed, HelperFailed) as exc:
            incidents.append(str(exc))
        served = backend.served_names()
        missing = expected - served
    pid, started = status.get("pid"), from_epoch(status.get("started_at"))
    updates: dict[str, Any] = {}
    if state.main_pid and pid and (pid != state.main_pid or started != state.main_started_at):
        incidents.append(f"main process changed from pid {state.main_pid} to {pid} (restarted outside the portal)")
        updates["restarts_detected"] = F("restarts_detected") + 1
        record_event("server.restart", message=incidents[-1], data={"old_pid": state.main_pid, "pid": pid})
    if state.main_pid and not status.get("verified") and state.health != NbdServerState.Health.DOWN:
        incidents.append(f"main process {state.main_pid} is gone: {status.get('why')}")
        updates["crashes_detected"] = F("crashes_detected") + 1
        record_event("server.crash", message=incidents[-1])
    warnings = backend.warnings()
    if not status.get("verified"):
        health = NbdServerState.Health.DOWN
    elif missing:
        health = NbdServerState.Health.DEGRADED
    else:
        health = NbdServerState.Health.OK
    version = backend.version()
    NbdServerState.objects.filter(pk=state.pk).update(
        backend=backend.name,
        version=version,
        address=f"{backend.host}:{backend.port}",
        health=health,
        main_pid=pid if status.get("verified") else state.main_pid,
        main_started_at=started if status.get("verified") else state.main_started_at,
        exports_expected=len(expected),
        exports_served=len(expected & served),
        last_check_at=timezone.now(),
        warnings=warnings,
        **updates,
    )
    announce(NBD)
    return ServerCheck(
        backend=backend.name,
        version=version,
        address=f"{backend.host}:{backend.port}",
        health=str(health),
        pid=pid,
        started_at=status.get("started_at"),
        expected=sorted(expected),
        served=sorted(served),
        missing=sorted(missing),
        unknown_served=sorted(served - expected - parked),
        warnings=warnings,
        incidents=incidents,
        parked=sorted(parked),
    )
