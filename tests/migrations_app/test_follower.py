"""The progress follower on its own: its node lease, and cancels that must reach the VMA."""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from devtools.vma_sim import Faults
from migrations_app import actions
from migrations_app.follower import LEASE_RENEW_EVERY, Follower, Lease, TickReport, drop_lease, hold_lease
from migrations_app.models import DestinationVolume, JobEvent, JobState, MigrationJob, OmaNode
from migrations_app.slots import release, this_node
from migrations_app.workflow import STEP_FUNCTIONS, run_job
from tests.support.flows import assert_copied, drive, run_until, wire
from tests.support.nbd import RunningServer
from tests.support.vma import SimFactory

pytestmark = pytest.mark.django_db(transaction=True)


def run_ticks(follower: Follower, until: Any, job: MigrationJob, timeout: float = 30) -> None:
    """Tick the follower here (woken early by its threads) until ``until()``, the job read afresh each time."""
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        follower.tick()
        follower.wake.wait(0.05)
        job.refresh_from_db()


def count_placements(follower: Follower) -> list[TickReport]:
    """Each placement the follower runs from now on, by its tick's report."""
    placements: list[TickReport] = []
    place = follower.dispatch

    def counted(report: TickReport) -> None:
        placements.append(report)
        place(report)

    follower.dispatch = counted  # type: ignore[method-assign]
    return placements


def test_one_follower_per_node_holds_the_lease_until_it_goes_quiet() -> None:
    node = this_node()
    assert hold_lease(node, "follower-a") and hold_lease(node, "follower-a"), "the holder renews it"
    assert not hold_lease(node, "follower-b"), "a second follower stands by"
    OmaNode.objects.filter(pk=node.pk).update(follower_beat_at=timezone.now() - timedelta(hours=1))
    assert hold_lease(node, "follower-b"), "a silent holder's lease is taken over"
    drop_lease(node, "follower-a")  # the old one, waking up, drops nothing of the new one's
    assert OmaNode.objects.get(pk=node.pk).follower == "follower-b"
    drop_lease(node, "follower-b")
    assert OmaNode.objects.get(pk=node.pk).follower == ""


def test_a_busy_follower_renews_its_lease_once_a_second_not_on_every_tick() -> None:
    node = this_node()
    now = [100.0]
    lease = Lease(node, "follower-a", clock=lambda: now[0])

    def beat_at() -> object:
        return OmaNode.objects.get(pk=node.pk).follower_beat_at

    assert lease.hold()
    first = beat_at()
    for _ in range(3):  # busy ticks within the renewal period: no write
        now[0] += LEASE_RENEW_EVERY / 4
        assert lease.hold()
    assert beat_at() == first
    now[0] += LEASE_RENEW_EVERY / 4
    assert lease.hold() and beat_at() != first, "renewed once a second"
    # A pause past the stale period (the process stopped): another follower took the node meanwhile. The
    # first tick after it renews first, finds out, and stands by.
    OmaNode.objects.filter(pk=node.pk).update(follower_beat_at=timezone.now() - timedelta(hours=1))
    assert hold_lease(node, "follower-b")
    now[0] += 3600
    assert not lease.hold() and not lease.hold(), "it stands by, asking again on every tick"
    lease.drop()
    assert OmaNode.objects.get(pk=node.pk).follower == "follower-b", "dropping drops nothing of the new one's"


def test_what_changes_in_seconds_is_looked_at_once_a_poll_interval_not_on_every_tick(settings: Any) -> None:
    """Lost nodes, their work, and due group syncs are looked for once a poll interval: a busy tick (ten a
    second) reads none of it."""
    settings.OMA_WORKFLOW = {**settings.OMA_WORKFLOW, "POLL_INTERVAL": 0.5}
    follower = Follower(enqueue=lambda task, pk: None, detach=lambda pk: None)

    def tick_sql() -> str:
        with CaptureQueriesContext(connection) as queries:
            follower.tick()
        return "\n".join(q["sql"] for q in queries.captured_queries)

    checks = ("migrations_app_migrationgroup", '"down_since" IS NOT NULL', '"follower_beat_at" <')
    first = tick_sql()
    assert all(check in first for check in checks), first
    busy = tick_sql()
    assert not any(check in busy for check in checks), busy
    time.sleep(0.5)
    again = tick_sql()
    assert all(check in again for check in checks), "looked at again once the interval passed"
    follower.close()


