"""Create the viewer/operator/admin groups and, optionally, the first admin (or any user in a role)."""

from __future__ import annotations

import os
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.management.base import BaseCommand, CommandError, CommandParser

from omaportal.web.roles import ADMIN, OPERATOR, VIEWER, setup_roles


class Command(BaseCommand):
    help = (
        "Create or repair the viewer, operator and admin groups. With --user, also create (or update) that "
        "user in --role; the password comes from --password-env (an environment variable's name), never argv."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--user", help="username to create or update")
        parser.add_argument("--role", choices=[VIEWER, OPERATOR, ADMIN], default=ADMIN)
        parser.add_argument("--email", default="")
        parser.add_argument("--password-env", default="OMA_ADMIN_PASSWORD", help="variable holding the password")

    def handle(self, *args: Any, **options: Any) -> None:
        counts = setup_roles()
        for name, count in counts.items():
            self.stdout.write(f"group {name}: {count} permissions")
        if not options["user"]:
            return
        password = os.environ.get(options["password_env"], "")
        User = get_user_model()
        user, created = User.objects.get_or_create(username=options["user"], defaults={"email": options["email"]})
        if created and not password:
            user.delete()
            raise CommandError(f"set {options['password_env']} to the new user's password")
        if password:
            user.set_password(password)
        role = options["role"]
        user.is_staff = role == ADMIN
        user.is_superuser = role == ADMIN
        user.save()
        user.groups.set([Group.objects.get(name=role)])
        self.stdout.write(f"{'created' if created else 'updated'} {user.get_username()} as {role}")
