"""Failures are failures: an unexpected error in a step is recorded in words and tried again a bounded
number of times; retries after a cleanup, or of a superseded job, do what an operator expects."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from devtools.vma_sim import Faults
from migrations_app import actions, workflow
from migrations_app.backends import get_volume_backend
from migrations_app.models import JobDisk, JobState, MigrationJob
from migrations_app.workflow import describe_error
from tests.support.flows import assert_copied, drive, migrate, wire
from tests.support.nbd import RunningServer, run_helper
from tests.support.vma import Sim, SimFactory

pytestmark = pytest.mark.django_db(transaction=True)


def failing(times: int, real: Callable[[MigrationJob, str], None]) -> Callable[[MigrationJob, str], None]:
    """A step that hits a full disk ``times`` times, then works."""
    calls = {"n": 0}

    def step(job: MigrationJob, runner: str) -> None:
        calls["n"] += 1
        if calls["n"] <= times:
            raise OSError(errno.ENOSPC, "No space left on device", "/var/lib/oma/volumes/x.img")
        real(job, runner)

    return step


def test_an_errno_reads_as_words_not_a_number() -> None:
    text = describe_error(OSError(errno.ENOSPC, "No space left on device", "/v/x.img"))
    assert text == "No space left on device [ENOSPC] (/v/x.img)"
    assert describe_error(KeyError("unit_number")) == "KeyError: 'unit_number'"


def test_an_unexpected_error_is_recorded_and_the_step_tried_again(
    nbdkit_server: RunningServer, sim: Sim, settings: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    wire(settings, nbdkit_server, sim)
    real = workflow.STEP_FUNCTIONS[JobState.ATTACHING]
    monkeypatch.setitem(workflow.STEP_FUNCTIONS, JobState.ATTACHING, failing(2, real))
    job = migrate("web-01", sim)
    assert job.state == JobState.COMPLETED, job.error
    errors = list(job.events.filter(kind="step.error").values_list("message", flat=True))
    assert len(errors) == 2 and all("No space left on device [ENOSPC]" in m for m in errors)
    assert "attempt 2 of 3" in errors[0] and "attempt 3 of 3" in errors[1]
    assert_copied(job, sim)


def test_a_step_that_keeps_failing_fails_the_job_with_its_reason(
    nbdkit_server: RunningServer, sim: Sim, settings: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    wire(settings, nbdkit_server, sim)
    real = workflow.STEP_FUNCTIONS[JobState.ATTACHING]
    monkeypatch.setitem(workflow.STEP_FUNCTIONS, JobState.ATTACHING, failing(99, real))
    job = migrate("web-01", sim)
    assert job.state == JobState.FAILED and job.current_step == JobState.ATTACHING
    assert job.error == (
        "attaching: No space left on device [ENOSPC] (/var/lib/oma/volumes/x.img) (failed 3 times in a row)"
    )
    assert job.events.filter(kind="step.error").count() == 2


def test_retry_after_a_cleanup_provisions_again_and_copies_whole(
    nbdkit_server: RunningServer, sim: Sim, settings: object
) -> None:
    wire(settings, nbdkit_server, sim)
    first = migrate("web-01", sim)
    assert first.state == JobState.COMPLETED
    second = actions.start_migration(vm_id=sim.vm("web-01").id)
    actions.cancel_job(job_id=second.job_id)
    # The cancelled incremental's volume holds the first sync: cleanup keeps it. Lose it anyway.
    volume = JobDisk.objects.get(job=first).volume_id
    JobDisk.objects.filter(volume_id=volume).update(volume_id="")
    actions.cleanup_job(job_id=second.job_id)
    retried = actions.retry_job(job_id=second.job_id)
    assert retried.current_step == JobState.PROVISIONING
    assert not retried.disks.exclude(previous_change_id="").exists(), "a new volume gets a full copy"
    (done,) = drive(retried)
    assert done.state == JobState.COMPLETED, done.error
    assert_copied(done, sim)


def test_a_superseded_job_is_not_retried(nbdkit_server: RunningServer, sim: Sim, settings: object) -> None:
    wire(settings, nbdkit_server, sim)
    old = actions.start_migration(vm_id=sim.vm("web-01").id)
    actions.cancel_job(job_id=old.job_id)
    newer = migrate("web-01", sim)
    assert newer.state == JobState.COMPLETED
    with pytest.raises(actions.MigrationError, match=f"superseded by {newer.job_id}"):
        actions.retry_job(job_id=old.job_id)
    assert MigrationJob.objects.get(pk=old.pk).state == JobState.CANCELLED


def test_what_differs_from_the_vmas_digest_fails_the_sync(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    """The simulator zeroes a block of each disk after writing it but reports its source's digest: the
    portal reads the ranges back, sees the difference and fails the job instead of completing it."""
    corrupting = make_sim(Faults(corrupt=True))
    wire(settings, nbdkit_server, corrupting)
    job = migrate("web-01", corrupting)
    assert job.state == JobState.FAILED and job.current_step == JobState.VERIFYING
    assert job.error.startswith("verifying: disk 0: what the volume holds differs from what the VMA sent")
    assert not job.disks.exclude(verified_at=None).exists()


def with_digest_ranges(monkeypatch: pytest.MonkeyPatch, ranges: list[list[int]], unit: int = 0) -> None:
    """From now on, verifications see disk ``unit``'s digest naming ``ranges`` (as a VMA might send)."""
    real = workflow.STEP_FUNCTIONS[JobState.VERIFYING]

    def verify(job: MigrationJob, runner: str) -> None:
        disk = job.disks.get(source_disk__unit_number=unit)
        JobDisk.objects.filter(pk=disk.pk).update(digest={**disk.digest, "ranges": ranges})
        real(job, runner)

    monkeypatch.setitem(workflow.STEP_FUNCTIONS, JobState.VERIFYING, verify)


