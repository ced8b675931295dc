from typing import Any

from django.core.management.base import BaseCommand, CommandError

from exports import actions


class Command(BaseCommand):
    help = "Retire one VM disk's NBD export (remove its link; the name stays reserved for that disk)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--vm-id", required=True)
        parser.add_argument("--disk", type=int, required=True)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            mapping = actions.retire_export(vm_id=options["vm_id"], disk_unit=options["disk"], actor="retire_export")
        except actions.ExportError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"retired {mapping.export_name}")
