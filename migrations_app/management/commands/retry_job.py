from typing import Any

from django.core.management.base import BaseCommand, CommandError

from migrations_app.actions import MigrationError, retry_job


class Command(BaseCommand):
    help = "Retry a failed or cancelled job from the step where it stopped."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("job_id")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            job = retry_job(job_id=options["job_id"], actor="retry_job")
        except MigrationError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"{job.job_id} {job.state} (attempt {job.attempt}, resumes at {job.current_step or 'start'})")
