from typing import Any

from django.core.management.base import BaseCommand, CommandError

from migrations_app.actions import MigrationError, end_test_failover
from migrations_app.failover_cli import find_vm, job_json, report


class Command(BaseCommand):
    help = "End a VM's running test failover: the test VM goes, its volumes return to the OMA, syncs go on."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("vm", metavar="VM", help="inventory name or VMware instance UUID")
        parser.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        vm = find_vm(options["vm"])
        try:
            job = end_test_failover(vm_id=vm.vm_id, actor="end_test_failover")
        except MigrationError as exc:
            raise CommandError(str(exc)) from exc
        report(self, options["json"], job_json(job), f"{job.job_id}  ending the test of {vm.name}")
