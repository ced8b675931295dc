"""The migration workflow end to end: local volumes, real NBD server, the VMA simulator copying real bytes."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from devtools.vma_sim import Faults
from exports.models import NbdServerState, VMExportMapping
from migrations_app import actions, tasks, workflow
from migrations_app.follower import detach_volume
from migrations_app.models import DestinationVolume, JobEvent, JobState, MigrationJob
from migrations_app.volumes import LocalVolumeBackend, VolumeError
from migrations_app.workflow import run_job
from tests.support.flows import assert_copied, drive, migrate, wire
from tests.support.nbd import RunningServer
from tests.support.vma import Sim, SimFactory

pytestmark = pytest.mark.django_db(transaction=True)


def test_job_completes_and_every_volume_matches_its_source(
    nbdkit_server: RunningServer, sim: Sim, settings: object
) -> None:
    wire(settings, nbdkit_server, sim)
    job = migrate("db-01", sim)
    assert job.state == JobState.COMPLETED, job.error
    assert_copied(job, sim)
    disks = list(job.disks.all())
    assert len(disks) == 2 and all(d.new_change_id and d.bytes_done == d.bytes_total for d in disks)
    finished = JobEvent.objects.filter(job=job, kind="step.finished").values_list("step", flat=True)
    assert list(finished) == ["provisioning", "attaching", "exporting", "replicating", "verifying"]
    assert all(e.duration_ms is not None for e in JobEvent.objects.filter(job=job, kind="step.finished"))
    verified = job.events.get(kind="sync.verified").message
    assert verified == "2 disk(s) read back and matched the VMA's digests"
    assert all(d.digest["ranges"] == [[0, d.source_disk.capacity_bytes]] and d.verified_at for d in disks)
    # The VMA copied over TLS with its own key (nbdkit requires it by default); the portal read back with its own.
    urls = [copy.nbd_url for r in sim.sim.replications.values() for copy in r.copies]
    assert urls and all(url.startswith(f"nbds://vma@127.0.0.1:{nbdkit_server.layout.port}/") for url in urls)


def test_second_job_is_an_incremental_sync_on_the_same_volume_and_export(
    nbd_server: RunningServer, sim: Sim, settings: object
) -> None:
    wire(settings, nbd_server, sim)
    first = migrate("web-01", sim)
    assert first.state == JobState.COMPLETED, first.error
    # Over TLS on both backends: pre-shared keys on nbdkit, client certificates on nbd-server.
    urls = [copy.nbd_url for r in sim.sim.replications.values() for copy in r.copies]
    assert urls and all(url.startswith("nbds://") for url in urls), urls
    reloads = NbdServerState.objects.get().reload_count if NbdServerState.objects.exists() else 0
    second = migrate("web-01", sim)
    assert second.state == JobState.COMPLETED, second.error
    one, two = first.disks.get(), second.disks.get()
    assert two.previous_change_id == one.new_change_id and two.new_change_id != one.new_change_id
    assert two.volume_id == one.volume_id and two.mapping_id == one.mapping_id
    assert two.bytes_total < one.bytes_total // 4, "an incremental sync copies only changed blocks"
    after = NbdServerState.objects.get().reload_count if NbdServerState.objects.exists() else 0
    assert after == reloads, "reusing the export must not reload the NBD server"
    assert_copied(second, sim)


def test_cancel_during_the_copy_keeps_volume_and_export(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    stalled = make_sim(Faults(stall=True), size_mib=16)
    wire(settings, nbdkit_server, stalled)
    job = actions.start_migration(vm_id=stalled.vm("web-01").id)
    drive(job, until=lambda j: j.state == JobState.REPLICATING and bool(j.replication_id))
    actions.cancel_job(job_id=job.job_id, actor="tester")
    (job,) = drive(job)
    assert job.state == JobState.CANCELLED
    disk = job.disks.get()
    assert Path(disk.device_path).exists() and disk.mapping is not None
    assert disk.mapping.status == VMExportMapping.Status.ACTIVE
    assert stalled.sim.replications[f"{job.job_id}-1"].state == "cancelled"


def test_retry_after_a_fault_resumes_at_the_failed_step_and_completes(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    faulty = make_sim(Faults(fail_at_percent=30), size_mib=64)
    wire(settings, nbdkit_server, faulty)
    job = migrate("web-01", faulty)
    assert job.state == JobState.FAILED and job.current_step == JobState.REPLICATING
    assert "injected failure at 30%" in job.error
    faulty.sim.faults.fail_at_percent = None
    actions.retry_job(job_id=job.job_id, actor="tester")
    (job,) = drive(job)
    assert job.state == JobState.COMPLETED and job.attempt == 2
    assert JobEvent.objects.filter(job=job, kind="volume.ready").count() == 1, "no second volume"
    assert_copied(job, faulty)


def test_unreachable_vma_fails_with_a_clear_reason(nbdkit_server: RunningServer, sim: Sim, settings: object) -> None:
    wire(settings, nbdkit_server, sim)
    sim.close()
    job = migrate("web-01", sim)
    assert job.state == JobState.FAILED and "VMA unreachable" in job.error
    disk = job.disks.get()
    assert disk.volume_id and Path(disk.device_path).exists(), "the volume is kept and accounted for"


def test_refusals(nbdkit_server: RunningServer, sim: Sim, settings: object) -> None:
    wire(settings, nbdkit_server, sim)
    with pytest.raises(actions.MigrationError, match="not a VMware instance UUID"):
        actions.start_migration(vm_id="web-01; drop table")
    with pytest.raises(actions.MigrationError, match="no VM"):
        actions.start_migration(vm_id="4210aaaa-bbbb-4ccc-8ddd-eeeeffff0000")
    job = actions.start_migration(vm_id=sim.vm("web-01").id)
    with pytest.raises(actions.MigrationError, match="already has an active job"):
        actions.start_migration(vm_id=sim.vm("web-01").id)
    with pytest.raises(actions.MigrationError, match="only a failed or cancelled job"):
        actions.retry_job(job_id=job.job_id)
    drive(job)
    with pytest.raises(actions.MigrationError, match="only a pending or running job"):
        actions.cancel_job(job_id=job.job_id)
    with pytest.raises(actions.MigrationError, match="no job"):
        actions.cancel_job(job_id="job-nope")


def test_a_job_run_by_a_live_worker_is_not_taken_twice(
    nbdkit_server: RunningServer, sim: Sim, settings: object
) -> None:
    wire(settings, nbdkit_server, sim)
    job = actions.start_migration(vm_id=sim.vm("web-01").id)
    assert run_job(job.pk, "test-runner") is None, "a pending job is the dispatcher's, not a worker's"
    from django.utils import timezone

    MigrationJob.objects.filter(pk=job.pk).update(
        state=JobState.PROVISIONING,
        current_step=JobState.PROVISIONING,
        runner="other-live-worker",
        heartbeat_at=timezone.now(),
    )
    assert run_job(job.pk, "test-runner") is None
    assert MigrationJob.objects.get(pk=job.pk).runner == "other-live-worker"


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"job_failures": {"createVolume": (530, "Failed to create volume (fake)")}}, "createVolume failed (530)"),
        ({"sync_failures": {"createVolume": (431, "Invalid disk offering")}}, "createVolume failed (431)"),
        ({"stall": True}, "did not finish within 1s"),
    ],
)
def test_cloudstack_errors_and_timeouts_fail_the_job_clearly(
    nbdkit_server: RunningServer, sim: Sim, settings: object, tmp_path: Path, fault: dict[str, object], message: str
) -> None:
    from tests.support.fake_cloudstack import FakeCloudStack

    wire(settings, nbdkit_server, sim)
    (tmp_path / "by-id").mkdir()
    cloud = FakeCloudStack(tmp_path / "by-id").start()
    try:
        for key, value in fault.items():
            setattr(cloud, key, value)
        settings.OMA_VOLUMES = {  # type: ignore[attr-defined]
            "BACKEND": "cloudstack",
            "CLOUDSTACK": {
                "ENDPOINT": cloud.endpoint,
                "KEY": cloud.key,
                "SECRET": cloud.secret,
                "ZONE_ID": cloud.zone_id,
                "DISK_OFFERING_ID": cloud.offering_id,
                "OMA_VM_ID": cloud.oma_vm_id,
                "JOB_TIMEOUT": 1,
                "POLL_INTERVAL": 0.05,
                "DEVICE_ROOT": str(tmp_path / "by-id"),
            },
        }
        job = migrate("web-01", sim)
        assert job.state == JobState.FAILED and job.current_step == JobState.PROVISIONING
        assert message in job.error and job.error.startswith("provisioning:")
        assert not job.disks.exclude(volume_id="").exists(), "no volume recorded, none leaked"
        assert not VMExportMapping.objects.exists()
        # The cloud finishes what it was asked (a timed-out create still makes its volume): cleanup finds
        # the volume by its name and deletes it, so nothing is left behind.
        cloud.finish_jobs()
        cloud.stall = False  # and answers again
        made = list(cloud.volumes)
        assert made or not fault.get("stall"), "a timed-out create finishes later"
        lines = actions.cleanup_job(job_id=job.job_id, actor="tester")
        assert not cloud.volumes, lines
        assert all(f"deleted volume {volume_id}" in "; ".join(lines) for volume_id in made)
    finally:
        cloud.stop()


def reloads() -> int:
    state = NbdServerState.objects.first()
    return state.reload_count if state else 0


def attached() -> dict[str, str]:
    return {
        f"{v.source_disk.vm.name}/{v.source_disk.unit_number}": v.state
        for v in DestinationVolume.objects.select_related("source_disk__vm")
    }


def test_idle_volumes_are_detached_when_slots_run_short_and_reattached_with_their_export_reused(
    nbd_server: RunningServer, sim: Sim, settings: object
) -> None:
    wire(settings, nbd_server, sim)
    settings.OMA_WORKFLOW = {**settings.OMA_WORKFLOW, "ATTACH_SLOTS": 2}  # type: ignore[attr-defined]
    first = migrate("db-01", sim)  # takes both slots
    assert first.state == JobState.COMPLETED
    assert attached() == {"db-01/0": "attached", "db-01/1": "attached"}
    second = migrate("web-01", sim)  # needs one slot: the least recently used idle volume is detached
    assert second.state == JobState.COMPLETED, second.error
    assert sorted(attached().values()) == ["attached", "attached", "detached"]
    assert "attach slots" in second.events.get(kind="job.queued").message
    links, before = nbd_server.helper_calls().count("link"), reloads()
    again = migrate("db-01", sim)  # an incremental sync: its detached volume is attached again
    assert again.state == JobState.COMPLETED, again.error
    assert again.disks.exclude(previous_change_id="").count() == 2, "incremental on the same volumes"
    assert_copied(again, sim)
    assert nbd_server.helper_calls().count("link") == links, "re-attached: the export is reused, no helper write"
    assert reloads() == before, "and no reload"
    assert DestinationVolume.objects.filter(node__isnull=False).count() <= 2
    assert sum(DestinationVolume.objects.values_list("detaches", flat=True)) == 2


def test_jobs_wait_when_the_active_job_limit_is_reached(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    stalled = make_sim(Faults(stall=True))
    wire(settings, nbdkit_server, stalled)
    settings.OMA_WORKFLOW = {**settings.OMA_WORKFLOW, "MAX_ACTIVE_JOBS": 1}  # type: ignore[attr-defined]
    busy = actions.start_migration(vm_id=stalled.vm("db-01").id)
    drive(busy, until=lambda j: j.state == JobState.REPLICATING)
    waiting = actions.start_migration(vm_id=stalled.vm("web-01").id)
    drive(waiting, until=lambda j: j.state == JobState.PENDING and bool(j.wait_reason))
    waiting.refresh_from_db()
    assert waiting.state == JobState.PENDING and waiting.wait_reason == "1 jobs are active, the maximum is 1"
    assert "1 jobs are active, the maximum is 1" in waiting.events.get(kind="job.queued").message
    actions.cancel_job(job_id=busy.job_id)
    drive(busy, waiting, until=lambda j: j.state == JobState.CANCELLED or j.state == JobState.REPLICATING)


def test_a_grown_source_disk_grows_its_volume_first(nbdkit_server: RunningServer, sim: Sim, settings: object) -> None:
    wire(settings, nbdkit_server, sim)
    first = migrate("web-01", sim)
    assert first.state == JobState.COMPLETED, first.error
    source = sim.vm("web-01").disks[0]
    source.capacity_bytes = (1 << 30) + (16 << 20)  # past the volume's whole GiB
    with open(source.image, "r+b") as fh:
        fh.truncate(source.capacity_bytes)
    actions.sync_inventory(sim.client.inventory())
    second = migrate("web-01", sim)
    assert second.state == JobState.COMPLETED, second.error
    grown = second.events.get(kind="volume.grown").message
    assert grown == "disk 0: the source disk grew to 1040 MiB; its volume grew from 1024 MiB to 2048 MiB"
    disk = second.disks.get()
    assert disk.previous_change_id, "still incremental: the volume kept its data"
    assert os.path.getsize(os.path.realpath(disk.device_path)) == 2 << 30
    assert_copied(second, sim)


def detach_all(name: str) -> None:
    """Detach the VM's idle volumes as the follower does to free their slots."""
    volumes = DestinationVolume.objects.filter(source_disk__vm__name=name)
    volumes.update(state=DestinationVolume.State.DETACHING)
    for pk in volumes.values_list("pk", flat=True):
        assert detach_volume(pk) == "detached"


