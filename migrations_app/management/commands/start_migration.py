from typing import Any

from django.core.management.base import BaseCommand, CommandError

from migrations_app.actions import MigrationError, start_migration
from migrations_app.models import SourceVM


class Command(BaseCommand):
    help = "Start a migration of one or more VMs (by VMware instance UUID or inventory name)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("vms", nargs="+", metavar="VM")

    def handle(self, *args: Any, **options: Any) -> None:
        failed = []
        for ref in options["vms"]:
            vm = SourceVM.objects.filter(name=ref).first()
            try:
                job = start_migration(vm_id=vm.vm_id if vm else ref, requested_by="start_migration")
            except MigrationError as exc:
                self.stderr.write(f"{ref}: {exc}")
                failed.append(ref)
                continue
            self.stdout.write(f"{job.job_id}  {job.vm.name}")
        if failed:
            raise CommandError(f"not started: {', '.join(failed)}")
