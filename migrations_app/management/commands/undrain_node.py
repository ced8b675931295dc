import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from migrations_app.nodes import NodeError, undrain


class Command(BaseCommand):
    help = "Undrain an OMA node: it takes new work again."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("node", metavar="NODE", help="the node's name (OMA_NODE_NAME)")
        parser.add_argument("--json", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            node, changed = undrain(options["node"], actor="undrain_node")
        except NodeError as exc:
            raise CommandError(str(exc)) from exc
        if options["json"]:
            self.stdout.write(json.dumps({"node": node.name, "drained": False, "changed": changed}))
        elif changed:
            self.stdout.write(f"{node.name} undrained: it takes new work again")
        else:
            self.stdout.write(f"{node.name} was not drained; nothing changed")
