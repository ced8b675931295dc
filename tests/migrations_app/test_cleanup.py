"""cleanup_job and cleanup_orphans: what they remove, and what they must keep."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from django.core.management import call_command

from devtools.vma_sim import Faults
from exports import actions as export_actions
from exports.models import VMExportMapping
from migrations_app import actions
from migrations_app.backends import get_volume_backend
from migrations_app.models import JobState, MigrationJob
from tests.support.flows import drive, migrate, wire
from tests.support.nbd import RunningServer
from tests.support.vma import SimFactory

pytestmark = pytest.mark.django_db(transaction=True)


def test_cleanup_of_a_failed_first_job_removes_its_export_and_volume(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    sim = make_sim(Faults(fail_at_percent=10), size_mib=64)
    wire(settings, nbdkit_server, sim)
    job = migrate("web-01", sim)
    assert job.state == JobState.FAILED
    disk = job.disks.get()
    export_name, device = disk.mapping.export_name, disk.device_path  # type: ignore[union-attr]
    lines = actions.cleanup_job(job_id=job.job_id, actor="tester")
    assert any("retired export" in line for line in lines) and any("deleted volume" in line for line in lines)
    assert not (nbdkit_server.layout.export_root / export_name).is_symlink()
    assert not Path(device).exists()
    assert VMExportMapping.objects.get(export_name=export_name).status == VMExportMapping.Status.RETIRED
    assert job.events.filter(kind="job.cleaned_up").exists()


def test_cleanup_keeps_a_volume_that_holds_a_completed_sync(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    sim = make_sim(size_mib=16)
    wire(settings, nbdkit_server, sim)
    first = migrate("web-01", sim)
    assert first.state == JobState.COMPLETED
    sim.sim.faults.stall = True
    second = actions.start_migration(vm_id=sim.vm("web-01").id)
    MigrationJob.objects.filter(pk=second.pk).update(state=JobState.FAILED, current_step=JobState.REPLICATING)
    lines = actions.cleanup_job(job_id=second.job_id)
    assert lines == [f"disk 0: kept volume {first.disks.get().volume_id} (holds a completed sync)"]
    assert Path(first.disks.get().device_path).exists()
    assert first.disks.get().mapping.status == VMExportMapping.Status.ACTIVE  # type: ignore[union-attr]


def test_cleanup_refuses_a_job_that_is_not_failed_or_cancelled(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    sim = make_sim(size_mib=16)
    wire(settings, nbdkit_server, sim)
    job = migrate("web-01", sim)
    with pytest.raises(actions.MigrationError, match="only a failed or cancelled job"):
        actions.cleanup_job(job_id=job.job_id)
    assert Path(job.disks.get().device_path).exists()


def orphans(*args: str) -> tuple[int, dict[str, list[str]]]:
    out = io.StringIO()
    try:
        call_command("cleanup_orphans", "--json", *args, stdout=out)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, json.loads(out.getvalue())


def test_cleanup_orphans_reports_then_fixes(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    sim = make_sim(size_mib=16)
    wire(settings, nbdkit_server, sim)
    job = migrate("web-01", sim)
    backend = get_volume_backend()
    stray = backend.create_volume("oma-stray", 1)
    backend.attach_volume(stray.id)
    unknown_vm = "4210dead-0000-4000-8000-000000000000"
    mapping = export_actions.ensure_export(
        vm_id=unknown_vm, vm_name="gone", disk_unit=0, device=nbdkit_server.volume("manual.img")
    )
    code, report = orphans()
    assert code == 1
    assert report["orphan_volumes"] == [f"{stray.id} oma-stray"]
    assert report["orphan_mappings"] == [mapping.export_name]
    code, report = orphans("--fix")
    assert code == 1, "the detached volume still exists"
    assert backend.get_volume(stray.id) is not None and not backend.get_volume(stray.id).attached_device  # type: ignore[union-attr]
    assert VMExportMapping.objects.get(pk=mapping.pk).status == VMExportMapping.Status.RETIRED
    code, report = orphans("--delete-volumes")
    assert code == 0 and backend.get_volume(stray.id) is None
    assert Path(job.disks.get().device_path).exists(), "a job's volume is never an orphan"


def test_cancelled_job_can_be_retried_after_a_cancel(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    sim = make_sim(size_mib=16)
    wire(settings, nbdkit_server, sim)
    job = actions.start_migration(vm_id=sim.vm("web-01").id)
    actions.cancel_job(job_id=job.job_id)
    assert MigrationJob.objects.get(pk=job.pk).state == JobState.CANCELLED
    actions.retry_job(job_id=job.job_id)
    (job,) = drive(job)
    assert job.state == JobState.COMPLETED
