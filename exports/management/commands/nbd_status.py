import json
from dataclasses import asdict
from typing import Any

from django.core.management.base import BaseCommand

from exports.health import check_nbd_server
from exports.helper_client import HelperFailed

# Monitoring-plugin exit codes: an alert can run this command as it is.
EXIT_OK, EXIT_DEGRADED, EXIT_DOWN, EXIT_UNKNOWN = 0, 1, 2, 3


class Command(BaseCommand):
    help = (
        "Show the shared NBD server's verified state and compare served exports with the database. "
        "Exits 0 when healthy, 1 when degraded (an export not served), 2 when down, 3 when it cannot tell."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument("--repair", action="store_true", help="start a dead server, make missing exports served")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            check = check_nbd_server(repair=options["repair"], actor="nbd_status")
        except HelperFailed as exc:
            self.stderr.write(f"cannot tell: {exc}")
            raise SystemExit(EXIT_UNKNOWN) from exc
        code = {"ok": EXIT_OK, "degraded": EXIT_DEGRADED, "down": EXIT_DOWN}.get(check.health, EXIT_UNKNOWN)
        if options["json"]:
            self.stdout.write(json.dumps(asdict(check), sort_keys=True))
            raise SystemExit(code)
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
        if check.parked:
            w(f"parked:    {len(check.parked)} export(s) whose volume is detached (served again when attached)")
        raise SystemExit(code)
