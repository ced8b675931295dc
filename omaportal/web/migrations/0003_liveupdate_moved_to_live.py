# The live-update outbox moved to the live app (live.LiveUpdate). Its rows are notifications that are
# relayed within milliseconds and pruned after ten minutes, so the table is dropped here and created
# afresh by live's first migration rather than carried over.

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("web", "0002_progress_topic"),
    ]

    operations = [
        migrations.DeleteModel(name="LiveUpdate"),
    ]
