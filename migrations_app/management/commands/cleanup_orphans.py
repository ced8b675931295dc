import json
from typing import Any

from django.core.management.base import BaseCommand

from exports.actions import ExportError, retire_export
from exports.models import VMExportMapping
from migrations_app.backends import get_volume_backend
from migrations_app.models import JobDisk, SourceVM
from migrations_app.volumes import VolumeError


class Command(BaseCommand):
    help = (
        "Find volumes and export mappings that no job or VM accounts for. --fix retires such mappings and "
        "detaches such volumes; --delete-volumes also deletes them (their data is gone then). Exits 1 while "
        "orphans remain."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--fix", action="store_true")
        parser.add_argument("--delete-volumes", action="store_true")
        parser.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        backend = get_volume_backend()
        known_volumes = set(JobDisk.objects.exclude(volume_id="").values_list("volume_id", flat=True))
        volumes = [v for v in backend.list_volumes() if v.id not in known_volumes and not v.vm_id]
        known_vms = set(SourceVM.objects.values_list("vm_id", flat=True))
        used_mappings = set(JobDisk.objects.exclude(mapping=None).values_list("mapping_id", flat=True))
        mappings = [
            m
            for m in VMExportMapping.objects.exclude(status=VMExportMapping.Status.RETIRED)
            if m.pk not in used_mappings and m.vm_id not in known_vms
        ]
        report: dict[str, list[str]] = {
            "orphan_volumes": [f"{v.id} {v.name}" for v in volumes],
            "orphan_mappings": [m.export_name for m in mappings],
            "fixed": [],
            "unfixed": [],
        }
        if options["fix"] or options["delete_volumes"]:
            for mapping in mappings:
                try:
                    retire_export(vm_id=mapping.vm_id, disk_unit=mapping.disk_unit_number, actor="cleanup_orphans")
                    report["fixed"].append(f"retired {mapping.export_name}")
                except ExportError as exc:
                    report["unfixed"].append(f"{mapping.export_name}: {exc}")
            exported = set(VMExportMapping.objects.exclude(status="retired").values_list("device_path", flat=True))
            for volume in volumes:
                if volume.attached_device and volume.attached_device in exported:
                    report["unfixed"].append(f"{volume.id}: still exported as {volume.attached_device}")
                    continue
                try:
                    backend.detach_volume(volume.id)
                    if options["delete_volumes"]:
                        backend.delete_volume(volume.id)
                        report["fixed"].append(f"deleted volume {volume.id} {volume.name}")
                    else:
                        report["fixed"].append(f"detached volume {volume.id} {volume.name} (kept; --delete-volumes)")
                except VolumeError as exc:
                    report["unfixed"].append(f"{volume.id}: {exc}")
        if options["json"]:
            self.stdout.write(json.dumps(report, sort_keys=True))
        else:
            for key, values in report.items():
                for value in values:
                    self.stdout.write(f"{key.replace('_', ' ')}: {value}")
        remaining = report["unfixed"] or (
            (report["orphan_volumes"] and not options["delete_volumes"])
            or (report["orphan_mappings"] and not options["fix"])
        )
        if remaining:
            raise SystemExit(1)