def test_a_detach_frees_its_slot_and_counts_itself_in_one_write(
    nbdkit_server: RunningServer, sim: Sim, settings: object
) -> None:
    """The follower detaches volumes side by side, each write taking SQLite's write lock: the volume's
    release and its detach count are one statement."""
    wire(settings, nbdkit_server, sim)
    assert migrate("web-01", sim).state == JobState.COMPLETED
    volume = volume_of("web-01")
    DestinationVolume.objects.filter(pk=volume.pk).update(state=DestinationVolume.State.DETACHING)
    with CaptureQueriesContext(connection) as queries:
        assert detach_volume(volume.pk) == "detached"
    writes = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("UPDATE")]
    assert len(writes) == 1, writes
    volume.refresh_from_db()
    assert (volume.node, volume.state, volume.device_path, volume.detaches) == (
        None,
        DestinationVolume.State.DETACHED,
        "",
        1,
    )


@pytest.mark.parametrize("detached", [False, True], ids=["attached", "detached-between-syncs"])
def test_a_resyncs_bookkeeping_does_not_grow_with_its_disks(
    nbdkit_server: RunningServer, sim: Sim, settings: object, monkeypatch: pytest.MonkeyPatch, detached: bool
) -> None:
    """Round 2 of a fleet is many short incremental syncs, each one worker run of bookkeeping on a busy
    node: a step reads its disks, volumes and exports in one query each and writes them in one
    statement, so a 3-disk VM's re-sync costs the database what a 1-disk VM's does, also when its
    volumes were detached for other VMs' slots and are attached again."""
    wire(settings, nbdkit_server, sim)
    statements: list[str] = []
    run = tasks.run_job_task

    def counted(pk: int) -> str:
        with CaptureQueriesContext(connection) as queries:
            state = run(pk)
        statements.extend(q["sql"] for q in queries.captured_queries)
        return state

    counts = {}
    for name in ("web-01", "app-01"):
        assert migrate(name, sim).state == JobState.COMPLETED
        if detached:
            detach_all(name)
        statements.clear()
        with monkeypatch.context() as patched:
            patched.setattr(tasks, "run_job_task", counted)
            again = migrate(name, sim)
        assert again.state == JobState.COMPLETED and again.disks.exclude(previous_change_id="").exists()
        assert_copied(again, sim)
        counts[name] = len(statements)
    assert counts["app-01"] == counts["web-01"], counts
    if detached:
        assert set(DestinationVolume.objects.values_list("attaches", flat=True)) == {2}


