import json
from typing import Any

from django.core.management.base import BaseCommand

from migrations_app.nodes import node_rows


class Command(BaseCommand):
    help = "The OMA nodes: state (up, drained, down), attach slots, jobs and copies, NBD server, heartbeat."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--json", action="store_true", help="one JSON object per node, in a list")

    def handle(self, *args: Any, **options: Any) -> None:
        rows = node_rows()
        if options["json"]:
            self.stdout.write(json.dumps([row.as_dict() for row in rows], indent=2))
            return
        if not rows:
            self.stdout.write("no OMA node has registered yet (a node registers when its follower starts)")
            return
        self.stdout.write(f"{'NODE':<16} {'STATE':<8} {'SLOTS':>9} {'JOBS':>5} {'COPIES':>6}  {'NBD':<9} HEARTBEAT")
        for row in rows:
            beat = row.beat_at.isoformat(timespec="seconds") if row.beat_at else "never"
            slots = f"{row.slots_used}/{row.node.attach_slots}"
            self.stdout.write(
                f"{row.node.name:<16} {row.state:<8} {slots:>9} {row.active_jobs:>5} {row.copies:>6}  "
                f"{row.nbd_health:<9} {beat}"
            )
            if row.node.drained:
                reason = f": {row.node.drain_reason}" if row.node.drain_reason else ""
                self.stdout.write(f"{'':<16} drained by {row.node.drained_by or '?'}{reason}")
