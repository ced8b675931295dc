from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from devtools.vma_sim import Faults, VmaSimulator, demo_inventory


class Command(BaseCommand):
    help = "Serve the VMA agent simulator (docs/vma-api.md) with a demo inventory; it copies real bytes."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=0, help="0: pick a free port")
        parser.add_argument("--token", required=True)
        parser.add_argument("--data-dir", default=str(settings.VAR_DIR / "vma-sim"))
        parser.add_argument("--size-mib", type=int, default=256, help="size of each demo disk")
        parser.add_argument("--fail-at", type=int, help="fail every copy at this percentage")
        parser.add_argument("--drop-at", type=int, help="drop the NBD connection at this percentage")
        parser.add_argument("--stall", action="store_true", help="copies never progress")
        parser.add_argument("--rate", type=int, help="limit each full copy to this many bits per second")
        parser.add_argument(
            "--tls-credentials",
            "--tls-psk-file",
            dest="tls_credentials",
            help="this VMA's NBD TLS key file (nbdkit) or certificate folder (nbd-server): needed for nbds://",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        vms = demo_inventory(Path(options["data_dir"]), size_mib=options["size_mib"])
        faults = Faults(options["fail_at"], options["drop_at"], options["stall"], options["rate"])
        credentials = Path(options["tls_credentials"]) if options["tls_credentials"] else None
        server = VmaSimulator(vms, options["token"], faults, credentials).serve(options["host"], options["port"])
        port = server.server_address[1]
        self.stdout.write(f"VMA simulator on http://{options['host']}:{port}/api/v1 with {len(vms)} demo VMs")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
