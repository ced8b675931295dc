"""Forms of the operator pages (validation only; saving goes through ``actions``)."""

from __future__ import annotations

from django import forms

from .models import MigrationGroup, SourceVM


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
