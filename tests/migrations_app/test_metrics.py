"""/metrics for Prometheus (protected), and pruning history past its retention."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_q.models import Task
from prometheus_client.parser import text_string_to_metric_families

from exports.models import ExportEvent, NbdServerState
from migrations_app.models import DestinationVolume, JobDisk, JobEvent, JobState, OmaNode
from migrations_app.retention import prune
from omaportal.web.models import LoginEvent
from tests.support.factories import UserFactory, client_as, make_jobs

pytestmark = pytest.mark.django_db

TOKEN = "scrape-token-for-tests"


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_need_the_token_or_a_viewer(make_user: UserFactory, settings: Any) -> None:
    settings.OMA_METRICS_TOKEN = TOKEN
    url = "/metrics"
    assert Client().get(url).status_code == 401
    assert Client().get(url, HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert client_as(make_user("none")).get(url).status_code == 401
    assert Client().get(url, HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 200
    assert client_as(make_user("viewer")).get(url).status_code == 200
    settings.OMA_METRICS_TOKEN = ""  # no token configured: an empty bearer is no key
    assert Client().get(url, HTTP_AUTHORIZATION="Bearer ").status_code == 401


def test_metrics_say_jobs_bytes_slots_and_nbd_health(settings: Any) -> None:
    settings.OMA_METRICS_TOKEN = TOKEN
    running = make_jobs(3, state=JobState.REPLICATING)
    make_jobs(2, state=JobState.FAILED)
    node = OmaNode.objects.create(name="oma-1", attach_slots=25)
    for disk in JobDisk.objects.filter(job=running[0]).select_related("source_disk"):
        DestinationVolume.objects.create(
            source_disk=disk.source_disk, node=node, state=DestinationVolume.State.ATTACHED
        )
    NbdServerState.objects.create(
        node="oma-1", backend="nbdkit", health="degraded", reload_count=0, restarts_detected=2,
        lost_exports_detected=1, exports_expected=6, exports_served=5,
    )  # fmt: skip
    response = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain")
    found = samples(response.content)
    assert found[("oma_jobs", (("state", "replicating"),))] == 3
    assert found[("oma_jobs", (("state", "failed"),))] == 2
    assert found[("oma_jobs", (("state", "completed"),))] == 0
    copied = sum(JobDisk.objects.values_list("bytes_done", flat=True))
    assert found[("oma_copied_bytes_total", ())] == copied > 0
    rate = sum(JobDisk.objects.filter(job__state=JobState.REPLICATING).values_list("throughput_bps", flat=True))
    assert found[("oma_copy_throughput_bytes_per_second", ())] == rate
    assert found[("oma_attach_slots_used", (("node", "oma-1"),))] == 2
    assert found[("oma_attach_slots", (("node", "oma-1"),))] == 25
    assert found[("oma_node_up", (("node", "oma-1"),))] == 0, "no follower has beaten on it"
    assert found[("oma_node_drained", (("node", "oma-1"),))] == 0
    assert found[("oma_nbd_server_up", (("node", "oma-1"),))] == 1
    assert found[("oma_nbd_server_health", (("health", "degraded"), ("node", "oma-1")))] == 1
    assert found[("oma_nbd_server_health", (("health", "ok"), ("node", "oma-1")))] == 0
    assert found[("oma_nbd_restarts_total", (("node", "oma-1"),))] == 2
    assert found[("oma_nbd_lost_exports_total", (("node", "oma-1"),))] == 1
    assert found[("oma_nbd_exports_served", (("node", "oma-1"),))] == 5


def test_pruning_deletes_only_old_history_of_finished_jobs(settings: Any) -> None:
    settings.OMA_RETENTION_DAYS = 30
    old = timezone.now() - timedelta(days=31)
    finished = make_jobs(1, state=JobState.COMPLETED)[0]
    active = make_jobs(1, state=JobState.REPLICATING)[0]
    JobEvent.objects.update(created_at=old)  # every event is old now
    recent = JobEvent.objects.create(job=finished, kind="job.note")
    ExportEvent.objects.create(kind="export.created")
    ExportEvent.objects.create(kind="export.created")
    ExportEvent.objects.filter(pk=ExportEvent.objects.first().pk).update(created_at=old)  # type: ignore[union-attr]
    LoginEvent.objects.create(kind="login", username="a", address="x")
    LoginEvent.objects.update(created_at=old)
    Task.objects.create(id="t1", name="t1", func="f", started=old, stopped=old, success=True)
    Task.objects.create(id="t2", name="t2", func="f", started=timezone.now(), stopped=timezone.now(), success=True)
    active_events = JobEvent.objects.filter(job=active).count()

    out = StringIO()
    call_command("prune_history", "--dry-run", stdout=out)
    assert "would delete" in out.getvalue() and JobEvent.objects.filter(job=finished).count() > 1

    counts = prune()
    assert counts["job_events"] > 0 and counts["export_events"] == 1 and counts["login_events"] == 1
    assert counts["tasks"] == 1
    assert list(JobEvent.objects.filter(job=finished)) == [recent]
    assert JobEvent.objects.filter(job=active).count() == active_events  # an active job keeps its history
    assert ExportEvent.objects.count() == 1 and list(Task.objects.values_list("id", flat=True)) == ["t2"]


def test_a_finished_task_is_saved_without_reading_the_others(db: None) -> None:
    """Every task row is kept until it is old (the retention above prunes it): saving one does not read
    the others, however many there are (django-q2's default reads and locks the last 250 each time,
    and drops the oldest, which also hid all but the last 250 from the fleet bench's duplicate count)."""
    from django_q.monitor import save_task

    now = timezone.now()
    Task.objects.bulk_create(
        [Task(id=f"t{i}", name=f"t{i}", func="f", started=now, stopped=now, success=True) for i in range(300)]
    )
    package = {
        "id": "new",
        "name": "new",
        "func": "migrations_app.tasks.run_job_task",
        "args": (1,),
        "kwargs": {},
        "started": now,
        "stopped": now,
        "result": "completed",
        "success": True,
        "sync": True,
    }
    with CaptureQueriesContext(connection) as queries:
        save_task(package, broker=None)
    assert Task.objects.count() == 301
    read_all = [q["sql"] for q in queries.captured_queries if "LIMIT" not in q["sql"] and q["sql"].startswith("SELECT")]
    assert not read_all, read_all
