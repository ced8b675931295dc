import secrets
import sys
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand

from devtools.cloud import map_cloud
from devtools.devserver import free_port
from devtools.vma_sim import demo_inventory
from exports.conf import nbd_conf
from migrations_app.actions import save_group, sync_inventory
from migrations_app.backends import get_compute_backend
from migrations_app.models import MigrationGroup, NetworkMapping
from omaportal.web.roles import ADMIN, setup_roles

# The Procfile's simulator serves 256 MiB demo disks (run_vma_sim --size-mib 256).
DEMO_DISK_MIB = 256


DEMO_GROUP = "warm-demo"
DEMO_GROUP_VMS = ["app-01", "file-01"]


class Command(BaseCommand):
    help = (
        "Pick free loopback ports for the demo, make sure an admin exists, read the simulator's inventory "
        "and make a warm migration group of two of its VMs (first run), print the env for honcho."
    )

    def _warm_group(self) -> None:
        """The demo's own warm migration: two of the simulator's VMs synced every 3 minutes, one at a time
        (the simulator builds the same deterministic inventory when it starts)."""
        if MigrationGroup.objects.filter(name=DEMO_GROUP).exists():
            return
        vms = demo_inventory(settings.VAR_DIR / "vma-sim", size_mib=DEMO_DISK_MIB)
        sync_inventory([vm.as_json() for vm in vms])
        save_group(
            group=None,
            name=DEMO_GROUP,
            sync_interval_minutes=3,
            max_concurrent=1,
            enabled=True,
            vm_ids=[vm.id for vm in vms if vm.name in DEMO_GROUP_VMS],
            actor="demo_env",
        )

    def _nbd_line(self, port: int) -> str:
        conf = nbd_conf()
        if not conf.tls_on:
            return f"  NBD server:  nbd://127.0.0.1:{port}/  (backend {conf.backend}, plain NBD)\n"
        if conf.tls_cert_dir:
            kind, query = "certificates", f"tls-certificates={settings.VAR_DIR / 'nbd' / 'vma-x509'}"
        else:
            kind, query = "pre-shared keys", f"tls-psk-file={settings.VAR_DIR / 'nbd' / 'vma.psk'}"
        return (
            f"  NBD server:  nbds://127.0.0.1:{port}/  (backend {conf.backend}, TLS with {kind};\n"
            f"               try: nbdinfo --list 'nbds://vma@127.0.0.1:{port}/?{query}')\n"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        web, nbd, vma = free_port(), free_port(), free_port()
        token_file = settings.VAR_DIR / "demo-vma-token"
        if not token_file.exists():
            token_file.write_text(secrets.token_urlsafe(16) + "\n")
            token_file.chmod(0o600)
        token = token_file.read_text().strip()
        password_file = settings.VAR_DIR / "demo-admin-password"
        user_model = get_user_model()
        if not password_file.exists() or not user_model.objects.filter(username="admin").exists():
            password = secrets.token_urlsafe(12)
            user, _ = user_model.objects.get_or_create(username="admin", defaults={"is_staff": True})
            user.is_staff = user.is_superuser = True
            user.set_password(password)
            user.save()
            password_file.write_text(password + "\n")
            password_file.chmod(0o600)
        password = password_file.read_text().strip()
        setup_roles()
        user_model.objects.get(username="admin").groups.add(Group.objects.get(name=ADMIN))
        self._warm_group()
        if not NetworkMapping.objects.exists():
            map_cloud(get_compute_backend())  # the embedded cloud's networks, offerings and templates
        self.stdout.write(
            f"OMA_WEB_PORT={web}\nOMA_NBD_PORT={nbd}\nOMA_VMA_PORT={vma}\n"
            f"OMA_VMA_URL=http://127.0.0.1:{vma}\nOMA_VMA_TOKEN={token}\nOMA_VMA_NBD_PORT={nbd}\n"
            # Recorded, so a command in a second terminal (make demo-jobs, nbd_status) sees the same server.
            f"OMA_NBD_BACKEND={nbd_conf().backend}\nOMA_NBD_TLS_PSK_FILE={nbd_conf().tls_psk_file or ''}\n"
            f"OMA_NBD_TLS_CERT_DIR={nbd_conf().tls_cert_dir or ''}\n"
            # The simulated VMA's credentials: its key file (nbdkit) or certificate folder (nbd-server).
            f"OMA_VMA_TLS_CREDENTIALS=var/nbd/{'vma-x509' if nbd_conf().tls_cert_dir else 'vma.psk'}\n"
            # The demo asks for debug mode: daphne then serves the static files itself (no proxy here).
            "DJANGO_DEBUG=1\n"
        )
        sys.stderr.write(
            "\n"
            f"  OMA portal:  http://127.0.0.1:{web}/   (log in as admin / {password})\n"
            f"  Admin:       http://127.0.0.1:{web}/admin/\n"
            + self._nbd_line(nbd)
            + f"  VMA (simulator): http://127.0.0.1:{vma}/api/v1  (4 demo VMs, real bytes)\n"
            f"  Warm migration: group {DEMO_GROUP} syncs {' and '.join(DEMO_GROUP_VMS)} every 3 minutes (Groups).\n"
            "  Migrate a demo VM: VMs -> Refresh from the VMA -> tick the VMs -> Migrate;\n"
            "  or from another terminal:  make demo-migrate VM=web-01   (progress: make demo-jobs)\n"
            "  Fail over a synced VM: VMs -> failover (a test, then live), or manage.py failover VM --test\n"
            "  More users: manage.py setup_roles --user NAME --role viewer|operator|admin\n"
            "              (the password comes from $OMA_ADMIN_PASSWORD)\n"
            "  Stop with Ctrl-C.\n\n"
        )