def test_a_tick_asks_the_vma_about_its_copies_side_by_side() -> None:
    """Each ask is a round trip (over a WAN in production): a tick asks about its copies side by side, not
    one after the other, after a first ask alone finds the VMA reachable. Every answer is still acted on."""
    from migrations_app.vma_client import VmaError
    from tests.support.factories import make_jobs

    lock = threading.Lock()
    in_flight, most, asked = 0, 0, []

    class SlowVma:
        def replication(self, replication_id: str) -> object:
            nonlocal in_flight, most
            with lock:
                in_flight += 1
                most = max(most, in_flight)
                asked.append(replication_id)
            time.sleep(0.2)  # a round trip
            with lock:
                in_flight -= 1
            raise VmaError("internal", "the VMA failed", 500)

        def close(self) -> None:
            pass

    jobs = make_jobs(5, state=JobState.REPLICATING)
    follower = Follower(enqueue=lambda task, pk: None, detach=lambda pk: None, vma=SlowVma())  # type: ignore[arg-type]
    try:
        MigrationJob.objects.filter(pk__in=[j.pk for j in jobs]).update(node=follower.node)
        for job in jobs:
            MigrationJob.objects.filter(pk=job.pk).update(replication_id=f"{job.job_id}-1")
        report = follower.tick()
    finally:
        follower.close()
    assert sorted(asked) == sorted(f"{job.job_id}-1" for job in jobs), "each copy asked once"
    assert most > 1, "asked one after the other"
    assert sorted(report.finished) == sorted(job.job_id for job in jobs)
    failed = MigrationJob.objects.filter(pk__in=[j.pk for j in jobs], state=JobState.FAILED)
    assert failed.count() == 5 and all("the VMA failed" in job.error for job in failed)


def test_after_a_tick_that_reached_the_vma_every_copy_is_asked_at_once_the_first_too() -> None:
    """One round trip a tick, not two (over a WAN each is tens of milliseconds): the first copy is asked
    alone only while the VMA was not reached last time. Gone meanwhile, it costs the tick one timeout in
    all (the asks overlap), and the next tick asks one copy alone again."""
    from migrations_app.vma_client import VmaUnavailable
    from tests.support.factories import make_jobs

    lock = threading.Lock()
    calls: list[tuple[float, float]] = []  # each ask's start and end
    down = threading.Event()

    class Vma:
        def replication(self, replication_id: str) -> object:
            started = time.monotonic()
            time.sleep(0.5)  # a round trip, or a timeout (long enough for asks in threads to overlap on a busy CI)
            with lock:
                calls.append((started, time.monotonic()))
            if down.is_set():
                raise VmaUnavailable("unreachable", "no route to the VMA")
            return {"replication_id": replication_id, "vm_id": "", "state": "running", "error": "", "disks": []}

        def close(self) -> None:
            pass

    def overlapping() -> int:
        """The most asks of the last tick in flight at one moment."""
        return max(sum(1 for s, e in calls if s <= start < e) for start, _ in calls)

    jobs = make_jobs(4, state=JobState.REPLICATING)
    follower = Follower(enqueue=lambda task, pk: None, detach=lambda pk: None, vma=Vma())  # type: ignore[arg-type]
    try:
        for job in jobs:
            MigrationJob.objects.filter(pk=job.pk).update(node=follower.node, replication_id=f"{job.job_id}-1")
        follower.tick()
        first, *rest = sorted(calls)
        assert len(calls) == 4 and all(start >= first[1] for start, _ in rest), "the first was asked alone"
        assert overlapping() == 3, "the first alone, then the rest side by side"
        calls.clear()
        follower.tick()
        assert len(calls) == 4 and overlapping() == 4, "the VMA answered last tick: all four at once"
        calls.clear()
        down.set()
        follower.tick()
        assert len(calls) == 4 and overlapping() == 4, "gone meanwhile: one timeout in all"
        calls.clear()
        follower.tick()
        assert len(calls) == 1, "not reached last tick: one copy alone, the others fail at once"
    finally:
        follower.close()


