import signal
import time
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import close_old_connections

from devtools.devserver import write_layout
from exports import actions
from exports.backends import get_backend
from exports.conf import nbd_conf
from exports.health import check_nbd_server
from exports.helper_client import HelperFailed
from exports.reconcile import reconcile_exports


class Command(BaseCommand):
    help = (
        "Development/demo supervisor: lay out the NBD server under var/nbd, start it through the helper, "
        "check it every few seconds (restarting it if it dies), stop it on SIGTERM. Production uses systemd."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--interval", type=float, default=5.0, help="seconds between checks")
        parser.add_argument("--demo-exports", type=int, default=0, help="create N demo volumes and exports")

    def handle(self, *args: Any, **options: Any) -> None:
        conf = nbd_conf()
        if conf.helper_config is None:
            raise CommandError("run_nbd_server lays out a dev NBD server and needs OMA_NBD_HELPER_CONFIG")
        tls = conf.tls_on
        layout = write_layout(Path(conf.helper_config).parent, conf.backend, conf.host, conf.port, tls=tls)
        if Path(conf.export_root) != layout.export_root:
            raise CommandError(f"OMA_NBD EXPORT_ROOT {conf.export_root} must be {layout.export_root} in dev mode")
        credentials = conf.tls_psk_file or conf.tls_cert_dir
        if tls and Path(str(credentials)) != layout.portal_tls:
            key = "TLS_PSK_FILE" if conf.tls_psk_file else "TLS_CERT_DIR"
            raise CommandError(f"OMA_NBD {key} {credentials} must be {layout.portal_tls} in dev mode")
        backend = get_backend()
        try:
            started = backend.start()
        except HelperFailed as exc:
            # A server this supervisor did not start holds the port (one per node): say so, never a second.
            raise CommandError(f"{exc}; is another NBD server running for this node?") from exc
        scheme = "nbds" if tls else "nbd"
        self.stdout.write(f"{backend.name} serving {scheme}://{backend.host}:{backend.port}/ (pid {started['pid']})")
        # The database is the truth: every live mapping is published (link, conf file) and served again,
        # whatever backend or server wrote it before.
        self._publish_all()
        stopping = False

        def stop(signum: int, frame: object) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        try:
            for n in range(options["demo_exports"]):
                self._demo_export(layout.volume_root, n)
            while not stopping:
                try:
                    check = check_nbd_server(repair=True, actor="run_nbd_server")
                    for incident in check.incidents:
                        self.stderr.write(f"incident: {incident}")
                    if check.incidents:
                        self._publish_all()  # a repaired server serves what the database says again
                except Exception as exc:
                    # A database error (locked, restarting) must not take the server down with it: every
                    # transfer in flight would die. Report, and check again later.
                    self.stderr.write(f"check failed, trying again: {exc}")
                    close_old_connections()
                deadline = time.monotonic() + options["interval"]
                while not stopping and time.monotonic() < deadline:
                    time.sleep(0.2)
        finally:
            if stopping:  # asked to stop (honcho, Ctrl-C); never on its own error path
                backend.stop()
                self.stdout.write("NBD server stopped")
            else:
                self.stderr.write("supervisor exits; the NBD server keeps serving")

    def _publish_all(self) -> None:
        try:
            report = reconcile_exports(fix=True, actor="run_nbd_server")
        except Exception as exc:
            self.stderr.write(f"publishing the mappings failed: {exc}")
            return
        for line in report.fixed:
            self.stdout.write(f"republished: {line}")
        for line in report.unfixed:
            self.stderr.write(f"not fixed: {line}")

    def _demo_export(self, volume_root: Path, n: int) -> None:
        vm_id = f"4210{n:04x}-0000-4000-8000-{n:012x}"
        volume = volume_root / f"demo-vm{n}-disk0.img"
        if not volume.exists():
            with open(volume, "wb") as fh:
                fh.truncate(1 << 30)
        mapping = actions.ensure_export(
            vm_id=vm_id, vm_name=f"demo-vm-{n}", disk_unit=0, device=str(volume), actor="run_nbd_server"
        )
        self.stdout.write(
            f"demo export {'nbds' if nbd_conf().tls_on else 'nbd'}://{nbd_conf().address}/{mapping.export_name}"
        )
