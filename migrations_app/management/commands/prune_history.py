from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from migrations_app.retention import prune


class Command(BaseCommand):
    help = (
        "Delete job events of finished jobs, export events, login records and finished task rows older than "
        "--days (default OMA_RETENTION_DAYS). Jobs, mappings and volumes are kept. The follower runs it hourly."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--days", type=int, default=settings.OMA_RETENTION_DAYS)
        parser.add_argument("--dry-run", action="store_true", help="count, delete nothing")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["days"] < 1:
            self.stderr.write("--days must be at least 1")
            raise SystemExit(2)
        counts = prune(options["days"], dry_run=options["dry_run"])
        verb = "would delete" if options["dry_run"] else "deleted"
        self.stdout.write(", ".join(f"{verb} {n} {kind.replace('_', ' ')}" for kind, n in counts.items()))