def test_a_vma_that_never_answers_costs_one_timeout_a_tick_not_one_a_copy(settings: object) -> None:
    """The VMA accepts connections and says nothing (a firewall dropping its answers): the first poll of
    a tick waits out its deadline; the other copies of that tick are not asked again, so a tick stays
    short enough for the node's lease to keep beating. Every copy still counts as in an outage."""
    from tests.support.factories import make_jobs

    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    settings.OMA_VMA = {  # type: ignore[attr-defined]
        **settings.OMA_VMA,  # type: ignore[attr-defined]
        "URL": f"http://127.0.0.1:{port}",
        "TIMEOUT": 0.5,
        "RETRIES": 0,
        "DEADLINE": 1.0,
    }
    jobs = make_jobs(4, state=JobState.REPLICATING)
    follower = Follower(enqueue=lambda task, pk: None, detach=lambda pk: None)
    try:
        MigrationJob.objects.filter(pk__in=[j.pk for j in jobs]).update(node=follower.node)
        for job in jobs:
            MigrationJob.objects.filter(pk=job.pk).update(replication_id=f"{job.job_id}-1")
        follower.tick()
        assert len(accepted) == 1, "one copy asked, the others not again in the same tick"
        interrupted = MigrationJob.objects.filter(pk__in=[j.pk for j in jobs], outage_since__isnull=False)
        assert interrupted.count() == 4, "each copy waits out the outage"
        follower.tick()
        assert len(accepted) == 2, "the next tick asks again"
    finally:
        follower.close()
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()


