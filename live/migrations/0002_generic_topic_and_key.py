# Topics are named by the apps that announce them (the transport lists none), and the key is generic:
# whatever object the topic is about, not only a job.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("live", "0001_initial"),
    ]

    operations = [
        migrations.RenameField(model_name="liveupdate", old_name="job_pk", new_name="key"),
        migrations.AlterField(model_name="liveupdate", name="topic", field=models.CharField(max_length=32)),
    ]
