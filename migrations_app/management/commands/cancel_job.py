from typing import Any

from django.core.management.base import BaseCommand, CommandError

from migrations_app.actions import MigrationError, cancel_job


class Command(BaseCommand):
    help = "Cancel a job: the VMA stops copying; volumes and exports are kept for a retry."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("job_id")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            job = cancel_job(job_id=options["job_id"], actor="cancel_job")
        except MigrationError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"{job.job_id} {job.state}")
