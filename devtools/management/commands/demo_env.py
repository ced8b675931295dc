import secrets
import sys
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand

from devtools.devserver import free_port
from exports.conf import nbd_conf
from omaportal.web.roles import ADMIN, setup_roles


class Command(BaseCommand):
    help = "Pick free loopback ports for the demo, make sure an admin exists, print the env for honcho."

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
        self.stdout.write(
            f"OMA_WEB_PORT={web}\nOMA_NBD_PORT={nbd}\nOMA_VMA_PORT={vma}\n"
            f"OMA_VMA_URL=http://127.0.0.1:{vma}\nOMA_VMA_TOKEN={token}\nOMA_VMA_NBD_PORT={nbd}\n"
        )
        sys.stderr.write(
            "\n"
            f"  OMA portal:  http://127.0.0.1:{web}/   (log in as admin / {password})\n"
            f"  Admin:       http://127.0.0.1:{web}/admin/\n"
            f"  NBD server:  nbd://127.0.0.1:{nbd}/  (backend {nbd_conf().backend}; try: nbdinfo --list nbd://127.0.0.1:{nbd})\n"
            f"  VMA (simulator): http://127.0.0.1:{vma}/api/v1  (4 demo VMs, real bytes)\n"
            "  Migrate a demo VM: VMs -> Refresh from the VMA -> tick the VMs -> Migrate;\n"
            "  or from another terminal:  make demo-migrate VM=web-01   (progress: make demo-jobs)\n"
            "  More users: manage.py setup_roles --user NAME --role viewer|operator|admin\n"
            "              (the password comes from $OMA_ADMIN_PASSWORD)\n"
            "  Stop with Ctrl-C.\n\n"
        )
