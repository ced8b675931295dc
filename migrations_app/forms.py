"""Forms of the operator pages (validation only; saving goes through ``actions``)."""

from __future__ import annotations

from django import forms

from .backends import get_compute_backend
from .models import FailoverPlan, MigrationGroup, NetworkMapping, OfferingMapping, SourceVM, TemplateMapping
from .volumes import VolumeError


class GroupForm(forms.ModelForm):
    vms = forms.ModelMultipleChoiceField(
        queryset=SourceVM.objects.order_by("name"),
        to_field_name="vm_id",
        required=False,
        widget=forms.CheckboxSelectMultiple,
        label="Members",
        help_text="A VM belongs to one group at most: ticking one moves it here from its group.",
    )

    class Meta:
        model = MigrationGroup
        fields = ["name", "sync_interval_minutes", "max_concurrent", "enabled"]
        labels = {
            "sync_interval_minutes": "Sync every (minutes)",
            "max_concurrent": "At most at once",
            "enabled": "Scheduled syncs on",
        }

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if self.instance.pk:
            self.fields["vms"].initial = list(self.instance.vms.values_list("vm_id", flat=True))


class CloudCheckedForm(forms.ModelForm):
    """A mapping form whose ids must name something the cloud has: each field in ``cloud_fields`` is
    checked against the compute backend's list (networks, offerings or templates) before it is saved."""

    cloud_fields: dict[str, str] = {}

    def clean(self) -> dict[str, object]:
        cleaned = super().clean() or {}
        wanted = {name: str(cleaned.get(name) or "").strip() for name in self.cloud_fields}
        if not any(wanted.values()):
            return cleaned
        compute = get_compute_backend()
        known: dict[str, dict[str, str]] = {}
        try:
            for name, what in self.cloud_fields.items():
                if wanted[name] and what not in known:
                    known[what] = {c.id: c.name for c in getattr(compute, what)()}
        except VolumeError as exc:
            raise forms.ValidationError(f"CloudStack cannot be reached to check the ids: {exc}") from exc
        for name, what in self.cloud_fields.items():
            value = wanted[name]
            if value and value not in known[what]:
                self.add_error(name, f"CloudStack has no {what[:-1]} with id {value}")
            elif value:
                cleaned[name] = value
        return cleaned


class NetworkMappingForm(CloudCheckedForm):
    cloud_fields = {"network_id": "networks", "test_network_id": "networks"}

    class Meta:
        model = NetworkMapping
        fields = ["source_network", "network_id", "test_network_id"]


class OfferingMappingForm(CloudCheckedForm):
    cloud_fields = {"offering_id": "offerings"}

    class Meta:
        model = OfferingMapping
        fields = ["name", "offering_id", "cpus", "memory_mib"]

    def clean(self) -> dict[str, object]:
        cleaned = super().clean()
        if (cleaned.get("cpus") is None) != (cleaned.get("memory_mib") is None):
            raise forms.ValidationError("give both CPUs and memory, or neither (a custom offering)")
        return cleaned


class TemplateMappingForm(CloudCheckedForm):
    cloud_fields = {"template_id": "templates"}

    class Meta:
        model = TemplateMapping
        fields = ["firmware", "template_id"]


class FailoverPlanForm(CloudCheckedForm):
    cloud_fields = {"template_id": "templates"}

    class Meta:
        model = FailoverPlan
        fields = ["vm", "offering", "template_id", "networks"]

    def clean_networks(self) -> dict[str, str]:
        value = self.cleaned_data.get("networks") or {}
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise forms.ValidationError('give {"source network": "CloudStack network id", ...}')
        return value
