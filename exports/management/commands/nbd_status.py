import json
from dataclasses import asdict
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from exports.health import check_nbd_server
from exports.helper_client import HelperFailed


class Command(BaseCommand):
    help = "Show the shared NBD server's verified state and compare served exports with the database."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument("--repair", action="store_true", help="start a dead server, make missing exports served")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            check = check_nbd_server(repair=options["repair"], actor="nbd_status")
        except HelperFailed as exc:
            raise CommandError(str(exc)) from exc
        if options["json"]:
            self.stdout.write(json.dumps(asdict(check), sort_keys=True))
            return
        w = self.stdout.write
        w(f"backend:   {check.backend} {check.version} on {check.address}")
        w(f"health:    {check.health}")
        w(f"main pid:  {check.pid or '-'}")
        w(f"exports:   {len(set(check.expected) & set(check.served))} served of {len(check.expected)} expected")
        for name in check.missing:
            w(self.style.ERROR(f"  missing: {name}"))
        for name in check.unknown_served:
            w(self.style.WARNING(f"  served but not in the database: {name}"))
        for text in check.warnings:
            w(self.style.WARNING(f"warning:   {text}"))
        for text in check.incidents:
            w(self.style.WARNING(f"incident:  {text}"))