def test_a_read_back_the_helper_refuses_for_one_disk_names_that_disk(
    nbdkit_server: RunningServer, sim: Sim, settings: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VM's disks are read back in one helper call; when the helper refuses it (here disk 1's digest
    names ranges past its volume's end), each disk is read alone: the error names disk 1, and the disks
    that matched are marked verified."""
    wire(settings, nbdkit_server, sim)
    with_digest_ranges(monkeypatch, [[1 << 40, 1]], unit=1)
    job = migrate("app-01", sim)  # 3 disks
    assert job.state == JobState.FAILED and job.current_step == JobState.VERIFYING
    assert job.error.startswith("verifying: disk 1: cannot read it back: range [1099511627776, 1] is not"), job.error
    verified = set(job.disks.exclude(verified_at=None).values_list("source_disk__unit_number", flat=True))
    assert verified == {0, 2}


def count_helper_reads(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The export names of each helper ``digest`` call verifications make from now on."""
    calls: list[list[str]] = []
    real = workflow.helper_client.digest

    def digest(helper: object, ranges: dict[str, list[list[int]]]) -> object:
        calls.append(sorted(ranges))
        return real(helper, ranges)  # type: ignore[arg-type]

    monkeypatch.setattr(workflow.helper_client, "digest", digest)
    return calls


def test_an_incrementals_few_changed_blocks_are_read_back_through_the_export_not_the_helper(
    nbdkit_server: RunningServer, sim: Sim, settings: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full copy's whole disk is hashed by the helper (a local read); an incremental sync's few changed
    MiB are read through the export, on the NBD connection that checks it is served (no helper process to
    start), and compared alike: what differs from the VMA's digest still fails the sync."""
    wire(settings, nbdkit_server, sim)
    helper_reads = count_helper_reads(monkeypatch)
    full = migrate("web-01", sim)
    assert full.state == JobState.COMPLETED, full.error
    assert len(helper_reads) == 1, "16 MiB: the helper hashes it"
    incremental = migrate("web-01", sim)
    assert incremental.state == JobState.COMPLETED, incremental.error
    assert incremental.disks.get().previous_change_id, "an incremental sync"
    assert len(helper_reads) == 1, "its changed blocks were read through the export"
    assert incremental.events.get(kind="sync.verified").message == "1 disk(s) read back and matched the VMA's digests"
    assert incremental.disks.get().verified_at is not None
    assert_copied(incremental, sim)

    sim.sim.faults.corrupt = True  # the next copy zeroes a block it wrote, and reports the source's digest
    corrupted = migrate("web-01", sim)
    assert corrupted.state == JobState.FAILED and corrupted.current_step == JobState.VERIFYING
    assert corrupted.error.startswith("verifying: disk 0: what the volume holds differs from what the VMA sent")
    assert len(helper_reads) == 1 and corrupted.disks.get().verified_at is None


def test_a_read_back_through_the_export_past_its_end_names_that_disk(
    nbdkit_server: RunningServer, sim: Sim, settings: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An incremental's digest for disk 1 names bytes past its volume's end: the error names disk 1, the
    other disks are still read back and marked verified, and no helper is started."""
    wire(settings, nbdkit_server, sim)
    assert migrate("app-01", sim).state == JobState.COMPLETED  # 3 disks
    helper_reads = count_helper_reads(monkeypatch)
    with_digest_ranges(monkeypatch, [[1 << 40, 1]], unit=1)
    job = migrate("app-01", sim)
    assert job.state == JobState.FAILED and job.current_step == JobState.VERIFYING
    assert job.error == (
        "verifying: disk 1: cannot read it back: the VMA's digest covers bytes 1099511627776-1099511627777, "
        f"the export serves {1 << 30}"
    ), job.error
    verified = set(job.disks.exclude(verified_at=None).values_list("source_disk__unit_number", flat=True))
    assert verified == {0, 2} and helper_reads == []


def test_a_digest_whose_ranges_are_not_offset_length_pairs_is_refused_by_the_helper(
    nbdkit_server: RunningServer, sim: Sim, settings: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranges that are not pairs of whole numbers at least 0 are never read through the export: they go to
    the helper, which refuses them and says why; the sync fails, naming the disk."""
    wire(settings, nbdkit_server, sim)
    assert migrate("web-01", sim).state == JobState.COMPLETED
    helper_reads = count_helper_reads(monkeypatch)
    with_digest_ranges(monkeypatch, [[0, -4096]])
    job = migrate("web-01", sim)
    assert job.state == JobState.FAILED and job.error.startswith("verifying: disk 0: cannot read it back: "), job.error
    assert len(helper_reads) == 1


def test_a_digest_of_many_small_ranges_is_read_back_by_the_helper_not_one_nbd_read_each(
    nbdkit_server: RunningServer, sim: Sim, settings: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few KiB in thousands of ranges would be thousands of NBD round trips: past 1,024 ranges the
    helper hashes them locally, even when they add up to less than 8 MiB."""
    wire(settings, nbdkit_server, sim)
    assert migrate("web-01", sim).state == JobState.COMPLETED
    helper_reads = count_helper_reads(monkeypatch)
    with_digest_ranges(monkeypatch, [[n * 8192, 512] for n in range(1025)])
    job = migrate("web-01", sim)
    assert job.state == JobState.FAILED and job.current_step == JobState.VERIFYING
    assert job.error.startswith("verifying: disk 0: what the volume holds differs"), job.error
    assert len(helper_reads) == 1, "read by the helper"


def test_an_nbd_server_down_while_verifying_is_waited_for_not_blamed_on_the_copy(
    nbdkit_server: RunningServer, sim: Sim, settings: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node's NBD server stops just as the verification starts (a crash its supervisor will undo):
    the read-back is tried again after a back-off, and once the server is back the sync completes."""
    wire(settings, nbdkit_server, sim)
    real = workflow.STEP_FUNCTIONS[JobState.VERIFYING]
    calls = {"n": 0}

    def verify(job: MigrationJob, runner: str) -> None:
        calls["n"] += 1
        verb = "stop" if calls["n"] == 1 else "start"
        result = run_helper(nbdkit_server.layout, verb)
        assert result.returncode == 0, result.stdout + result.stderr
        real(job, runner)

    monkeypatch.setitem(workflow.STEP_FUNCTIONS, JobState.VERIFYING, verify)
    job = migrate("web-01", sim)
    assert job.state == JobState.COMPLETED, job.error
    (error,) = job.events.filter(kind="step.error").values_list("message", flat=True)
    assert error.startswith("verifying: disk 0: cannot reach its export to read it back: cannot connect")
    assert calls["n"] == 2 and job.disks.filter(verified_at=None).count() == 0
    assert_copied(job, sim)


def test_a_helper_that_cannot_read_back_yet_is_retried_not_blamed_on_the_copy(
    nbdkit_server: RunningServer, sim: Sim, settings: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read-back is the helper's (a local read of the export's device): when the helper cannot run
    (here its config is missing for a moment), verification is tried again after a back-off."""
    wire(settings, nbdkit_server, sim)
    config = nbdkit_server.layout.helper_config
    aside = config.with_name("helper.conf.aside")
    real = workflow.STEP_FUNCTIONS[JobState.VERIFYING]
    calls = {"n": 0}

    def verify(job: MigrationJob, runner: str) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            config.rename(aside)
        else:
            aside.rename(config)
        real(job, runner)

    monkeypatch.setitem(workflow.STEP_FUNCTIONS, JobState.VERIFYING, verify)
    job = migrate("web-01", sim)
    assert job.state == JobState.COMPLETED, job.error
    (error,) = job.events.filter(kind="step.error").values_list("message", flat=True)
    assert error.startswith("verifying: disk 0: cannot read it back yet: cannot read helper config")
    assert calls["n"] == 2 and job.disks.filter(verified_at=None).count() == 0
    assert_copied(job, sim)


def test_a_volume_deleted_during_the_copy_never_gives_a_completed_job(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    held = make_sim(Faults(rate_bits_per_second=16_000_000))  # 16 MiB: about 8 s
    wire(settings, nbdkit_server, held)
    job = actions.start_migration(vm_id=held.vm("web-01").id)
    drive(job, until=lambda j: j.state == JobState.REPLICATING and j.disks.get().bytes_done > 0)
    disk = job.disks.get()
    backend = get_volume_backend()
    backend.detach_volume(disk.volume_id)  # mid-copy, someone detaches and deletes it behind our back
    backend.delete_volume(disk.volume_id)
    (job,) = drive(job)
    assert job.state == JobState.FAILED
    assert job.error.startswith("verifying: disk 0: its device") and "is gone" in job.error
    # A retry provisions a new volume and copies it whole.
    retried = actions.retry_job(job_id=job.job_id)
    (done,) = drive(retried)
    assert done.state == JobState.COMPLETED, done.error
    assert done.events.filter(kind="volume.replaced").exists()
    assert_copied(done, held)


def test_malformed_progress_from_the_vma_fails_the_job_in_words(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    broken = make_sim(Faults(malformed=True))
    wire(settings, nbdkit_server, broken)
    job = migrate("web-01", broken)
    assert job.state == JobState.FAILED
    assert job.error == (
        "replicating: VMA malformed: the VMA answered a replication the contract does not allow: "
        "disk 0 bytes_done 'lots'"
    )
