"""Django admin for migration groups (changes go through ``actions.save_group``) and a read-only view of
nodes and destination volumes."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.http import HttpRequest

from .actions import MigrationError, save_group
from .forms import FailoverPlanForm, GroupForm, NetworkMappingForm, OfferingMappingForm, TemplateMappingForm
from .models import (
    DestinationVolume,
    FailoverPlan,
    MigrationGroup,
    NetworkMapping,
    NodeEvent,
    OfferingMapping,
    OmaNode,
    TemplateMapping,
)


@admin.register(MigrationGroup)
class MigrationGroupAdmin(admin.ModelAdmin):
    form = GroupForm
    list_display = ["name", "sync_interval_minutes", "max_concurrent", "enabled", "members"]
    list_filter = ["enabled"]
    search_fields = ["name", "vms__name"]

    @admin.display(description="members")
    def members(self, obj: MigrationGroup) -> int:
        return obj.vms.count()

    def save_model(self, request: HttpRequest, obj: MigrationGroup, form: Any, change: bool) -> None:
        try:
            saved = save_group(
                group=obj if change else None,
                name=form.cleaned_data["name"],
                sync_interval_minutes=form.cleaned_data["sync_interval_minutes"],
                max_concurrent=form.cleaned_data["max_concurrent"],
                enabled=form.cleaned_data["enabled"],
                vm_ids=[vm.vm_id for vm in form.cleaned_data["vms"]],
                actor=request.user.get_username(),
            )
        except MigrationError as exc:
            messages.error(request, str(exc))
            return
        obj.pk = saved.pk

    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> Any:
        # save_group is a durable transaction of its own; Django's form transaction would wrap it.
        return self._changeform_view(request, object_id, form_url, extra_context)  # type: ignore[attr-defined]


@admin.register(OmaNode)
class OmaNodeAdmin(admin.ModelAdmin):
    list_display = ["name", "attach_slots", "nbd_address", "drained_at", "follower", "follower_beat_at"]
    # Registration writes the address and VM id, the follower its lease; draining goes through the nodes
    # page or drain_node (each recorded as a NodeEvent).
    readonly_fields = [
        "nbd_address",
        "oma_vm_id",
        "follower",
        "follower_beat_at",
        "drained_at",
        "drained_by",
        "drain_reason",
        "created_at",
    ]


@admin.register(NodeEvent)
class NodeEventAdmin(admin.ModelAdmin):
    list_display = ["created_at", "node", "kind", "actor", "message"]
    list_filter = ["kind", "node"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: NodeEvent | None = None) -> bool:
        return False


@admin.register(DestinationVolume)
class DestinationVolumeAdmin(admin.ModelAdmin):
    list_display = ["source_disk", "volume_id", "state", "node", "last_used_at", "attaches", "detaches"]
    list_filter = ["state", "node"]
    search_fields = ["volume_id", "source_disk__vm__name"]
    list_select_related = ["source_disk__vm", "node"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: DestinationVolume | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: DestinationVolume | None = None) -> bool:
        return False


# Failover mappings: every id is checked against CloudStack before it is saved.


@admin.register(NetworkMapping)
class NetworkMappingAdmin(admin.ModelAdmin):
    form = NetworkMappingForm
    list_display = ["source_network", "network_id", "test_network_id", "updated_at"]
    search_fields = ["source_network", "network_id"]


@admin.register(OfferingMapping)
class OfferingMappingAdmin(admin.ModelAdmin):
    form = OfferingMappingForm
    list_display = ["name", "offering_id", "cpus", "memory_mib"]


@admin.register(TemplateMapping)
class TemplateMappingAdmin(admin.ModelAdmin):
    form = TemplateMappingForm
    list_display = ["firmware", "template_id"]


@admin.register(FailoverPlan)
class FailoverPlanAdmin(admin.ModelAdmin):
    form = FailoverPlanForm
    list_display = ["vm", "offering", "template_id"]
    search_fields = ["vm__name"]
