"""Every VM disk that a job already gave a volume gets its DestinationVolume row: the volume of its
latest job, attached on this node if that job recorded a device, and the node's row with its slots.
Jobs already running are this node's."""

import os

from django.apps.registry import Apps
from django.db import migrations
from django.db.backends.base.schema import BaseDatabaseSchemaEditor


def forwards(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    job_disk = apps.get_model("migrations_app", "JobDisk")
    volume_model = apps.get_model("migrations_app", "DestinationVolume")
    node_model = apps.get_model("migrations_app", "OmaNode")
    latest: dict[int, tuple[str, str]] = {}
    for source_disk_id, volume_id, device in (
        job_disk.objects.exclude(volume_id="")
        .order_by("job__created_at", "job_id")
        .values_list("source_disk_id", "volume_id", "device_path")
    ):
        latest[source_disk_id] = (volume_id, device)
    job_model = apps.get_model("migrations_app", "MigrationJob")
    active = ["pending", "provisioning", "attaching", "exporting", "replicating", "cancelling"]
    if not latest and not job_model.objects.filter(state__in=active).exists():
        return
    node, _ = node_model.objects.get_or_create(name=os.environ.get("OMA_NODE_NAME", "local"))
    # Jobs already running belong to this node: its follower finishes them.
    job_model.objects.filter(state__in=active).exclude(state="pending").update(node=node)
    for source_disk_id, (volume_id, device) in latest.items():
        volume_model.objects.update_or_create(
            source_disk_id=source_disk_id,
            defaults={
                "volume_id": volume_id,
                "device_path": device,
                "state": "attached" if device else "detached",
                "node": node if device else None,
            },
        )


class Migration(migrations.Migration):
    dependencies = [
        ("migrations_app", "0006_nodes_volumes_and_groups"),
    ]

    operations = [
        migrations.RunPython(forwards, migrations.RunPython.noop),
    ]
