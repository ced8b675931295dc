import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from exports import actions


class Command(BaseCommand):
    help = "Ensure the persistent NBD export of one VM disk on a device; prints the export name."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--vm-id", required=True, help="VMware instance UUID")
        parser.add_argument("--vm-name", required=True)
        parser.add_argument("--disk", type=int, required=True, help="disk unit number (0-63)")
        parser.add_argument("--device", required=True, help="block device (dev mode: volume file)")
        parser.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            mapping = actions.ensure_export(
                vm_id=options["vm_id"],
                vm_name=options["vm_name"],
                disk_unit=options["disk"],
                device=options["device"],
                actor="ensure_export",
            )
        except actions.ExportError as exc:
            raise CommandError(str(exc)) from exc
        if options["json"]:
            payload = {"export_name": mapping.export_name, "device": mapping.device_path, "status": mapping.status}
            self.stdout.write(json.dumps(payload))
        else:
            self.stdout.write(mapping.export_name)
