import json
from typing import Any

from django.core.management.base import BaseCommand

from migrations_app.models import MigrationJob


class Command(BaseCommand):
    help = "List migration jobs, newest first."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--json", action="store_true")
        parser.add_argument("--limit", type=int, default=50)

    def handle(self, *args: Any, **options: Any) -> None:
        jobs = MigrationJob.objects.select_related("vm").prefetch_related("disks__source_disk")[: options["limit"]]
        rows: list[dict[str, Any]] = [
            {
                "job_id": job.job_id,
                "vm": job.vm.name,
                "kind": job.kind,
                "state": job.state,
                "step": job.current_step,
                "attempt": job.attempt,
                "error": job.error,
                "disks": [
                    {
                        "unit": d.source_disk.unit_number,
                        "bytes_done": d.bytes_done,
                        "bytes_total": d.bytes_total,
                        "change_id": d.new_change_id,
                    }
                    for d in job.disks.all()
                ],
            }
            for job in jobs
        ]
        if options["json"]:
            self.stdout.write(json.dumps(rows))
            return
        for row in rows:
            done = sum(d["bytes_done"] for d in row["disks"])
            total = sum(d["bytes_total"] for d in row["disks"]) or 1
            self.stdout.write(
                f"{row['job_id']}  {row['vm']:<16} {row['kind']:<13} {row['state']:<14} {row['step']:<14} "
                f"{100 * done // total:>3}%  {row['error']}"
            )
