import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from migrations_app.nodes import NodeError, drain


class Command(BaseCommand):
    help = "Drain an OMA node: the copies running on it finish, nothing new is placed on it until undrain_node."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("node", metavar="NODE", help="the node's name (OMA_NODE_NAME)")
        parser.add_argument("--reason", default="", help="why, shown on the nodes page and to waiting jobs")
        parser.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            node, changed = drain(options["node"], actor="drain_node", reason=options["reason"])
        except NodeError as exc:
            raise CommandError(str(exc)) from exc
        if options["json"]:
            self.stdout.write(json.dumps({"node": node.name, "drained": True, "changed": changed}))
        elif changed:
            self.stdout.write(f"{node.name} drained: running copies finish, nothing new starts on it")
        else:
            self.stdout.write(f"{node.name} was drained already (by {node.drained_by or '?'}); nothing changed")
