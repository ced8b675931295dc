from typing import Any

from django.core.management.base import BaseCommand, CommandError

from migrations_app.actions import MigrationError, start_failover
from migrations_app.failover_cli import find_vm, job_json, report
from migrations_app.models import JobKind


class Command(BaseCommand):
    help = (
        "Fail a VM over to CloudStack: --live (shut the source down, final sync, boot the VM) or --test "
        "(boot a copy on the isolated test network; end it with end_test_failover). The job runs on the "
        "node's workers; follow it with `jobs` or the job page."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("vm", metavar="VM", help="inventory name or VMware instance UUID")
        kind = parser.add_mutually_exclusive_group(required=True)
        kind.add_argument("--live", action="store_true")
        kind.add_argument("--test", action="store_true")
        parser.add_argument(
            "--allow-power-off", action="store_true", help="power the source off if a guest shutdown fails"
        )
        parser.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        vm = find_vm(options["vm"])
        kind = JobKind.LIVE_FAILOVER if options["live"] else JobKind.TEST_FAILOVER
        try:
            job = start_failover(
                vm_id=vm.vm_id, kind=kind, allow_power_off=options["allow_power_off"], requested_by="failover"
            )
        except MigrationError as exc:
            raise CommandError(str(exc)) from exc
        report(self, options["json"], job_json(job), f"{job.job_id}  {job.get_kind_display()} of {vm.name} queued")
