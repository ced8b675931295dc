from __future__ import annotations

from django.db import models


class LoginEvent(models.Model):
    """Every login, logout, failed password and throttled attempt, on the portal and in the admin."""

    class Kind(models.TextChoices):
        LOGIN = "login"
        LOGOUT = "logout"
        FAILURE = "failure"
        THROTTLED = "throttled"

    kind = models.CharField(max_length=16, choices=Kind.choices, db_index=True)
    username = models.CharField(max_length=150, db_index=True)
    address = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.kind} {self.username} from {self.address}"

    @classmethod
    def record(cls, kind: str, username: str, address: str) -> LoginEvent:
        # Whatever was typed as a user name is stored only as printable text of bounded length.
        clean = "".join(ch if ch.isprintable() else "?" for ch in username)[:150]
        return cls.objects.create(kind=kind, username=clean, address=address[:64])
