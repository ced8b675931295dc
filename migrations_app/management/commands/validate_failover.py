from typing import Any

from django.core.management.base import BaseCommand, CommandError

from migrations_app.failover import blocking, plan_for, readiness
from migrations_app.failover_cli import checks_json, find_vm, report
from migrations_app.models import JobKind


class Command(BaseCommand):
    help = "Check whether a VM is ready for a failover: each check passes, warns or fails, with a sentence."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("vm", metavar="VM", help="inventory name or VMware instance UUID")
        parser.add_argument("--test", action="store_true", help="for a test failover (its isolated network)")
        parser.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        vm = find_vm(options["vm"])
        kind = JobKind.TEST_FAILOVER if options["test"] else JobKind.LIVE_FAILOVER
        checks = readiness(vm, kind)
        plan = plan_for(vm, options["test"])
        ready = not blocking(checks)
        lines = [f"{c.status.upper():4}  {c.name:9} {c.message}" for c in checks]
        lines.append(f"{'ready' if ready else 'NOT ready'}: {vm.name} as {plan.name}")
        report(
            self,
            options["json"],
            {
                "vm": vm.name,
                "kind": kind,
                "ready": ready,
                "checks": checks_json(checks),
                "plan": {
                    "name": plan.name,
                    "offering": plan.offering.name if plan.offering else None,
                    "template_id": plan.template_id,
                    "nics": [{"network_id": n.network_id, "mac": n.mac} for n in plan.nics],
                },
            },
            "\n".join(lines),
        )
        if not ready:
            raise CommandError(f"{vm.name} is not ready for a failover")
