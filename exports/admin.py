"""Django admin for export mappings: every change goes through exports.actions and the helper."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.forms.models import construct_instance
from django.http import HttpRequest

from . import actions
from .models import (
    ExportEvent,
    NbdServerState,
    VMExportMapping,
    normalize_vm_id,
    validate_device_path,
    validate_disk_unit,
)


class MappingForm(forms.ModelForm):
    class Meta:
        model = VMExportMapping
        fields = ["vm_id", "vm_name", "disk_unit_number", "device_path"]

    def clean_vm_id(self) -> str:
        return normalize_vm_id(self.cleaned_data["vm_id"])

    def clean_disk_unit_number(self) -> int:
        value = self.cleaned_data["disk_unit_number"]
        validate_disk_unit(value)
        return int(value)

    def clean_device_path(self) -> str:
        value = self.cleaned_data["device_path"]
        validate_device_path(value)
        return str(value)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if self.instance.pk:
            # The export name is derived from (vm_id, disk): changing either would move a name to
            # another VM disk, which never happens.
            for field in ("vm_id", "disk_unit_number"):
                if field in data and data[field] != getattr(self.instance, field):
                    self.add_error(field, "Cannot change on an existing mapping; create a new one instead.")
        return data

    def _post_clean(self) -> None:
        # Copy the cleaned values onto the instance, but leave the model-level checks (unique
        # constraints) to ensure_export, which reports them in the export's own words; the helper
        # does the filesystem checks.
        self.instance = construct_instance(self, self.instance, self._meta.fields, self._meta.exclude)


@admin.register(VMExportMapping)
class VMExportMappingAdmin(admin.ModelAdmin):
    form = MappingForm
    list_display = [
        "export_name",
        "vm_name",
        "disk_unit_number",
        "device_path",
        "status",
        "last_used_at",
        "last_verified_at",
    ]
    list_filter = ["status", "disk_unit_number", "created_at"]
    search_fields = ["vm_id", "vm_name", "export_name", "device_path"]
    readonly_fields = [
        "export_name",
        "status",
        "status_detail",
        "created_at",
        "updated_at",
        "last_used_at",
        "last_verified_at",
    ]
    actions = ["verify_served", "republish", "retire"]
    list_per_page = 100

    def get_readonly_fields(self, request: HttpRequest, obj: VMExportMapping | None = None) -> list[str]:
        fields = list(self.readonly_fields)
        if obj is not None:
            fields += ["vm_id", "disk_unit_number"]
        return fields

    def save_model(self, request: HttpRequest, obj: VMExportMapping, form: forms.Form, change: bool) -> None:
        try:
            saved = actions.ensure_export(
                vm_id=obj.vm_id,
                vm_name=obj.vm_name,
                disk_unit=obj.disk_unit_number,
                device=obj.device_path,
                actor=request.user.get_username(),
            )
        except actions.ExportUnavailable as exc:
            messages.warning(request, str(exc))
            saved = VMExportMapping.objects.get(vm_id=obj.vm_id, disk_unit_number=obj.disk_unit_number)
        obj.pk = saved.pk
        obj.export_name = saved.export_name

    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> Any:
        # Django runs the whole add/change form in one transaction. save_model calls ensure_export,
        # which must run outside any: it may wait for an nbd-server reload, and an open transaction
        # would hold its locks meanwhile (on SQLite, the write lock every worker's progress write
        # needs). ensure_export makes its own transactions; the form writes nothing else.
        return self._changeform_view(request, object_id, form_url, extra_context)  # type: ignore[attr-defined]

    def add_view(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        return self._refusals_as_form_errors(super().add_view, request, *args, **kwargs)

    def change_view(self, request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        return self._refusals_as_form_errors(super().change_view, request, *args, **kwargs)

    def _refusals_as_form_errors(self, view: Any, request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
        try:
            return view(request, *args, **kwargs)
        except (actions.ExportRefused, actions.ExportConflict, actions.ExportError) as exc:
            # Nothing was written: show the reason and send the admin back to the list.
            from django.http import HttpResponseRedirect

            messages.error(request, f"Refused, nothing changed: {exc}")
            return HttpResponseRedirect(request.get_full_path())

    def has_delete_permission(self, request: HttpRequest, obj: VMExportMapping | None = None) -> bool:
        # A raw delete would leave a served link behind; retiring goes through the helper.
        return False

    @admin.action(description="Verify selected exports are served (repair if not)", permissions=["change"])
    def verify_served(self, request: HttpRequest, queryset: QuerySet[VMExportMapping]) -> None:
        self._each(request, queryset.exclude(status=VMExportMapping.Status.RETIRED), "verified")

    @admin.action(description="Re-publish selected exports (rewrite link, make served)", permissions=["change"])
    def republish(self, request: HttpRequest, queryset: QuerySet[VMExportMapping]) -> None:
        self._each(request, queryset, "published")

    def _each(self, request: HttpRequest, queryset: QuerySet[VMExportMapping], verb: str) -> None:
        done = 0
        for mapping in queryset:
            try:
                actions.ensure_export(
                    vm_id=mapping.vm_id,
                    vm_name=mapping.vm_name,
                    disk_unit=mapping.disk_unit_number,
                    device=mapping.device_path,
                    actor=request.user.get_username(),
                )
                done += 1
            except (actions.ExportError, ValidationError) as exc:
                messages.error(request, f"{mapping.export_name}: {exc}")
        messages.info(request, f"{done} export(s) {verb}.")

    @admin.action(description="Retire selected exports (remove link; the name stays reserved)", permissions=["change"])
    def retire(self, request: HttpRequest, queryset: QuerySet[VMExportMapping]) -> None:
        done = 0
        for mapping in queryset:
            try:
                actions.retire_export(
                    vm_id=mapping.vm_id, disk_unit=mapping.disk_unit_number, actor=request.user.get_username()
                )
                done += 1
            except actions.ExportError as exc:
                messages.error(request, f"{mapping.export_name}: {exc}")
        messages.info(request, f"{done} export(s) retired.")


@admin.register(NbdServerState)
class NbdServerStateAdmin(admin.ModelAdmin):
    list_display = [
        "node",
        "backend",
        "version",
        "health",
        "exports_served",
        "exports_expected",
        "reload_count",
        "restarts_detected",
        "crashes_detected",
        "last_check_at",
    ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: NbdServerState | None = None) -> bool:
        return False


@admin.register(ExportEvent)
class ExportEventAdmin(admin.ModelAdmin):
    list_display = ["created_at", "kind", "export_name", "actor", "message"]
    list_filter = ["kind", "actor"]
    search_fields = ["export_name", "message"]
    list_select_related = ["mapping"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: ExportEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: ExportEvent | None = None) -> bool:
        return False
