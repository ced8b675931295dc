"""The job state machine: every legal transition works, every other one raises and changes nothing."""

from __future__ import annotations

import re

import pytest

from migrations_app.models import (
    SEQUENCES,
    STEPS,
    TRANSITIONS,
    WORKER_STEPS,
    IllegalTransition,
    JobKind,
    JobState,
    MigrationJob,
    SourceVM,
    new_job_id,
)

ALL = [s.value for s in JobState]
PAIRS = [(a, b) for a in ALL for b in ALL]


def job_in(state: str) -> MigrationJob:
    job = MigrationJob(vm=SourceVM(vm_id="4210aaaa-bbbb-4ccc-8ddd-eeeeffff0000", name="web"), job_id=new_job_id())
    job.state = state
    return job


@pytest.mark.parametrize(("start", "to"), PAIRS)
def test_transition_is_allowed_exactly_when_the_table_says_so(start: str, to: str) -> None:
    job = job_in(start)
    if to in TRANSITIONS[start]:
        job.transition_to(to, error="boom")
        assert job.state == to
    else:
        with pytest.raises(IllegalTransition, match=f"cannot go from {start} to {to}"):
            job.transition_to(to)
        assert job.state == start


def test_completed_leads_only_to_a_rollback_and_only_of_a_failover() -> None:
    assert TRANSITIONS[JobState.COMPLETED] == {JobState.ROLLING_BACK}
    assert TRANSITIONS[JobState.ROLLED_BACK] == set()
    sync, live = job_in(JobState.COMPLETED), job_in(JobState.COMPLETED)
    live.kind = JobKind.LIVE_FAILOVER
    assert not sync.can_roll_back and live.can_roll_back
    testing = job_in(JobState.TESTING)
    testing.kind = JobKind.TEST_FAILOVER
    assert testing.can_end_test and not testing.can_roll_back and not testing.can_cancel


def test_a_failover_walks_its_own_steps() -> None:
    for kind in (JobKind.LIVE_FAILOVER, JobKind.TEST_FAILOVER):
        job = job_in(JobState.PENDING)
        job.kind = kind
        for step in SEQUENCES[kind]:
            job.transition_to(step)
        job.transition_to(JobState.COMPLETED if kind == JobKind.LIVE_FAILOVER else JobState.TESTING)
        job.transition_to(JobState.ROLLING_BACK, error="the operator asked")
        assert job.current_step == JobState.ROLLING_BACK and job.finished_at is None
        job.transition_to(JobState.ROLLED_BACK)
        assert job.finished_at is not None


def test_happy_path_records_step_and_times() -> None:
    job = job_in(JobState.PENDING)
    for step in STEPS:
        job.transition_to(step)
        assert job.current_step == step and job.started_at is not None
    job.transition_to(JobState.COMPLETED)
    assert job.finished_at is not None and job.current_step == JobState.VERIFYING


def test_retry_keeps_the_failed_step_and_counts_the_attempt() -> None:
    job = job_in(JobState.PENDING)
    job.transition_to(JobState.PROVISIONING)
    job.transition_to(JobState.ATTACHING)
    job.transition_to(JobState.FAILED, error="attach timed out")
    assert job.error == "attach timed out" and job.finished_at is not None
    job.transition_to(JobState.PENDING)
    assert job.current_step == JobState.ATTACHING and job.attempt == 2
    assert job.error == "" and job.finished_at is None


def test_job_ids_are_readable_and_unique() -> None:
    ids = {new_job_id() for _ in range(200)}
    assert all(re.fullmatch(r"job-\d{8}-\d{6}-[0-9a-f]{6}", i) for i in ids)
    assert len(ids) > 190  # 4 hex digits per second: collisions are possible but rare


@pytest.mark.django_db
def test_job_rows_save_with_a_generated_id() -> None:
    vm = SourceVM.objects.create(vm_id="4210aaaa-bbbb-4ccc-8ddd-eeeeffff0000", name="web")
    job = MigrationJob.objects.create(vm=vm)
    assert job.job_id.startswith("job-") and job.state == JobState.PENDING and job.attempt == 1


@pytest.mark.parametrize("state", ALL)
def test_cancel_and_retry_are_offered_exactly_when_the_table_allows_them(state: str) -> None:
    job = job_in(state)
    # What an operator may do in each state, spelled out (the buttons follow these properties).
    assert job.can_cancel == (state in {JobState.PENDING, *WORKER_STEPS} - {JobState.ROLLING_BACK})
    assert job.can_retry == (state in {JobState.FAILED, JobState.CANCELLED})
