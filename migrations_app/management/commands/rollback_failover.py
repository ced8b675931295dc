from typing import Any

from django.core.management.base import BaseCommand, CommandError

from migrations_app.actions import MigrationError, rollback_failover
from migrations_app.failover_cli import find_vm, job_json, report


class Command(BaseCommand):
    help = (
        "Roll a VM's last failover back: the CloudStack VM is stopped and destroyed, the volumes return to "
        "the OMA, and the source is powered on again if it was on."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("vm", metavar="VM", help="inventory name or VMware instance UUID")
        parser.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        vm = find_vm(options["vm"])
        try:
            job = rollback_failover(vm_id=vm.vm_id, actor="rollback_failover")
        except MigrationError as exc:
            raise CommandError(str(exc)) from exc
        report(self, options["json"], job_json(job), f"{job.job_id}  rolling back the failover of {vm.name}")
