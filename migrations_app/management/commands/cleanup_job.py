from typing import Any

from django.core.management.base import BaseCommand, CommandError

from migrations_app.actions import MigrationError, cleanup_job


class Command(BaseCommand):
    help = "Remove a failed or cancelled job's exports and volumes (volumes holding a completed sync are kept)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("job_id")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            lines = cleanup_job(job_id=options["job_id"], actor="cleanup_job")
        except MigrationError as exc:
            raise CommandError(str(exc)) from exc
        for line in lines:
            self.stdout.write(line)
