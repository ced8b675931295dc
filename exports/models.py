"""VM export mappings, the NBD server's observed state, and the export audit log."""

from __future__ import annotations

import re
import uuid

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q

MAX_DISK_UNIT = 63
EXPORT_NAME_PREFIX = "migration-vm-"
# The same rules the privileged helper applies (deploy/oma_nbd_helper.py, tests/exports/test_rules.py
# checks they agree); the helper is the authority, this copy gives the admin and the commands a clear
# message before anything runs.
DEVICE_RE = re.compile(r"/[A-Za-z0-9._/+:@-]{1,254}")


def normalize_vm_id(value: str) -> str:
    """A VMware instance UUID in canonical lower-case form, or ValidationError."""
    text = str(value).strip()
    try:
        parsed = uuid.UUID(text)
    except (ValueError, AttributeError, TypeError) as exc:
        raise ValidationError(f"{value!r} is not a VMware instance UUID") from exc
    if text.lower() not in {str(parsed), parsed.hex}:
        raise ValidationError(f"{value!r} is not a VMware instance UUID in standard form")
    return str(parsed)


def validate_disk_unit(value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_DISK_UNIT:
        raise ValidationError(f"disk unit number must be an integer from 0 to {MAX_DISK_UNIT}, got {value!r}")


def is_canonical(path: str) -> bool:
    """One spelling per path (the helper's rule too), so comparing device strings compares devices."""
    return "//" not in path and "/./" not in path and not path.endswith(("/", "/."))


def validate_device_path(value: str) -> None:
    if not isinstance(value, str) or not DEVICE_RE.fullmatch(value) or ".." in value:
        raise ValidationError(
            f"device {value!r} must be an absolute path of letters, digits and ._/+:@- (no '..', spaces, "
            "'[', '=' or line breaks)"
        )
    if not is_canonical(value):
        raise ValidationError(f"device {value!r} must be written canonically: no '//', '/./' or trailing '/'")


def export_name_for(vm_id: str, disk_unit: int) -> str:
    return f"{EXPORT_NAME_PREFIX}{normalize_vm_id(vm_id)}-disk{disk_unit}"


class VMExportMapping(models.Model):
    """One VM disk's persistent NBD export. The name never moves to another VM disk."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending (written, not yet verified served)"
        ACTIVE = "active", "Active (served)"
        ERROR = "error", "Error"
        RETIRED = "retired", "Retired"

    vm_id = models.CharField(max_length=36, help_text="VMware instance UUID, lower case")
    vm_name = models.CharField(max_length=255)
    disk_unit_number = models.PositiveSmallIntegerField(validators=[validate_disk_unit])
    export_name = models.CharField(max_length=80, unique=True, editable=False)
    device_path = models.CharField(max_length=255, validators=[validate_device_path])
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    # The OMA node whose NBD server serves it (OMA_NODE_NAME): a device path names a device on that node.
    node = models.CharField(max_length=64, default="local")
    status_detail = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    last_verified_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "VM export mapping"
        ordering = ["vm_name", "vm_id", "disk_unit_number"]
        constraints = [
            models.UniqueConstraint(fields=["vm_id", "disk_unit_number"], name="one_export_per_vm_disk"),
            models.UniqueConstraint(
                fields=["node", "device_path"], condition=~Q(status="retired"), name="one_live_export_per_device"
            ),
            models.CheckConstraint(condition=Q(disk_unit_number__lte=MAX_DISK_UNIT), name="disk_unit_in_range"),
        ]
        indexes = [models.Index(fields=["status"]), models.Index(fields=["node", "status"])]

    def __str__(self) -> str:
        return self.export_name

    def clean(self) -> None:
        self.vm_id = normalize_vm_id(self.vm_id)
        validate_disk_unit(self.disk_unit_number)
        validate_device_path(self.device_path)
        expected = export_name_for(self.vm_id, self.disk_unit_number)
        if self.export_name and self.export_name != expected:
            raise ValidationError("export_name is derived from vm_id and disk unit and cannot change")


class NbdServerState(models.Model):
    """What the portal last observed of the shared NBD server on one OMA node."""

    class Health(models.TextChoices):
        OK = "ok", "OK"
        DEGRADED = "degraded", "Degraded"
        DOWN = "down", "Down"
        UNKNOWN = "unknown", "Unknown"

    node = models.CharField(max_length=64, unique=True, default="local")
    backend = models.CharField(max_length=16)
    version = models.CharField(max_length=64, blank=True)
    address = models.CharField(max_length=128, blank=True)
    health = models.CharField(max_length=16, choices=Health.choices, default=Health.UNKNOWN)
    main_pid = models.PositiveIntegerField(null=True, blank=True)
    main_started_at = models.DateTimeField(null=True, blank=True)
    reload_count = models.PositiveIntegerField(default=0)
    restarts_detected = models.PositiveIntegerField(default=0)
    crashes_detected = models.PositiveIntegerField(default=0)
    lost_exports_detected = models.PositiveIntegerField(default=0)
    repairs = models.PositiveIntegerField(default=0)
    exports_expected = models.PositiveIntegerField(default=0)
    exports_served = models.PositiveIntegerField(default=0)
    last_check_at = models.DateTimeField(null=True, blank=True)
    last_reload_at = models.DateTimeField(null=True, blank=True)
    warnings = models.JSONField(default=list, blank=True)

    class Meta:
        verbose_name = "NBD server state"

    def __str__(self) -> str:
        return f"{self.backend} on {self.node} ({self.health})"


class ExportEvent(models.Model):
    """Audit row for every export change and every server incident."""

    mapping = models.ForeignKey(
        VMExportMapping, null=True, blank=True, on_delete=models.SET_NULL, related_name="events"
    )
    export_name = models.CharField(max_length=80, blank=True, db_index=True)
    kind = models.CharField(max_length=48, db_index=True)
    message = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True)
    actor = models.CharField(max_length=150, default="system")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.kind} {self.export_name}"