def test_a_cancel_while_the_vma_is_unreachable_waits_and_reaches_it(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    sim = make_sim(Faults(stall=True))
    wire(settings, nbdkit_server, sim)
    job = actions.start_migration(vm_id=sim.vm("web-01").id)
    drive(job, until=lambda j: j.state == JobState.REPLICATING and bool(j.replication_id))
    sim.go_offline()
    actions.cancel_job(job_id=job.job_id, actor="tester")
    for _ in range(10):  # ticks while the VMA is away: the cancel is kept, never dropped
        run_until(lambda: True)
    job.refresh_from_db()
    assert job.state == JobState.CANCELLING
    assert sim.sim.replications[job.replication_id].state == "running", "the copy goes on, untold"
    sim.come_back()
    (job,) = drive(job)
    assert job.state == JobState.CANCELLED
    assert sim.sim.replications[job.replication_id].state == "cancelled", "the VMA stopped the copy"


def test_a_job_a_worker_ends_lets_the_next_tick_place_a_waiting_one(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    """A job ends in a worker, not in the follower: its end must make the very next tick place what
    waits for it, not the next periodic placement (up to two seconds of an idle slot)."""
    sim = make_sim()
    wire(settings, nbdkit_server, sim)
    settings.OMA_WORKFLOW = {**settings.OMA_WORKFLOW, "MAX_ACTIVE_JOBS": 1}  # type: ignore[attr-defined]
    first = actions.start_migration(vm_id=sim.vm("web-01").id)
    second = actions.start_migration(vm_id=sim.vm("db-01").id)
    queued: list[int] = []
    follower = Follower(enqueue=lambda task, pk: queued.append(pk), detach=lambda pk: None)
    try:
        follower.tick()
        assert queued == [first.pk]
        second.refresh_from_db()
        assert second.state == JobState.PENDING and "maximum is 1" in second.wait_reason
        follower.tick()
        assert queued == [first.pk], "nothing changed: nothing more is placed"
        MigrationJob.objects.filter(pk=first.pk).update(state=JobState.FAILED)  # as a worker's step would
        follower.tick()
        assert queued == [first.pk, second.pk]
    finally:
        follower.close()


def test_idle_volumes_are_detached_for_every_waiting_job_and_freed_slots_go_oldest_first(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    """With no slot free, one placement chooses idle volumes for all the jobs that wait, so their detaches
    run side by side; the slots they free still go to the oldest waiting job first."""
    sim = make_sim()
    wire(settings, nbdkit_server, sim)
    settings.OMA_WORKFLOW = {**settings.OMA_WORKFLOW, "ATTACH_SLOTS": 5}  # type: ignore[attr-defined]
    queued: list[int] = []
    chosen: list[int] = []
    follower = Follower(enqueue=lambda task, pk: queued.append(pk), detach=chosen.append)
    try:
        done = [actions.start_migration(vm_id=sim.vm(name).id) for name in ("app-01", "db-01")]  # 3 + 2 disks
        follower.tick()
        assert queued == [job.pk for job in done]
        # Both syncs ended: their 5 volumes stay attached, idle, and hold every slot.
        MigrationJob.objects.filter(pk__in=queued).update(state=JobState.COMPLETED)
        DestinationVolume.objects.update(state=DestinationVolume.State.ATTACHED)
        older = actions.start_migration(vm_id=sim.vm("file-01").id)  # 2 disks
        younger = actions.start_migration(vm_id=sim.vm("web-01").id)  # 1 disk
        follower.tick()
        chosen = list(dict.fromkeys(chosen))  # a detach not seen to run is asked for again: once is enough here
        assert len(chosen) == 3, "idle volumes for both waiting jobs, not only the oldest"
        assert DestinationVolume.objects.filter(state=DestinationVolume.State.DETACHING).count() == 3
        younger.refresh_from_db()
        assert younger.state == JobState.PENDING and younger.wait_reason.endswith("behind an older job")

        placed = len(queued)
        for n, volume_pk in enumerate(chosen, start=1):
            release(DestinationVolume.objects.get(pk=volume_pk))  # as the detach does when it ends
            follower.freed = True
            follower.tick()
            assert queued[placed:] == [[], [older.pk], [older.pk, younger.pk]][n - 1], n
        assert DestinationVolume.objects.filter(node__isnull=False).count() == 5
    finally:
        follower.close()


def test_a_sync_whose_copy_ended_is_verified_by_the_follower_itself_not_queued(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    """The copy's end is noticed by the follower, which reads the volume back in its own verifier thread
    at once: no worker task is queued (a trip through the queue holds the job's slots for nothing), and
    the digest is compared as a worker would."""
    sim = make_sim()
    wire(settings, nbdkit_server, sim)
    job = actions.start_migration(vm_id=sim.vm("app-01").id)  # 3 disks
    drive(job, until=lambda j: j.state == JobState.REPLICATING and bool(j.replication_id))
    queued: list[tuple[str, int]] = []
    follower = Follower(enqueue=lambda task, pk: queued.append((task, pk)), detach=lambda pk: None)
    try:
        run_ticks(follower, until=lambda: job.state == JobState.COMPLETED, job=job)
        assert job.state == JobState.COMPLETED, (job.state, job.error)
        assert queued == [], "nothing went through the worker queue"
        verified = JobEvent.objects.get(job=job, kind="sync.verified")
        assert verified.message.startswith("3 disk(s) read back and matched")
        assert job.disks.filter(verified_at__isnull=False).count() == 3
        assert_copied(job, sim)
    finally:
        follower.close()


def test_a_copy_that_ends_places_nothing_until_its_read_back_frees_its_slots(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    """A copy's end moves its job to verifying: it still holds its slots and counts as active, so that
    tick places nothing (a placement is the node's lock and a read of every pending job). The read-back's
    end frees them, and the next tick places the job that waits."""
    gate = threading.Event()  # the copy runs until the test lets it end
    sim = make_sim(Faults(gate=gate))
    wire(settings, nbdkit_server, sim)
    settings.OMA_WORKFLOW = {**settings.OMA_WORKFLOW, "MAX_ACTIVE_JOBS": 1}  # type: ignore[attr-defined]
    first = actions.start_migration(vm_id=sim.vm("web-01").id)
    drive(first, until=lambda j: j.state == JobState.REPLICATING and bool(j.replication_id))
    second = actions.start_migration(vm_id=sim.vm("db-01").id)
    verifying: list[int] = []
    queued: list[int] = []

    def verify(pk: int) -> None:  # as the verifier threads do, without running it yet
        verifying.append(pk)
        follower.verifying.add(pk)

    follower = Follower(enqueue=lambda task, pk: queued.append(pk), detach=lambda pk: None, verify=verify)
    placements = count_placements(follower)
    try:
        follower.tick()
        second.refresh_from_db()
        assert second.state == JobState.PENDING and "maximum is 1" in second.wait_reason
        follower.dispatched_at = time.monotonic() + 3600  # no periodic placement within this test
        placements.clear()
        gate.set()
        run_ticks(follower, until=lambda: bool(verifying), job=first)
        assert first.state == JobState.VERIFYING and verifying == [first.pk]
        follower.tick()
        assert placements == [], "nothing was placed while the copy's volumes are read back"
        assert run_job(first.pk, "follower:verify") is not None  # what the verifier thread runs
        first.refresh_from_db()
        assert first.state == JobState.COMPLETED, first.error
        follower.verifying.discard(first.pk)
        follower.freed = True  # as the verifier thread says when it is done
        follower.tick()
        assert len(placements) == 1 and queued == [second.pk], "the next tick placed the waiting job"
    finally:
        follower.close()


def queued_by_thread() -> tuple[list[tuple[int, str]], Any]:
    """An enqueue that records each placed job (its steps' task) with the name of the thread that placed it."""
    queued: list[tuple[int, str]] = []

    def enqueue(task: str, pk: int) -> None:
        if task == "run_job_task":  # (not the task that creates a waiting job's volumes ahead)
            queued.append((pk, threading.current_thread().name))

    return queued, enqueue


def wait_until(done: Any, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(done())


def test_a_read_back_that_frees_slots_places_the_waiting_job_in_its_own_thread(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    """A read-back that turned a job's volumes idle has the follower's placer thread place the job that
    waits for them at once, not the next tick (which may be busy asking the VMA about every copy: round
    trips the waiting job need not wait for)."""
    sim = make_sim()
    wire(settings, nbdkit_server, sim)
    settings.OMA_WORKFLOW = {**settings.OMA_WORKFLOW, "MAX_ACTIVE_JOBS": 1}  # type: ignore[attr-defined]
    first = actions.start_migration(vm_id=sim.vm("web-01").id)
    drive(first, until=lambda j: j.state == JobState.REPLICATING and bool(j.replication_id))
    second = actions.start_migration(vm_id=sim.vm("db-01").id)
    queued, enqueue = queued_by_thread()
    to_verify: list[int] = []
    follower = Follower(enqueue=enqueue, detach=lambda pk: None, verify=to_verify.append)
    try:
        run_ticks(follower, until=lambda: first.state != JobState.REPLICATING, job=first)
        assert first.state == JobState.VERIFYING and set(to_verify) == {first.pk}, (first.state, first.error)
        follower._verify_in_thread(first.pk)  # the read-back the tick asked for runs now, in its thread
        # No tick from here on.
        assert wait_until(lambda: queued), "the waiting job was placed without a tick"
        first.refresh_from_db()
        assert first.state == JobState.COMPLETED, first.error
        ((pk, thread),) = queued
        assert pk == second.pk and thread == "placer", queued
    finally:
        follower.close()


def behind_idle_slots(
    server: RunningServer, make_sim: SimFactory, settings: object, name: str
) -> tuple[MigrationJob, list[tuple[int, str]], list[int], Follower]:
    """app-01's 3 disks idle in all 3 slots, and a migration of ``name`` waiting for them; a follower that
    records the jobs it places (by thread) and the volumes it chooses to detach, without detaching them."""
    sim = make_sim()
    wire(settings, server, sim)
    settings.OMA_WORKFLOW = {**settings.OMA_WORKFLOW, "ATTACH_SLOTS": 3}  # type: ignore[attr-defined]
    (done,) = drive(actions.start_migration(vm_id=sim.vm("app-01").id))
    assert done.state == JobState.COMPLETED, done.error
    waiting = actions.start_migration(vm_id=sim.vm(name).id)
    queued, enqueue = queued_by_thread()
    chosen: list[int] = []
    return waiting, queued, chosen, Follower(enqueue=enqueue, detach=chosen.append)


def test_a_detach_that_frees_a_slot_places_the_waiting_job_in_its_own_thread(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    """A detach that freed a slot has the placer thread place the job that waits for it at once, not the
    next tick; its volume gets that slot (no slot is overfilled)."""
    waiting, queued, chosen, follower = behind_idle_slots(nbdkit_server, make_sim, settings, "web-01")  # 1 disk
    try:
        follower.tick()  # chooses an idle volume to detach
        (volume_pk,) = set(chosen)
        assert not queued
        follower._detach_in_thread(volume_pk)  # the detach the tick asked for runs now, in its thread
        assert wait_until(lambda: queued), "the waiting job was placed without a tick"
        (queued_event,) = JobEvent.objects.filter(job=waiting, kind="job.queued")
        assert "needs 1 attach slots; 0 of 3 free" in queued_event.message, "it waited for the detach"
        ((pk, thread),) = queued
        assert pk == waiting.pk and thread == "placer", queued
        assert DestinationVolume.objects.filter(node__isnull=False).count() == 3
        assert DestinationVolume.objects.filter(detaches=1).count() == 1
    finally:
        follower.close()


def test_a_job_waiting_for_two_detaches_is_placed_once_after_both_not_once_per_detach(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    """A placement pass takes the node's lock (on SQLite the write lock every worker needs): a detach that
    frees too little for the oldest waiting job, while another detach still runs, wakes no pass; the
    last one does, and the job is placed in it."""
    waiting, queued, chosen, follower = behind_idle_slots(nbdkit_server, make_sim, settings, "db-01")  # 2 disks
    try:
        follower.tick()  # chooses two idle volumes to detach
        first, second = sorted(set(chosen))
        assert follower.first_wanted == 2
        placements = count_placements(follower)
        follower.in_flight.add(second)  # still being detached
        follower._detach_in_thread(first)
        assert wait_until(lambda: first not in follower.in_flight)
        time.sleep(0.3)  # time for a pass the detach might have woken
        assert placements == [] and queued == [], "one free slot of the two needed: no pass"
        follower.in_flight.discard(second)
        follower._detach_in_thread(second)
        assert wait_until(lambda: bool(queued)), "the last detach has the job placed"
        assert queued == [(waiting.pk, "placer")] and len(placements) == 1
        assert DestinationVolume.objects.filter(node__isnull=False).count() == 3
    finally:
        follower.close()


def test_a_freed_slot_is_placed_before_the_vma_is_asked_and_a_placement_is_not_redone(settings: Any) -> None:
    """A placement's own changes (jobs placed) are no reason for the next tick to place again; a slot freed
    by a read-back goes to the waiting job before the tick asks the VMA about its copies (round trips)."""
    from tests.support.factories import make_jobs

    settings.OMA_WORKFLOW = {**settings.OMA_WORKFLOW, "MAX_ACTIVE_JOBS": 2}
    (copying,) = make_jobs(1, state=JobState.REPLICATING)
    first, second = make_jobs(2, state=JobState.PENDING)
    at_ask: list[str] = []  # the second waiting job's state whenever the VMA is asked

    class RunningVma:
        def replication(self, replication_id: str) -> object:
            at_ask.append(MigrationJob.objects.get(pk=second.pk).state)
            return {"replication_id": replication_id, "vm_id": "", "state": "running", "error": "", "disks": []}

        def close(self) -> None:
            pass

    follower = Follower(enqueue=lambda task, pk: None, detach=lambda pk: None, vma=RunningVma())  # type: ignore[arg-type]
    placements = count_placements(follower)
    try:
        MigrationJob.objects.filter(pk=copying.pk).update(node=follower.node, replication_id=f"{copying.job_id}-1")
        follower.tick()
        assert len(placements) == 1 and at_ask == [JobState.PENDING]
        assert MigrationJob.objects.get(pk=first.pk).state == JobState.ATTACHING, "placed"
        assert "maximum is 2" in MigrationJob.objects.get(pk=second.pk).wait_reason
        follower.tick()
        assert len(placements) == 1, "the placement's own changes are not placed again"
        # The first job's sync ended (its read-back matched): the verifier frees its slots and wakes us.
        MigrationJob.objects.filter(pk=first.pk).update(state=JobState.COMPLETED)
        follower.freed = True
        follower.tick()
        assert len(placements) == 2
        assert at_ask[-1] == JobState.ATTACHING, "placed before the VMA was asked about the copies"
    finally:
        follower.close()


def test_a_copy_that_ends_before_its_worker_returns_is_still_verified_at_once(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short incremental copy can end, and the follower claim the job to verify it, before the worker
    that started the copy has returned from its task (on a busy SQLite it waits for the write lock). The
    worker lets the job go in the same write that hands the copy to the follower, so the verifier takes
    it at once; a job left "verifying" with nobody on it would wait five minutes for recovery."""
    sim = make_sim()
    wire(settings, nbdkit_server, sim)
    job = actions.start_migration(vm_id=sim.vm("web-01").id)
    taken: list[MigrationJob | None] = []
    follower = Follower(
        enqueue=lambda task, pk: None,
        detach=lambda pk: None,
        verify=lambda pk: transaction.on_commit(lambda: taken.append(run_job(pk, "follower:verify"))),
    )
    start_copy = STEP_FUNCTIONS[JobState.REPLICATING]

    def start_copy_then_it_ends(worker_job: MigrationJob, runner: str) -> None:
        start_copy(worker_job, runner)
        # The copy ends and the follower notices it, all before the worker's task returns.
        deadline = time.monotonic() + 30
        while not taken and time.monotonic() < deadline:
            follower.tick()
            time.sleep(0.02)

    monkeypatch.setitem(STEP_FUNCTIONS, JobState.REPLICATING, start_copy_then_it_ends)
    try:
        drive(job, until=lambda j: bool(taken))
    finally:
        follower.close()
    assert taken[0] is not None, "the follower's verifier could take the job"
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, (job.state, job.runner, job.error)
    assert JobEvent.objects.filter(job=job, kind="sync.verified").exists()
    assert_copied(job, sim)


def test_a_sync_left_verifying_by_a_follower_that_stopped_is_verified_by_the_next_at_once(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    """The follower noticed the copy's end and stopped before its verifier thread ran (a restart, a
    crash): the job sits in "verifying" with nobody on it. The next follower verifies it on its first
    tick, in its own threads, instead of leaving it to the queue's five-minute requeue."""
    sim = make_sim()
    wire(settings, nbdkit_server, sim)
    job = actions.start_migration(vm_id=sim.vm("web-01").id)
    drive(job, until=lambda j: j.state == JobState.REPLICATING and bool(j.replication_id))
    stopped = Follower(enqueue=lambda task, pk: None, detach=lambda pk: None, verify=lambda pk: None)
    try:
        run_ticks(stopped, until=lambda: job.state == JobState.VERIFYING, job=job)
    finally:
        stopped.close()
    assert job.runner == "" and job.queued_at is not None, "left as a follower leaves it for its verifier"
    queued: list[tuple[str, int]] = []
    follower = Follower(enqueue=lambda task, pk: queued.append((task, pk)), detach=lambda pk: None)
    try:
        run_ticks(follower, until=lambda: job.state == JobState.COMPLETED, job=job)
    finally:
        follower.close()
    assert job.state == JobState.COMPLETED, (job.state, job.error)
    assert queued == [], "verified in the follower's own threads"
    assert JobEvent.objects.filter(job=job, kind="sync.verified").exists()


def test_a_copy_is_asked_about_once_a_poll_interval_and_every_tick_as_it_ends(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    """Busy ticks come ten times a second; a copy with seconds to go is still asked about only once a
    poll interval (each ask costs the VMA and the follower CPU, or a WAN round trip), and every tick once
    its progress says it ends soon (or before it says how fast it goes), so its end is noticed at once.
    Counted in ticks, not seconds: a loaded machine ticks slower."""
    # 4 MiB/s into 32 MiB: the copy runs for about 8 s.
    sim = make_sim(Faults(rate_bits_per_second=32 << 20), size_mib=32)
    wire(settings, nbdkit_server, sim)
    settings.OMA_WORKFLOW = {**settings.OMA_WORKFLOW, "POLL_INTERVAL": 0.4}  # type: ignore[attr-defined]
    job = actions.start_migration(vm_id=sim.vm("web-01").id)
    drive(job, until=lambda j: j.state == JobState.REPLICATING and bool(j.replication_id))
    follower = Follower(enqueue=lambda task, pk: None, detach=lambda pk: None, verify=lambda pk: None)
    asked: list[int] = []  # the rate each ask was told
    real = follower.vma.client.replication

    def replication(replication_id: str) -> Any:
        state = real(replication_id)
        asked.append(sum(int(d["throughput_bps"]) for d in state["disks"]))
        return state

    def tick() -> bool:
        """One tick, then a short pause; whether it asked about the copy."""
        before = len(asked)
        follower.tick()
        time.sleep(0.02)
        return len(asked) > before

    follower.vma.client.replication = replication  # type: ignore[method-assign]
    try:
        while not asked or asked[-1] == 0:  # no rate yet: asked every tick
            assert tick()
        ticks, told, started = 0, 0, time.monotonic()
        while ticks < 10 or time.monotonic() - started < 0.9:
            told += tick()
            ticks += 1
        elapsed = time.monotonic() - started
        assert told <= elapsed / 0.4 + 1 and told <= ticks - 5, f"{told} asks in {elapsed:.2f} s of {ticks} ticks"
        last: list[bool] = []
        while job.state == JobState.REPLICATING and time.monotonic() - started < 60:
            last.append(tick())
            job.refresh_from_db()
        assert job.state == JobState.VERIFYING, job.state
        assert last[-3:] == [True, True, True], f"the copy's last ticks asked: {last[-8:]}"
    finally:
        follower.close()


def test_a_tick_reads_no_history_table_whole(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    """A fleet's finished jobs, their disks and events pile up by thousands a day, and the follower ticks
    ten times a second: every query a tick makes of those tables is narrowed by a WHERE clause (the
    active states, a job), never a scan of the whole history (13 ms a tick with 100,000 finished jobs
    on SQLite, before the dispatch check was narrowed)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    sim = make_sim()
    wire(settings, nbdkit_server, sim)
    done = [actions.start_migration(vm_id=sim.vm(name).id) for name in ("web-01", "db-01")]
    drive(*done)
    running = actions.start_migration(vm_id=sim.vm("app-01").id)
    drive(running, until=lambda j: j.state == JobState.REPLICATING and bool(j.replication_id))
    actions.start_migration(vm_id=sim.vm("file-01").id)  # pending
    follower = Follower(enqueue=lambda task, pk: None, detach=lambda pk: None, verify=lambda pk: None)
    try:
        with CaptureQueriesContext(connection) as queries:
            follower.tick()
    finally:
        follower.close()
    history = ('"migrations_app_migrationjob"', '"migrations_app_jobdisk"', '"migrations_app_jobevent"')
    reads = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("SELECT")]
    of_history = [sql for sql in reads if any(f"FROM {table}" in sql for table in history)]
    assert len(of_history) >= 4, of_history
    whole = [sql for sql in of_history if " WHERE " not in sql]
    assert not whole, whole


def test_ticks_faster_than_the_poll_interval_write_progress_once_an_interval(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    """While work flows the follower ticks every tenth of a second (to notice a copy's end at once); the
    progress it writes, a sparkline sample each time, still comes once a poll interval: every sample
    stands for the same time, and a busy follower does not write ten times as often."""
    # 8 MiB/s into 64 MiB: the copy runs for 8 s, its progress moving by a percent every 0.08 s.
    sim = make_sim(Faults(rate_bits_per_second=64 << 20), size_mib=64)
    wire(settings, nbdkit_server, sim)
    settings.OMA_WORKFLOW = {**settings.OMA_WORKFLOW, "POLL_INTERVAL": 0.4}  # type: ignore[attr-defined]
    job = actions.start_migration(vm_id=sim.vm("web-01").id)
    drive(job, until=lambda j: j.state == JobState.REPLICATING and bool(j.replication_id))
    follower = Follower(enqueue=lambda task, pk: None, detach=lambda pk: None)
    try:
        before = len(MigrationJob.objects.get(pk=job.pk).throughput_samples)
        follower.tick()
        first = len(MigrationJob.objects.get(pk=job.pk).throughput_samples)
        assert first == before + 1, "a copy this follower has not written yet is written at its first tick"
        ticks, started = 1, time.monotonic()
        while time.monotonic() - started < 1.0:
            follower.tick()
            ticks += 1
            time.sleep(0.02)
        job.refresh_from_db()
        assert job.state == JobState.REPLICATING and ticks >= 10
        written = len(job.throughput_samples) - before
        assert 2 <= written <= 4, f"{written} samples in 1 s of {ticks} ticks at a 0.4 s poll interval"
        assert job.disks.get().bytes_done > 0
    finally:
        follower.close()


def test_a_jobs_progress_is_written_in_the_same_statements_whatever_its_disk_count() -> None:
    """The follower writes every moving copy's progress once a poll interval: a job's disks in one
    statement, its sparkline extended from the job as read this tick (not read again)."""
    from migrations_app.follower import write_progress
    from tests.support.factories import make_jobs

    def statements(disk_count: int) -> list[str]:
        (job,) = make_jobs(1, state=JobState.REPLICATING, disks=disk_count)
        disks = {d.source_disk.unit_number: d for d in job.disks.select_related("source_disk")}
        reported = [
            {"unit_number": unit, "state": "copying", "bytes_done": 7 << 20, "bytes_total": 0,
             "throughput_bps": 1_000_000, "change_id": f"c{unit}", "checkpoint": f"k{unit}",
             "checkpoint_bytes": 6 << 20}
            for unit in disks
        ]  # fmt: skip
        with CaptureQueriesContext(connection) as queries, transaction.atomic():
            write_progress(job, disks, reported)  # type: ignore[arg-type]
        job.refresh_from_db()
        assert job.throughput_samples[-2:] == [90e6, 1_000_000 * disk_count], "one sample more, of every disk"
        by_unit = job.disks.order_by("source_disk__unit_number")
        written = by_unit.values_list("bytes_done", "new_change_id", "checkpoint")
        assert list(written) == [(7 << 20, f"c{unit}", f"k{unit}") for unit in range(disk_count)]
        return [q["sql"] for q in queries.captured_queries]

    one, three = statements(1), statements(3)
    assert len(three) == len(one), three