def test_volumes_attached_before_a_failed_attach_are_recorded_as_attached(
    nbdkit_server: RunningServer, sim: Sim, settings: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node's slots are counted from the volume rows: when one volume's attach fails, the ones attached
    before it are still recorded attached (with their device), and a retry attaches only the rest."""
    wire(settings, nbdkit_server, sim)
    assert migrate("app-01", sim).state == JobState.COMPLETED
    detach_all("app-01")
    calls: list[str] = []
    real = LocalVolumeBackend.attach_volume

    def second_fails(self: LocalVolumeBackend, volume_id: str) -> str:
        calls.append(volume_id)
        if len(calls) == 2:
            raise VolumeError("the hypervisor refused the attach")
        return real(self, volume_id)

    monkeypatch.setattr(LocalVolumeBackend, "attach_volume", second_fails)
    job = actions.start_migration(vm_id=sim.vm("app-01").id)
    (job,) = drive(job)
    assert job.state == JobState.FAILED and "refused" in job.error and len(calls) == 2, (job.state, calls)
    volumes = {v.volume_id: v for v in DestinationVolume.objects.filter(source_disk__vm__name="app-01")}
    first = volumes[calls[0]]
    assert first.state == DestinationVolume.State.ATTACHED and first.device_path, first.state
    assert Path(first.device_path).exists()
    assert first.attaches == 2
    assert {v.state for pk, v in volumes.items() if pk != calls[0]} == {DestinationVolume.State.RESERVED}
    disk = job.disks.get(volume_id=calls[0])
    assert disk.device_path == first.device_path
    # A retry attaches the two that are not.
    (job,) = drive(actions.retry_job(job_id=job.job_id, actor="operator"))
    assert job.state == JobState.COMPLETED, job.error
    assert len(calls) == 4 and calls[3] != calls[0]
    assert_copied(job, sim)


def run_interrupted_in_provisioning(
    sim: Sim, runner: str, monkeypatch: pytest.MonkeyPatch, meanwhile: Callable[[MigrationJob], object]
) -> MigrationJob:
    """A new job of web-01 run by ``runner`` from provisioning, with ``meanwhile`` happening to it while
    its worker provisions (after the step's own work); the job as the run left it."""
    job = actions.start_migration(vm_id=sim.vm("web-01").id)
    MigrationJob.objects.filter(pk=job.pk).update(state=JobState.PROVISIONING, current_step=JobState.PROVISIONING)
    provision = workflow.STEP_FUNCTIONS[JobState.PROVISIONING]

    def interrupted(job: MigrationJob, runner: str) -> None:
        provision(job, runner)
        meanwhile(job)

    monkeypatch.setitem(workflow.STEP_FUNCTIONS, JobState.PROVISIONING, interrupted)
    run_job(job.pk, runner)
    job.refresh_from_db()
    return job


def test_a_worker_whose_job_was_taken_over_between_steps_writes_nothing_more(
    nbdkit_server: RunningServer, sim: Sim, settings: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker took the job over while this one ran a step (it was presumed dead): this one
    must not move the job on to its next step, nor record starting it; what it finished is recorded."""
    wire(settings, nbdkit_server, sim)

    def taken_over(job: MigrationJob) -> None:
        MigrationJob.objects.filter(pk=job.pk).update(runner="the-new-worker")

    job = run_interrupted_in_provisioning(sim, "the-old-worker", monkeypatch, taken_over)
    assert (job.state, job.runner) == (JobState.PROVISIONING, "the-new-worker")
    steps = list(job.events.filter(kind__startswith="step.").values_list("kind", "step"))
    assert steps == [("step.started", "provisioning"), ("step.finished", "provisioning")]


def test_a_cancel_during_a_step_stops_the_job_before_the_next(
    nbdkit_server: RunningServer, sim: Sim, settings: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    wire(settings, nbdkit_server, sim)

    def cancelled(job: MigrationJob) -> None:
        actions.cancel_job(job_id=job.job_id, actor="operator")

    job = run_interrupted_in_provisioning(sim, "a-worker", monkeypatch, cancelled)
    assert job.state == JobState.CANCELLED, job.error
    events = list(job.events.values_list("kind", "step"))
    after = events[events.index(("job.cancel_requested", "provisioning")) + 1 :]
    assert after == [("step.finished", "provisioning"), ("job.cancelled", "provisioning")], events


def volume_of(name: str, unit: int = 0) -> DestinationVolume:
    return DestinationVolume.objects.get(source_disk__vm__name=name, source_disk__unit_number=unit)


def test_a_sync_waiting_for_attach_slots_has_its_volumes_created_meanwhile_without_a_slot(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    """On CloudStack a volume takes seconds to create: a job that waits for slots has its volumes made
    while it waits, holding no slot, so once it gets slots it holds them from its attach on. Only the
    waiting jobs within one node's worth of slots are prepared (no fleet of volumes made at once)."""
    gate = threading.Event()
    sim = make_sim(Faults(gate=gate))
    wire(settings, nbdkit_server, sim)
    settings.OMA_WORKFLOW = {**settings.OMA_WORKFLOW, "ATTACH_SLOTS": 3}  # type: ignore[attr-defined]
    busy = actions.start_migration(vm_id=sim.vm("app-01").id)  # 3 disks: every slot
    drive(busy, until=lambda j: j.state == JobState.REPLICATING and bool(j.replication_id))
    names = ["web-01", "db-01", "file-01"]  # 1, 2 and 2 disks: the first two fit in one node's slots
    waiting = [actions.start_migration(vm_id=sim.vm(name).id) for name in names]

    def made_ahead(job: MigrationJob) -> bool:
        volumes = DestinationVolume.objects.filter(source_disk__vm=job.vm)
        return job.vm.name == "file-01" or (volumes.count() > 0 and not volumes.filter(volume_id="").exists())

    drive(*waiting, until=made_ahead)
    for job in waiting:
        job.refresh_from_db()
        assert job.state == JobState.PENDING and "attach slots" in job.wait_reason, (job.vm.name, job.wait_reason)
    made = {name: [volume_of(name, unit) for unit in range(len(sim.vm(name).disks))] for name in names}
    for volume in made["web-01"] + made["db-01"]:
        assert volume.volume_id and volume.node is None and volume.state == DestinationVolume.State.DETACHED, volume
    assert not any(volume.volume_id for volume in made["file-01"]), "beyond one node's worth: not yet"
    assert DestinationVolume.objects.filter(node__isnull=False).count() == 3, "the made ones hold no slot"
    assert waiting[0].events.filter(kind="volume.ready").count() == 1
    gate.set()
    drive(busy, *waiting)
    for job in [busy, *waiting]:
        assert job.state == JobState.COMPLETED, (job.vm.name, job.state, job.error)
        assert job.events.filter(kind="sync.verified").exists(), "read back and matched (some are detached by now)"
    for name in ("web-01", "db-01"):
        assert [volume_of(name, v.unit_number).volume_id for v in sim.vm(name).disks] == [
            v.volume_id for v in made[name]
        ], "provisioning found the volumes made ahead and made no other"
        assert MigrationJob.objects.get(vm__name=name).events.filter(kind="volume.ready").count() == len(made[name])


def test_a_pending_job_whose_volumes_are_being_made_is_not_placed_until_that_ends(
    nbdkit_server: RunningServer, sim: Sim, settings: object
) -> None:
    wire(settings, nbdkit_server, sim)
    job = actions.start_migration(vm_id=sim.vm("web-01").id)
    MigrationJob.objects.filter(pk=job.pk).update(runner="other:1:prepare", heartbeat_at=timezone.now())
    drive(job, until=lambda j: bool(j.wait_reason))
    job.refresh_from_db()
    assert job.state == JobState.PENDING and "being created" in job.wait_reason, "free slots, yet it waits"
    assert workflow.prepare_volumes(job.pk, "me:prepare").startswith("not needed"), "one preparer at a time"
    # The preparer died: its claim goes stale, and the job is placed (its provisioning makes the volume).
    MigrationJob.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    (job,) = drive(job)
    assert job.state == JobState.COMPLETED, job.error
    assert workflow.prepare_volumes(job.pk, "me:prepare").startswith("not needed"), "no longer pending"
