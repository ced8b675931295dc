from django.apps import AppConfig


class MigrationsAppConfig(AppConfig):
    name = "migrations_app"
    verbose_name = "Migrations"

    def ready(self) -> None:
        # Import the task entry points (and the workflow, httpx and the export core behind them) now:
        # django-q2 forks its workers from a process that has already run ready(), so a job's first
        # pickup in each worker does not pay ~80 ms of imports.
        from . import checks, tasks  # noqa: F401
