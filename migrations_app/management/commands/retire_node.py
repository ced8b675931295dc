import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from migrations_app.nodes import NodeError, retire


class Command(BaseCommand):
    help = (
        "Retire a lost OMA node (decommissioned, or gone for good): it leaves the nodes page, the node list "
        "and the metrics. Refused while it is up or still holds an active job or a volume. It comes back if "
        "its services start again."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("node", metavar="NODE", help="the node's name (OMA_NODE_NAME)")
        parser.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            node = retire(options["node"], actor="retire_node")
        except NodeError as exc:
            raise CommandError(str(exc)) from exc
        if options["json"]:
            self.stdout.write(json.dumps({"node": node.name, "retired": True}))
        else:
            self.stdout.write(f"{node.name} retired: it no longer shows as a node of this portal")
