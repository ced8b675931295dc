"""The progress follower now recovers silent workers every tick; the once-a-minute recovery schedule
(which queued a task per stale job, duplicates included) goes. Pruning the live outbox stays scheduled."""

from django.apps.registry import Apps
from django.db import migrations
from django.db.backends.base.schema import BaseDatabaseSchemaEditor


def forwards(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    schedule = apps.get_model("django_q", "Schedule")
    schedule.objects.filter(name="recover-stale-jobs").delete()
    schedule.objects.update_or_create(
        name="prune-live-updates",
        defaults={"func": "live.outbox.prune_live_updates", "schedule_type": "I", "minutes": 5, "repeats": -1},
    )


def backwards(apps: Apps, schema_editor: BaseDatabaseSchemaEditor) -> None:
    apps.get_model("django_q", "Schedule").objects.filter(name="prune-live-updates").delete()


class Migration(migrations.Migration):
    dependencies = [
        ("migrations_app", "0007_destination_volumes_from_job_disks"),
        ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more"),
    ]

    operations = [
        migrations.RunPython(forwards, backwards),
    ]
