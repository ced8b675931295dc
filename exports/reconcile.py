"""Reconcile the database, the links/conf files and what the server really serves."""

from __future__ import annotations

from dataclasses import dataclass, field

from .actions import ExportError, ensure_export, record_event
from .backends import get_backend
from .conf import nbd_conf
from .helper_client import HelperFailed
from .models import VMExportMapping
from .nbd_protocol import NbdError
from .nbd_servers import device_present

Status = VMExportMapping.Status


@dataclass
class ReconcileReport:
    """Database vs links/conf files vs what the server really serves."""

    missing_link: list[str] = field(default_factory=list)
    wrong_link: list[str] = field(default_factory=list)
    missing_conf: list[str] = field(default_factory=list)
    not_served: list[str] = field(default_factory=list)
    retired_but_linked: list[str] = field(default_factory=list)
    orphaned: list[str] = field(default_factory=list)
    # Links left here of exports that moved to another node (this one was lost meanwhile).
    moved_away: list[str] = field(default_factory=list)
    served_unknown: list[str] = field(default_factory=list)
    conflicting: list[str] = field(default_factory=list)
    # Live mappings whose device is absent (volume detached to free a slot): not served, not a problem.
    parked: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    unfixed: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        problems = (
            self.missing_link,
            self.wrong_link,
            self.missing_conf,
            self.not_served,
            self.retired_but_linked,
            self.orphaned,
            self.moved_away,
            self.served_unknown,
            self.conflicting,
        )
        return not any(problems)


def reconcile_exports(*, fix: bool = False, actor: str = "system") -> ReconcileReport:
    """Find every disagreement between the database, the links/conf files and the served names.

    With ``fix``: live mappings get their link/conf rewritten and are made served (the database is
    the truth), links of retired mappings are removed. Links and served names that no mapping
    accounts for, and two names on one device, are only reported: a person decides.
    """
    backend = get_backend()
    report = ReconcileReport()
    status = backend.helper_status()
    links: dict[str, str] = status["links"]
    confs = set(status["confs"])
    try:
        served = backend.served_names()
    except NbdError:
        served = set()
    rows = {m.export_name: m for m in VMExportMapping.objects.filter(node=nbd_conf().node)}
    live = {name: m for name, m in rows.items() if m.status != Status.RETIRED}
    broken: list[VMExportMapping] = []
    for name, mapping in live.items():
        bad = False
        if name not in links:
            report.missing_link.append(name)
            bad = True
        elif links[name] != mapping.device_path:
            report.wrong_link.append(f"{name}: link -> {links[name]}, database -> {mapping.device_path}")
            bad = True
        if backend.needs_reload and name not in confs:
            report.missing_conf.append(name)
            bad = True
        present = device_present(mapping.device_path)
        if not present:
            report.parked.append(name)
        elif name not in served:
            report.not_served.append(name)
            bad = True
        if bad and present:
            broken.append(mapping)
        elif bad:
            report.unfixed.append(f"{name}: its device is absent (volume detached); fixed once it is attached")
    retired = [n for n in set(links) | confs if n in rows and n not in live]
    report.retired_but_linked = sorted(retired)
    unknown_here = {n for n in set(links) | confs if n not in rows}
    elsewhere = set(
        VMExportMapping.objects.filter(export_name__in=unknown_here)
        .exclude(status=Status.RETIRED)
        .values_list("export_name", flat=True)
    )
    report.moved_away = sorted(unknown_here & elsewhere)
    report.orphaned = sorted(unknown_here - elsewhere)
    report.served_unknown = sorted(served - set(live))
    by_target: dict[str, list[str]] = {}
    for name, target in links.items():
        by_target.setdefault(target, []).append(name)
    report.conflicting = sorted(f"{t}: {', '.join(sorted(ns))}" for t, ns in by_target.items() if len(ns) > 1)

    if fix:
        for mapping in broken:
            try:
                ensure_export(
                    vm_id=mapping.vm_id,
                    vm_name=mapping.vm_name,
                    disk_unit=mapping.disk_unit_number,
                    device=mapping.device_path,
                    actor=actor,
                )
                report.fixed.append(f"republished {mapping.export_name}")
            except ExportError as exc:
                report.unfixed.append(f"{mapping.export_name}: {exc}")
        for name in retired:
            try:
                backend.withdraw(name)
                record_event(
                    "export.withdrawn", mapping=rows[name], message="reconcile removed a retired link", actor=actor
                )
                report.fixed.append(f"removed link of retired {name}")
            except HelperFailed as exc:
                report.unfixed.append(f"{name}: {exc}")
        for name in report.moved_away:
            # The database says another node serves it now: this node's stale link must not serve it too.
            try:
                backend.withdraw(name)
                report.fixed.append(f"removed link of {name}, which moved to another node")
            except HelperFailed as exc:
                report.unfixed.append(f"{name}: {exc}")
        for name in report.orphaned:
            report.unfixed.append(f"{name}: no mapping accounts for it; check and remove it by hand")
        for name in report.served_unknown:
            if name not in links:
                report.unfixed.append(f"{name}: served but unknown; it goes away at the next server restart")
        for line in report.conflicting:
            report.unfixed.append(f"two exports on one device: {line}")
    return report
