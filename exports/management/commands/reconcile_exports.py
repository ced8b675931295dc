import json
from dataclasses import asdict
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from exports.helper_client import HelperFailed
from exports.reconcile import reconcile_exports


class Command(BaseCommand):
    help = (
        "Compare export mappings with the links/conf files and with what the NBD server serves. "
        "--fix repairs what is safe and reports the rest. Exit status 1 when problems remain."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--fix", action="store_true")
        parser.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            report = reconcile_exports(fix=options["fix"], actor="reconcile_exports")
        except HelperFailed as exc:
            raise CommandError(str(exc)) from exc
        if options["json"]:
            self.stdout.write(json.dumps({**asdict(report), "clean": report.clean}, sort_keys=True))
        else:
            for key, values in asdict(report).items():
                for value in values:
                    self.stdout.write(f"{key.replace('_', ' ')}: {value}")
            self.stdout.write("clean" if report.clean else "problems found")
        if not report.clean and (not options["fix"] or report.unfixed):
            raise SystemExit(1)
