"""The progress follower: one per OMA node, a long-running process (``manage.py run_follower``).

Each tick it
1. follows every copy running at the VMA for this node's jobs: progress written in one batch, and a copy
   that ended finishes its job (completed, failed or cancelled; a sync is verified first, in the
   follower's own threads); a cancel is passed on to the VMA until the VMA says the copy stopped;
2. recovers worker steps whose worker went silent (queued again, once), syncs left verifying by a
   follower that stopped (verified here) and cancels that no worker is left to finish;
3. dispatches pending jobs, oldest first: it reserves each job's attach slots under the node's lock, has
   idle volumes detached when slots are short, and queues one worker task for a job it could place (and
   one that creates the missing volumes of a sync that waits for slots, so it holds none meanwhile);
4. starts the warm syncs of migration groups that are due.

Between ticks, its placer thread places pending jobs as soon as a read-back or a detach frees slots.

No task timeout can cut a copy: no worker waits for one. The follower holds a lease on its node's row, so
a second follower of the same node stands by instead of doubling the work.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import connections, transaction
from django.db.models import Count, Max, Q
from django.utils import timezone

from live.outbox import announce
from omaportal.scrub import scrub

from .backends import get_vma_client, get_volume_backend
from .conf import workflow_conf
from .events import record_job_event
from .groups import start_due_syncs
from .models import (
    ACTIVE_STATES,
    MOVABLE_STATES,
    ROLLBACK_ON_FAILURE,
    SEQUENCES,
    WORKER_STEPS,
    DestinationVolume,
    JobDisk,
    JobEvent,
    JobKind,
    JobState,
    MigrationJob,
    NodeEvent,
    OmaNode,
)
from .nodes import drained_wait_reason, mark_back, mark_lost_nodes
from .slots import Placer, release, this_node, used_slots
from .topics import JOB, PROGRESS
from .vma_client import DiskProgress, Replication, ReplicationTarget, VmaClient, VmaError, VmaUnavailable
from .volumes import VolumeError
from .workflow import TRANSITION_FIELDS, complete, replication_targets, run_job, stale_before, start_rollback

log = logging.getLogger(__name__)
# Consecutive failed polls of one copy before the VMA counts as gone.
SPARKLINE_SAMPLES = 40
# At most this many pending jobs are looked at per tick (the rest wait for the next one).
DISPATCH_BATCH = 200
# A queued worker task that never started (its worker died first) is queued again after this.
REQUEUE_AFTER = timedelta(minutes=5)
DISPATCH_FIELDS = ["node", "wait_reason", "queued_at", "runner", "replication_id"]
# Pending jobs are placed again at least this often even when nothing seemed to change.
DISPATCH_AT_LEAST_EVERY = 2.0
# Detaches the follower runs at once (each a CloudStack job on that backend).
DETACH_THREADS = 4
# Syncs whose copy ended that the follower verifies at once (each a few helper reads of the volumes).
VERIFY_THREADS = 4
# A running copy is asked about once a poll interval, and on every (busy, fast) tick once its progress
# says it ends within this many seconds: its end is noticed at once, without asking the VMA about every
# copy ten times a second (each ask costs the VMA and the follower CPU, and a WAN round trip).
ENDING_WITHIN = 0.5
# Copies one tick asks the VMA about side by side (each ask is a round trip, over a WAN in production:
# asked one after the other, 25 copies at 50 ms each would make every tick take over a second).
ASK_THREADS = 8

type Enqueue = Callable[[str, int], None]
type Detach = Callable[[int], None]
type Verify = Callable[[int], None]


def enqueue_task(task: str, pk: int) -> None:
    """Queue one django-q2 task after the current transaction commits."""
    from django_q.tasks import async_task

    transaction.on_commit(lambda: async_task(f"migrations_app.tasks.{task}", pk, task_name=f"{task}-{pk}"))


def follower_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def hold_lease(node: OmaNode, holder: str) -> bool:
    """Take or renew this node's follower lease; False while another follower holds a live one."""
    # A follower that has not renewed its lease for the heartbeat's stale period is presumed gone.
    stale = stale_before()
    return bool(
        OmaNode.objects.filter(pk=node.pk)
        .filter(Q(follower=holder) | Q(follower="") | Q(follower_beat_at__lt=stale) | Q(follower_beat_at__isnull=True))
        .update(follower=holder, follower_beat_at=timezone.now())
    )


def drop_lease(node: OmaNode, holder: str) -> None:
    OmaNode.objects.filter(pk=node.pk, follower=holder).update(follower="", follower_beat_at=None)


# A follower renews its lease at most this often (seconds). Busy ticks come ten times a second, and each
# renewal is a write to the node's row (on SQLite, the write lock every worker waits for); a lease goes
# stale only after the heartbeat's stale period (a minute by default).
LEASE_RENEW_EVERY = 1.0


class Lease:
    """One follower's hold on its node, renewed at most every ``LEASE_RENEW_EVERY`` seconds. Between two
    renewals no other follower can have taken it: that needs the lease stale, a whole stale period
    without a renewal, and the first tick after any pause that long renews (and finds out) first."""

    def __init__(self, node: OmaNode, holder: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.node, self.holder, self.clock = node, holder, clock
        self.renewed_at: float | None = None

    def hold(self) -> bool:
        now = self.clock()
        if self.renewed_at is not None and now - self.renewed_at < LEASE_RENEW_EVERY:
            return True
        self.renewed_at = now if hold_lease(self.node, self.holder) else None
        return self.renewed_at is not None

    def drop(self) -> None:
        self.renewed_at = None
        drop_lease(self.node, self.holder)


@dataclass
class TickReport:
    followed: int = 0
    finished: list[str] = field(default_factory=list)
    verifying: list[str] = field(default_factory=list)  # of the finished: copies whose volumes are read back now
    dispatched: list[str] = field(default_factory=list)
    waiting: int = 0
    recovered: list[str] = field(default_factory=list)
    detaching: list[int] = field(default_factory=list)
    scheduled: list[str] = field(default_factory=list)
    still_detaching: int = 0  # volumes being detached for a waiting job
    lost_nodes: list[str] = field(default_factory=list)  # other nodes this tick marked down
    taken_over: list[str] = field(default_factory=list)  # jobs of lost nodes this tick let go to be placed again
    first_wanted: int = 0  # new slots the oldest job waiting for them needs (as this placement left it)

    @property
    def changed(self) -> bool:
        """Something moved, or jobs wait for capacity that a running copy or a detach is about to free:
        the next tick should come soon (a slot left idle is a copy not running)."""
        moved = (
            self.finished
            or self.dispatched
            or self.recovered
            or self.detaching
            or self.scheduled
            or self.lost_nodes
            or self.taken_over
        )
        return bool(moved) or bool(self.waiting and (self.still_detaching or self.followed))


class TickVma:
    """The VMA as one tick of the follower sees it: once a call found it unreachable (each such call can
    take the client's whole timeout, retries and deadline), every later call of the same tick fails at
    once with the same error, so a VMA cut off from the network costs one timeout a tick, not one per
    copy; a tick that long would stop the node's lease from beating and let the other nodes take its
    work. The next tick asks again."""

    def __init__(self, client: VmaClient) -> None:
        self.client = client
        self.unreachable: VmaUnavailable | None = None
        self.answered = False  # the last tick that asked about copies reached the VMA
        self.asker = ThreadPoolExecutor(max_workers=ASK_THREADS, thread_name_prefix="vma-ask")

    def new_tick(self) -> None:
        self.unreachable = None

    def _ask[T](self, call: Callable[[], T]) -> T:
        if self.unreachable is not None:
            raise self.unreachable
        try:
            return call()
        except VmaUnavailable as exc:
            self.unreachable = exc
            raise

    def replication(self, replication_id: str) -> Replication:
        return self._ask(lambda: self.client.replication(replication_id))

    def cancel(self, replication_id: str) -> Replication:
        return self._ask(lambda: self.client.cancel(replication_id))

    def start_replication(self, replication_id: str, vm_id: str, disks: Sequence[ReplicationTarget]) -> Replication:
        return self._ask(lambda: self.client.start_replication(replication_id, vm_id, disks))

    def ask_about(self, jobs: Sequence[MigrationJob]) -> list[Replication | VmaError]:
        """Each job's copy as the VMA says it is now (a cancelling job's: after asking it to stop), or the
        error asking it gave, in the jobs' order. When the last tick reached the VMA, all are asked side by
        side (one round trip a tick; should it have gone away meanwhile, the asks wait out one timeout
        together). Otherwise the first is asked alone: while the VMA is unreachable, that one ask finds
        out and the others fail at once; if it answers, the rest are asked side by side."""

        def ask(job: MigrationJob) -> Replication | VmaError:
            try:
                if job.state == JobState.CANCELLING:
                    return self.cancel(job.replication_id)
                return self.replication(job.replication_id)
            except VmaError as exc:
                return exc

        if not jobs:
            return []
        alone = [] if self.answered else [ask(jobs[0])]
        answers = [*alone, *self.asker.map(ask, jobs[len(alone) :])]
        self.answered = self.unreachable is None
        return answers

    def close(self) -> None:
        self.asker.shutdown(wait=True)
        self.client.close()


class Follower:
    def __init__(
        self,
        enqueue: Enqueue = enqueue_task,
        vma: VmaClient | None = None,
        detach: Detach | None = None,
        verify: Verify | None = None,
    ) -> None:
        self.enqueue = enqueue
        self.vma = TickVma(vma or get_vma_client())
        self.resumed_at_bytes: dict[int, int] = {}  # job -> its bytes done when it was last resumed
        self.written: dict[tuple[int, int], tuple[int, int, int, str, str, int]] = {}
        self.progress_at: dict[int, float] = {}  # job -> when its progress was last written (monotonic)
        self.asked_at: dict[int, float] = {}  # job -> when the VMA was last asked about its copy (monotonic)
        self.ends_at: dict[int, float] = {}  # job -> when its copy should end, by its last progress (monotonic)
        self.node = this_node()
        # Detaches free slots: the follower runs them itself, a few at a time beside its ticks (a CloudStack
        # detach takes seconds), instead of queueing them behind the workers' steps.
        self.detacher = ThreadPoolExecutor(max_workers=DETACH_THREADS, thread_name_prefix="detach")
        self.in_flight: set[int] = set()
        self.detach = detach or self._detach_in_thread
        # A sync whose copy ended is verified here, in the follower's own threads, as soon as the copy's
        # end is noticed: its slots are not held while the step waits its turn in the worker queue, and
        # the placer thread places a waiting job in the slots it frees. Called inside the tick's transaction.
        self.verifier = ThreadPoolExecutor(max_workers=VERIFY_THREADS, thread_name_prefix="verify")
        self.verify = verify or self._verify_in_thread
        self.verifying: set[int] = set()  # jobs handed to the verifier threads and not done yet
        # Set when the placer thread could not place (its node is down, or the placement failed): the run
        # loop ticks at once instead of sleeping on, and the tick places.
        self.wake = threading.Event()
        self.freed = True
        # One placement at a time: the tick's, or the placer thread's. A read-back or a detach that freed
        # slots wakes the placer, which hands them on at once: the tick may be busy asking the VMA about
        # every copy (round trips the waiting job need not wait for), and the verifier and detach threads
        # go back to their own work.
        self.placing = threading.Lock()
        self.place_wanted = threading.Event()
        self.stopping = False
        self.placer = threading.Thread(target=self._place_freed, name="placer", daemon=True)
        self.placer.start()
        self.waiting = 0
        self.pending_signature: tuple[int, int | None, int, datetime | None] = (-1, None, -1, None)
        self.dispatched_at = 0.0
        self.checked_at = -1e9  # when the checks made once a poll interval were last made (monotonic)
        self.first_wanted = 0  # new slots the oldest job waiting for them needs, by the last placement
        self.prepare_asked: set[int] = set()  # pending jobs whose volumes a worker was asked to create ahead

    def close(self) -> None:
        self.detacher.shutdown(wait=True)
        self.verifier.shutdown(wait=True)
        self.stopping = True
        self.place_wanted.set()
        self.placer.join()
        self.vma.close()

    def _detach_in_thread(self, volume_pk: int) -> None:
        if volume_pk in self.in_flight:
            return
        self.in_flight.add(volume_pk)

        def run() -> None:
            try:
                detach_volume(volume_pk)
            except Exception:
                log.exception("detaching volume %s failed", volume_pk)
            finally:
                self.in_flight.discard(volume_pk)
                self._detach_done()
                connections.close_all()

        self.detacher.submit(run)

    def _verify_in_thread(self, job_pk: int) -> None:
        """Run the job's verifying step (and its completion) in a verifier thread once the tick's
        transaction commits. The thread claims the job as any worker would: if the follower dies
        meanwhile, its heartbeat goes stale and ``recover`` queues the step for a worker."""
        runner = f"{follower_id()}:verify"
        if job_pk in self.verifying:
            return
        self.verifying.add(job_pk)

        def run() -> None:
            try:
                run_job(job_pk, runner)
            except Exception:
                log.exception("verifying job %s failed", job_pk)
            finally:
                self.verifying.discard(job_pk)
                self._slots_freed()  # its volumes turned idle: a waiting job may take their slots
                connections.close_all()

        transaction.on_commit(lambda: self.verifier.submit(run))

    def _detach_done(self) -> None:
        """A detach ended (its slot is free, or it was kept): the placer places now if the oldest job
        waiting for slots can have them, or if no other detach is still running. Otherwise the last
        detach it waits for wakes the placer: a pass that places nothing still takes the node's lock
        (on SQLite the write lock every worker needs), and a 2-disk job waited through one per detach.
        A detach discards itself from ``in_flight`` after its slot was released, so the last one to end
        always sees every slot the others freed."""
        need = self.first_wanted
        if need and self.in_flight:
            try:
                free = self.node.attach_slots - used_slots(self.node)
            except Exception:
                free = need  # the placer finds out what is wrong
            if free < need:
                return
        self._slots_freed()

    def _slots_freed(self) -> None:
        """A read-back or a detach that ran in this thread freed slots (or may have): the placer thread
        places what waits for them now."""
        self.freed = True
        self.place_wanted.set()

    def _place_freed(self) -> None:
        """The placer thread: places pending jobs whenever a read-back or a detach freed slots (several
        frees during one placement make one more). When it cannot (its node is down, the placement
        failed), the tick is woken to place instead."""
        try:
            while True:
                self.place_wanted.wait()
                if self.stopping:
                    return
                self.place_wanted.clear()
                if self.node.down_since is not None:
                    self.wake.set()  # the tick marks the node back first
                    continue
                try:
                    self._place_if_due(TickReport())
                except Exception:
                    log.exception("placing the waiting jobs failed; the next tick places them")
                    self.freed = True
                    self.wake.set()
        finally:
            connections.close_all()

    def tick(self) -> TickReport:
        report = TickReport()
        self.vma.new_tick()
        self.node = OmaNode.objects.get(pk=self.node.pk)
        back = self.node.down_since is None or mark_back(self.node)  # reconciles its exports first
        # Once a poll interval, not on every busy tick (ten a second while copies end and jobs are
        # placed): what these look for is measured in seconds or minutes (a node silent for the stale
        # period, a lost node's copy the VMA says stopped, a silent worker, a back-off that ended, a
        # detach to run again, a group's sync that is due).
        slow = time.monotonic() - self.checked_at >= workflow_conf().poll_interval
        if slow:
            self.checked_at = time.monotonic()
            report.lost_nodes = mark_lost_nodes(self.node)
            if back:
                self.take_over(report)
        # A slot freed since the last tick (a read-back or a detach ended) goes to the job that waits for
        # it before the VMA is asked about the copies: the asks are round trips it does not need.
        placed = back and self.freed and self._place_if_due(report)
        self.follow(report)
        if slow:
            self.recover(report)
        if not (back and self._place_if_due(report)) and not placed:
            report.waiting = self.waiting  # as the last placement left them
        if slow:
            report.scheduled = start_due_syncs(self.node)
        report.still_detaching = len(self.in_flight)  # this follower's detach threads
        return report

    # --- 1. copies at the VMA ---------------------------------------------------------------

    def follow(self, report: TickReport) -> None:
        # Only the jobs: their disks are read for the few copies this tick asks about and writes.
        jobs = list(
            MigrationJob.objects.filter(state__in=[JobState.REPLICATING, JobState.CANCELLING], node=self.node).exclude(
                replication_id=""
            )
        )
        report.followed = len(jobs)
        for gone in (self.asked_at.keys() | self.ends_at.keys()) - {job.pk for job in jobs}:
            self._forget(gone)  # its copy ended or left this node by another way than this follower
        progress: list[tuple[MigrationJob, Replication]] = []
        now = timezone.now()
        due = [
            job
            for job in jobs
            # (a copy backing off before its next resume is not asked about)
            if not (job.state == JobState.REPLICATING and job.retry_at is not None and job.retry_at > now)
            and self._ask_now(job)
        ]
        for job, state in zip(due, self.vma.ask_about(due), strict=True):
            if isinstance(state, VmaUnavailable):
                if job.state == JobState.REPLICATING:
                    # The copy may well go on at the VMA: wait for it, within the outage window.
                    self._outage(job, f"the VMA is unreachable ({state.message})", report, resume=False)
                continue  # a cancel waits for the VMA to come back: it is never dropped
            if isinstance(state, VmaError):
                if state.status == 404 and job.state == JobState.REPLICATING:
                    self._outage(job, "the VMA no longer knows the copy (it restarted)", report, resume=True)
                elif state.status == 404:
                    self._finish(job, None, JobState.CANCELLED, "")  # cancelling, and nothing runs there
                    report.finished.append(job.job_id)
                else:
                    self._finish(job, None, JobState.FAILED, f"replicating: {state}")
                    report.finished.append(job.job_id)
                continue
            if state["state"] in ("running", "cancelling"):
                self._outage_over(job, state)
                self._expect_end(job, state)
                progress.append((job, state))
                continue
            if job.state == JobState.CANCELLING:
                self._finish(job, state, JobState.CANCELLED, "")
            elif state["state"] == "completed":
                if self._finish(job, state, JobState.COMPLETED, "") == JobState.VERIFYING:
                    report.verifying.append(job.job_id)
            elif state.get("error_kind") == "transient":
                # The NBD server or the network cut the copy: continue it from what was confirmed.
                self._write_progress([(job, state)])
                self._outage(job, f"the copy was cut: {state.get('error') or '-'}", report, resume=True)
                continue
            else:
                why = f"replicating: the VMA reports the replication {state['state']}: {state.get('error') or '-'}"
                self._finish(job, state, JobState.FAILED, why)
            report.finished.append(job.job_id)
        if progress:
            # Busy ticks come faster than the poll interval (to notice a copy's end at once); progress is
            # still written once a poll interval, so each sparkline sample stands for the same time.
            self._write_progress(progress, every=workflow_conf().poll_interval)

    def _ask_now(self, job: MigrationJob) -> bool:
        """Whether this tick asks the VMA about the job's copy: a cancel, a copy not asked about for a poll
        interval, or one whose progress says it ends soon (or says nothing of when)."""
        now = time.monotonic()
        last = self.asked_at.get(job.pk)
        due = (
            job.state != JobState.REPLICATING
            or last is None
            or now - last >= workflow_conf().poll_interval
            or self.ends_at.get(job.pk, now) - now <= ENDING_WITHIN
        )
        if due:
            self.asked_at[job.pk] = now
        return due

    def _expect_end(self, job: MigrationJob, state: Replication) -> None:
        """When the copy should end: its slowest disk's bytes left at that disk's rate (unknown while a
        disk that has bytes left reports no rate yet)."""
        left = 0.0
        for item in state["disks"]:
            remaining = int(item.get("bytes_total") or 0) - int(item.get("bytes_done") or 0)
            rate = int(item.get("throughput_bps") or 0)
            if remaining > 0 and item.get("state") in ("queued", "copying"):
                if rate <= 0:
                    self.ends_at.pop(job.pk, None)
                    return
                left = max(left, remaining / rate)
        self.ends_at[job.pk] = time.monotonic() + left

    def _outage(self, job: MigrationJob, why: str, report: TickReport, *, resume: bool) -> None:
        """A copy interrupted (its VMA unreachable or restarted, its NBD target gone): within the outage
        window it is waited for, or resumed from its checkpoints, backing off; after it, the job fails."""
        now = timezone.now()
        window = workflow_conf().outage_window_seconds
        since = job.outage_since or now
        waited = (now - since).total_seconds()
        if waited > window:
            self._finish(job, None, JobState.FAILED, f"replicating: {why}; still so after {waited:.0f} s")
            report.finished.append(job.job_id)
            return
        if job.outage_since is None:
            job.outage_since = since
            with transaction.atomic():
                MigrationJob.objects.filter(pk=job.pk).update(outage_since=since)
                record_job_event(job, "replication.interrupted", step=JobState.REPLICATING, message=why)
        # Backing off: 1 s, then longer as the outage lasts (at most 30 s between two tries).
        pause = min(30.0, max(1.0, waited / 4))
        retry_at = now + timedelta(seconds=pause)
        if not resume:
            self._set_wait(job, f"{why}; waiting since {since:%H:%M:%S}", None)
            return
        attempt = job.resumes + 1
        replication_id = f"{job.job_id}-{job.attempt}-r{attempt}"
        disks = list(job.disks.select_related("source_disk", "mapping").order_by("source_disk__unit_number"))
        try:
            self.vma.start_replication(replication_id, job.vm.vm_id, replication_targets(disks, resume=True))
        except VmaError as exc:
            self._set_wait(job, f"{why}; resuming failed ({exc.message}), next try in {pause:.0f} s", retry_at)
            return
        confirmed = sum(d.checkpoint_bytes for d in disks)
        with transaction.atomic():
            MigrationJob.objects.filter(pk=job.pk).update(
                replication_id=replication_id,
                resumes=attempt,
                retry_at=None,
                wait_reason=scrub(f"resumed after: {why}")[:255],
            )
            record_job_event(
                job,
                "replication.resumed",
                step=JobState.REPLICATING,
                message=f"{replication_id}: resumed from what was confirmed written ({confirmed >> 20} MiB) "
                f"after: {why}",
            )
        self.resumed_at_bytes[job.pk] = sum(d.bytes_done for d in disks)
        report.recovered.append(job.job_id)

    def _outage_over(self, job: MigrationJob, state: Replication) -> None:
        """The copy runs again: once it has written something new (not merely started again and about to
        be cut once more), the outage is over and its window starts afresh next time."""
        if job.outage_since is None and not job.wait_reason:
            return
        done = sum(int(item.get("bytes_done") or 0) for item in state["disks"])
        if done <= self.resumed_at_bytes.get(job.pk, -1):
            return
        self.resumed_at_bytes.pop(job.pk, None)
        with transaction.atomic():
            MigrationJob.objects.filter(pk=job.pk).update(outage_since=None, wait_reason="", retry_at=None)
            if job.outage_since is not None:
                lasted = (timezone.now() - job.outage_since).total_seconds()
                record_job_event(
                    job, "replication.continues", step=JobState.REPLICATING, message=f"after {lasted:.0f} s"
                )

    def _set_wait(self, job: MigrationJob, why: str, retry_at: datetime | None) -> None:
        if job.wait_reason == why[:255] and job.retry_at == retry_at:
            return
        with transaction.atomic():
            MigrationJob.objects.filter(pk=job.pk).update(wait_reason=scrub(why)[:255], retry_at=retry_at)
            announce(JOB, job.pk)
        job.wait_reason, job.retry_at = why[:255], retry_at

    def _forget(self, job_pk: int) -> None:
        """What this follower remembers of a job's copy, dropped when the copy ended or left this node."""
        self.resumed_at_bytes.pop(job_pk, None)
        self.progress_at.pop(job_pk, None)
        self.asked_at.pop(job_pk, None)
        self.ends_at.pop(job_pk, None)
        for key in [k for k in self.written if k[0] == job_pk]:
            del self.written[key]

    def _write_progress(self, batch: list[tuple[MigrationJob, Replication]], every: float = 0.0) -> None:
        """Every moving job's disks and a sparkline sample, in one transaction (one write lock on SQLite
        per tick, however many copies run); nothing for a job whose numbers did not change, or whose last
        numbers were written less than ``every`` seconds ago."""
        changed: list[tuple[MigrationJob, dict[int, JobDisk], list[DiskProgress]]] = []
        now = time.monotonic()
        due = [(job, state) for job, state in batch if now - self.progress_at.get(job.pk, -every) >= every]
        by_job: dict[int, dict[int, JobDisk]] = {job.pk: {} for job, _ in due}
        for disk in JobDisk.objects.filter(job__in=[job for job, _ in due]).select_related("source_disk"):
            by_job[disk.job_id][disk.source_disk.unit_number] = disk
        for job, state in due:
            disks = by_job[job.pk]
            values = [(item, _values(item, disks.get(item["unit_number"]))) for item in state["disks"]]
            if any(self.written.get((job.pk, item["unit_number"])) != v for item, v in values if v is not None):
                changed.append((job, disks, state["disks"]))
                self.progress_at[job.pk] = now
                for item, v in values:
                    if v is not None:
                        self.written[(job.pk, item["unit_number"])] = v
        if not changed:
            return
        with transaction.atomic():
            for job, disks, reported in changed:
                write_progress(job, disks, reported)

    def _finish(self, job: MigrationJob, state: Replication | None, to: str, error: str) -> str | None:
        """The copy ended: record its last numbers, change ids and the job's final state together. Returns
        the state the job went to (None: it had left the copy already)."""
        with transaction.atomic():
            locked = MigrationJob.objects.select_for_update().get(pk=job.pk)
            if locked.state not in (JobState.REPLICATING, JobState.CANCELLING):
                return None
            if to == JobState.COMPLETED and locked.state == JobState.CANCELLING:
                to = JobState.CANCELLED  # the copy finished as the cancel came in: the cancel wins
            disks = {d.source_disk.unit_number: d for d in locked.disks.select_related("source_disk")}
            if state is not None:
                write_progress(locked, disks, state["disks"])
            if locked.outage_since or locked.wait_reason or locked.retry_at:
                # The copy ended: whatever outage it rode out is over.
                MigrationJob.objects.filter(pk=locked.pk).update(outage_since=None, wait_reason="", retry_at=None)
            # A failover's final sync always goes on through a worker (verified: it is what the VM boots).
            verifying = to == JobState.COMPLETED and (workflow_conf().verify_writes or locked.kind != JobKind.SYNC)
            if verifying:
                # Not complete before the portal has re-read what the VMA says it wrote (the step below).
                to = JobState.VERIFYING
                digested = []
                for item in state["disks"] if state is not None else []:
                    disk = disks.get(item["unit_number"])
                    if disk is not None:
                        disk.digest = item.get("digest") or {}
                        digested.append(disk)
                JobDisk.objects.bulk_update(digested, ["digest"])
            if to != JobState.COMPLETED:  # complete() below makes that transition itself
                locked.transition_to(to, error=error)
                locked.queued_at = timezone.now() if verifying else locked.queued_at
                locked.save(update_fields=[*TRANSITION_FIELDS, "queued_at"])
            if to in (JobState.COMPLETED, JobState.VERIFYING):
                started = (
                    JobEvent.objects.filter(job=locked, kind="step.started", step=JobState.REPLICATING)
                    .order_by("-id")
                    .values_list("created_at", flat=True)
                    .first()
                )
                took = int((timezone.now() - started).total_seconds() * 1000) if started else None
                record_job_event(locked, "step.finished", step=JobState.REPLICATING, duration_ms=took)
            if to == JobState.VERIFYING and locked.kind == JobKind.SYNC:
                self.verify(locked.pk)
            elif to == JobState.VERIFYING:  # a failover's steps after its final sync take minutes
                self.enqueue("run_job_task", locked.pk)
            elif to == JobState.COMPLETED:
                complete(locked)
            elif locked.kind != JobKind.SYNC:
                # A failover's final sync that stopped: the source is off, so everything goes back.
                why = "cancelled during the final sync" if to == JobState.CANCELLED else f"final sync: {error}"
                transaction.on_commit(lambda: start_rollback(locked, why))
            elif to == JobState.CANCELLED:
                record_job_event(
                    locked,
                    "job.cancelled",
                    step=locked.current_step,
                    message="the VMA stopped the copy; volumes and exports kept",
                )
            else:
                record_job_event(locked, "step.failed", step=locked.current_step, message=error)
        self._forget(job.pk)
        return to

    # --- 2. silent workers ------------------------------------------------------------------

    def recover(self, report: TickReport) -> None:
        stale = stale_before()
        now = timezone.now()
        # A step that failed unexpectedly is tried again once its back-off is over.
        for job in MigrationJob.objects.filter(
            node=self.node, state__in=WORKER_STEPS, runner="", retry_at__lte=now, queued_at__isnull=True
        ):
            with transaction.atomic():
                if MigrationJob.objects.filter(pk=job.pk, runner="", queued_at__isnull=True).update(queued_at=now):
                    self.enqueue("run_job_task", job.pk)
                    report.recovered.append(job.job_id)
        # A test failover whose time is up ends by itself.
        for job in MigrationJob.objects.filter(node=self.node, state=JobState.TESTING, test_ends_at__lte=now):
            start_rollback(job, "the test's time is up")
            report.recovered.append(job.job_id)
        # A sync's read-back that no verifier thread of this follower runs (it was noticed by a follower
        # that stopped before verifying it): verified now, not after the queue's REQUEUE_AFTER.
        for job_pk, job_id in (
            MigrationJob.objects.filter(
                node=self.node, kind=JobKind.SYNC, state=JobState.VERIFYING, runner="", retry_at__isnull=True
            )
            .exclude(pk__in=list(self.verifying))  # a copy: verifier threads change the set
            .values_list("pk", "job_id")
        ):
            self.verify(job_pk)
            report.recovered.append(job_id)
        silent = MigrationJob.objects.filter(node=self.node, state__in=[*WORKER_STEPS, JobState.CANCELLING]).filter(
            Q(heartbeat_at__lt=stale) | Q(heartbeat_at__isnull=True)
        )
        for job in silent:
            if job.replication_id and job.state in (JobState.REPLICATING, JobState.CANCELLING):
                continue  # the follower's own
            if job.retry_at is not None:
                continue  # waits out an error's back-off (above)
            if job.state == JobState.CANCELLING:
                self._cancel_without_worker(job)
                report.recovered.append(job.job_id)
                continue
            if job.queued_at is not None and job.queued_at > now - REQUEUE_AFTER:
                continue  # a task is queued already
            with transaction.atomic():
                # Only the queue mark: the heartbeat stays stale, so the new worker may take the job over.
                if MigrationJob.objects.filter(pk=job.pk, heartbeat_at=job.heartbeat_at).update(queued_at=now):
                    self.enqueue("run_job_task", job.pk)
                    report.recovered.append(job.job_id)
        # A detach this follower is not running (it was chosen before a restart, or it failed): again.
        for volume_pk in DestinationVolume.objects.filter(
            node=self.node, state=DestinationVolume.State.DETACHING
        ).values_list("pk", flat=True):
            if volume_pk not in self.in_flight:
                self.detach(volume_pk)

    def _cancel_without_worker(self, job: MigrationJob) -> None:
        """A cancelling job whose worker died: its worker may have asked the VMA to copy before it could
        record so, so the VMA is asked to stop this attempt's replication (by its name) first. Only when
        the VMA says none runs is the job cancelled; while it cannot be asked, the job stays cancelling."""
        replication_id = f"{job.job_id}-{job.attempt}"
        try:
            self.vma.cancel(replication_id)
        except VmaUnavailable:
            return  # asked again next tick: a cancel is never dropped
        except VmaError as exc:
            if exc.status != 404:
                log.warning("cancelling %s at the VMA: %s", replication_id, exc)
                return
            with transaction.atomic():
                locked = MigrationJob.objects.select_for_update().get(pk=job.pk)
                if locked.state == JobState.CANCELLING and not locked.replication_id:
                    locked.transition_to(JobState.CANCELLED)
                    locked.runner = ""
                    locked.save(update_fields=[*TRANSITION_FIELDS, "runner"])
                    record_job_event(
                        locked,
                        "job.cancelled",
                        step=locked.current_step,
                        message="its worker was gone; nothing was copying",
                    )
                    if locked.kind != JobKind.SYNC and locked.current_step in ROLLBACK_ON_FAILURE:
                        transaction.on_commit(lambda: start_rollback(locked, "cancelled; its worker was gone"))
            return
        # A copy was running: the follower follows it until the VMA says it stopped.
        MigrationJob.objects.filter(pk=job.pk, replication_id="").update(replication_id=replication_id)

    # --- 3. a lost node's work ------------------------------------------------------------------

    def take_over(self, report: TickReport) -> None:
        """Empty every node that was marked down: its jobs that were provisioning, copying or verifying
        are placed again (the live nodes' followers place them, by free slots, like new work), their copy
        resumed from what the VMA confirmed written; its volumes are detached from it, so they can be
        attached to the node that takes them. A copy is let go only once the VMA says it stopped, and a
        volume only once no job of its VM is left on the lost node: no volume is ever written through two
        nodes, nor attached to two. Failovers past their final sync stay with their node (they move
        volumes between VMs) until it comes back. Runs on every live node's tick; each move is guarded,
        so two nodes taking over at once do each thing once."""
        lost = list(OmaNode.objects.exclude(pk=self.node.pk).filter(down_since__isnull=False, retired_at__isnull=True))
        if not lost:
            return
        stale = stale_before()
        backend = None
        for node in lost:
            jobs = MigrationJob.objects.filter(node=node, state__in=sorted(MOVABLE_STATES)).filter(
                Q(heartbeat_at__lt=stale)
                | Q(heartbeat_at__isnull=True)
                | Q(state=JobState.REPLICATING, replication_id__gt="")
            )
            moved: list[str] = []
            for job in jobs.select_related("vm"):
                if self._let_go(job, node):
                    moved.append(job.job_id)
            # A cancel in flight is followed by this node's follower from now on (its volumes stay where
            # they are until it is cancelled).
            adopted = MigrationJob.objects.filter(node=node, state=JobState.CANCELLING).update(node=self.node)
            busy = MigrationJob.objects.filter(node=node, state__in=ACTIVE_STATES).exclude(state=JobState.PENDING)
            volumes = list(
                DestinationVolume.objects.filter(node=node).exclude(source_disk__vm_id__in=busy.values("vm_id"))
            )
            detached, failed = 0, []
            for volume in volumes:
                backend = backend or get_volume_backend()
                try:
                    if volume.volume_id:
                        backend.detach_from_node(volume.volume_id, node.name, node.oma_vm_id)
                except VolumeError as exc:
                    failed.append(f"{volume.volume_id}: {exc}")
                    continue
                release(volume)
                detached += 1
            held = DestinationVolume.objects.filter(node=node).values("source_disk__vm_id")
            freed = list(
                MigrationJob.objects.filter(node=node, state=JobState.PENDING)
                .exclude(vm_id__in=held)
                .values_list("job_id", flat=True)
            )
            MigrationJob.objects.filter(job_id__in=freed, node=node).update(node=None, wait_reason="")
            if not (moved or adopted or detached or failed or freed):
                continue
            parts = []
            if moved:
                parts.append(f"{len(moved)} job(s) placed again on the live nodes: {', '.join(moved[:20])}")
            if freed:
                parts.append(f"{len(freed)} waiting job(s) let go")
            if adopted:
                parts.append(f"{adopted} cancel(s) followed by {self.node.name}")
            if detached:
                parts.append(f"{detached} volume(s) detached from it")
            if failed:
                parts.append(f"{len(failed)} volume(s) could not be detached: {'; '.join(failed[:5])}")
                log.warning("taking volumes from lost node %s: %s", node.name, "; ".join(failed))
            NodeEvent.objects.create(
                node=node, kind="node.taken_over", actor=self.node.name, message=scrub("; ".join(parts))[:500]
            )
            report.taken_over += moved + freed

    def _let_go(self, job: MigrationJob, node: OmaNode) -> bool:
        """One job of a lost node: stop its copy at the VMA (by its replication's name, even if the dead
        worker never recorded it), keep what the VMA confirmed written, and put it back to pending with
        its step kept. False, leaving it as it is, while the VMA cannot confirm the copy stopped."""
        state: Replication | None = None
        if job.state == JobState.REPLICATING:
            replication_id = job.replication_id or f"{job.job_id}-{job.attempt}"
            try:
                state = self.vma.cancel(replication_id)
            except VmaUnavailable:
                return False
            except VmaError as exc:
                if exc.status != 404:
                    log.warning("stopping %s of lost node %s: %s", replication_id, node.name, exc)
                    return False
            if state is not None and state["state"] in ("running", "cancelling"):
                return False  # stopping: asked again next tick
        with transaction.atomic():
            locked = MigrationJob.objects.select_for_update().filter(pk=job.pk, node=node, state=job.state).first()
            if locked is None:
                return False  # another live node took it first
            if state is not None:
                write_progress(
                    locked,
                    {d.source_disk.unit_number: d for d in locked.disks.select_related("source_disk")},
                    state["disks"],
                )
            confirmed = sum(locked.disks.values_list("checkpoint_bytes", flat=True))
            step = locked.current_step
            locked.transition_to(JobState.PENDING, node_lost=True)
            locked.node = None
            locked.runner = ""
            locked.replication_id = ""
            locked.queued_at = None
            locked.retry_at = None
            locked.outage_since = None
            locked.wait_reason = f"its node {node.name} was lost; it is placed again on a live node"
            locked.save(
                update_fields=[
                    *TRANSITION_FIELDS,
                    "node",
                    "runner",
                    "replication_id",
                    "queued_at",
                    "retry_at",
                    "outage_since",
                    "wait_reason",
                ]
            )
            record_job_event(
                locked,
                "job.moved",
                step=step,
                actor=self.node.name,
                message=f"node {node.name} was lost in {step}; placed again on a live node, the copy resumes "
                f"from what the VMA confirmed written ({confirmed >> 20} MiB)",
            )
        self._forget(job.pk)
        return True

    # --- 4. pending jobs ------------------------------------------------------------------------

    def _dispatch_due(self, report: TickReport) -> bool:
        """Whether placing pending jobs could come out differently from the last time: a job ended (here or
        in a worker: its volumes turn idle and may be evicted), a slot was freed, the pending jobs changed,
        the node was drained or undrained, or a while passed (settings, another node's moves). Placing
        takes the node's lock; on SQLite that is the write lock every worker needs."""
        signature = self._signature()
        now = time.monotonic()
        # A copy that ended and is being read back frees nothing yet: its job still holds its slots and
        # counts as active. Its verification's end has the placer thread place (``freed``) when it does.
        ended = set(report.finished) - set(report.verifying)
        due = (
            bool(ended or report.recovered or report.lost_nodes or report.taken_over)
            or self.freed
            or signature != self.pending_signature
            or now - self.dispatched_at > DISPATCH_AT_LEAST_EVERY
        )
        if due:
            self.freed = False
            self.pending_signature = signature
            self.dispatched_at = now
        return due and bool(signature[0])

    def _signature(self) -> tuple[int, int | None, int, datetime | None]:
        """The pending jobs (how many, the newest), the active ones here, and whether the node is drained."""
        is_pending = Q(state=JobState.PENDING)
        # Only active jobs are read (through the state index): a fleet's finished history grows by
        # thousands of jobs a day and this runs on every tick.
        pending = MigrationJob.objects.filter(
            state__in=[JobState.PENDING, *WORKER_STEPS, JobState.CANCELLING]
        ).aggregate(
            n=Count("pk", filter=is_pending),
            last=Max("pk", filter=is_pending),
            active=Count(
                "pk",
                filter=Q(state__in=[*WORKER_STEPS, JobState.CANCELLING]) & (Q(node=self.node) | Q(node__isnull=True)),
            ),
        )
        return (pending["n"], pending["last"], pending["active"], self.node.drained_at)

    def _place_if_due(self, report: TickReport) -> bool:
        with self.placing:
            if not self._dispatch_due(report):
                return False
            self.dispatch(report)
            self.waiting = report.waiting
            self.first_wanted = report.first_wanted
            # What this placement changed itself (jobs placed, failed as too big) is no reason to place again.
            self.pending_signature = self._signature()
            return True

    def dispatch(self, report: TickReport) -> None:
        """Place pending jobs, oldest first, in one transaction under the node row's lock: what each needs
        is read in bulk, slots are counted once and handed out in memory. Once a job waits for slots,
        younger ones only go if they need no new slot (the oldest is never starved); the idle volumes it
        needs freed are chosen for detaching right away."""
        flow = workflow_conf()
        waits: list[tuple[MigrationJob, str]] = []
        evicted: list[DestinationVolume] = []
        with transaction.atomic():
            node = OmaNode.objects.select_for_update().get(pk=self.node.pk)
            pending = list(
                MigrationJob.objects.select_for_update()
                .filter(state=JobState.PENDING)
                .filter(Q(node=node) | Q(node__isnull=True))
                .order_by("created_at", "pk")[:DISPATCH_BATCH]
            )
            self.prepare_asked.intersection_update(job.pk for job in pending)  # the others left pending
            if not pending:
                return
            disks: dict[int, list[int]] = {job.pk: [] for job in pending}
            for job_pk, source_disk_pk in (
                JobDisk.objects.filter(job__in=pending)
                .order_by("source_disk__unit_number")
                .values_list("job_id", "source_disk_id")
            ):
                disks[job_pk].append(source_disk_pk)
            wanted = {sd for sds in disks.values() for sd in sds}
            volumes = {v.source_disk_id: v for v in DestinationVolume.objects.filter(source_disk_id__in=wanted)}
            for missing in wanted - volumes.keys():
                volumes[missing], _ = DestinationVolume.objects.get_or_create(source_disk_id=missing)
            running = (
                MigrationJob.objects.filter(state__in=[*WORKER_STEPS, JobState.CANCELLING])
                .filter(Q(node=node) | Q(node__isnull=True))
                .count()
            )
            placer = Placer(node)
            stale = stale_before()
            ahead = 0  # slots the jobs waiting for them so far need: those within one node's worth are prepared
            for job in pending:
                if node.drained:
                    waits.append((job, drained_wait_reason(node)))
                    continue
                job_volumes = [volumes[sd] for sd in disks[job.pk]]
                if job.runner and job.heartbeat_at is not None and job.heartbeat_at > stale:
                    ahead += sum(1 for v in job_volumes if v.node_id is None)
                    waits.append((job, "its volumes are being created; it waits for attach slots"))
                    continue
                if job.node_id is None and placer.better_node(job_volumes) is not None:
                    continue  # another node has more room: its follower places it
                if len(job_volumes) > node.attach_slots:
                    why = f"needs {len(job_volumes)} attach slots; node {node.name} has {node.attach_slots} in all"
                    job.transition_to(JobState.FAILED, error=why)
                    job.save(update_fields=TRANSITION_FIELDS)
                    record_job_event(job, "step.failed", message=why)
                    continue
                if running >= flow.max_active_jobs:
                    waits.append((job, f"{running} jobs are active, the maximum is {flow.max_active_jobs}"))
                    continue
                reservation = placer.place(job_volumes)
                if not reservation.reserved:
                    waits.append((job, reservation.wait_reason))
                    evicted += reservation.evict or []
                    ahead += sum(1 for v in job_volumes if v.node_id is None)
                    if ahead <= node.attach_slots and self._to_prepare(job, job_volumes):
                        self.enqueue("prepare_volumes_task", job.pk)
                        self.prepare_asked.add(job.pk)
                    continue
                running += 1
                resume = JobState(job.current_step or SEQUENCES[job.kind][0])
                if resume in (JobState.EXPORTING, JobState.REPLICATING, JobState.VERIFYING) and any(
                    v.state != DestinationVolume.State.ATTACHED for v in job_volumes
                ):
                    resume = JobState.ATTACHING  # its volumes lost their slot meanwhile: attach them again
                job.transition_to(resume)
                job.node = node
                job.wait_reason = ""
                job.queued_at = timezone.now()
                job.runner = ""
                job.replication_id = ""
                job.save(
                    update_fields=[*TRANSITION_FIELDS, "node", "wait_reason", "queued_at", "runner", "replication_id"]
                )
                record_job_event(job, "job.started", step=resume, message=f"attempt {job.attempt}")
                self.enqueue("run_job_task", job.pk)
                report.dispatched.append(job.job_id)
        for volume in evicted:
            self.detach(volume.pk)
            report.detaching.append(volume.pk)
        for job, why in waits:
            self._wait(job, why)
        report.waiting = len(waits)
        report.first_wanted = placer.first_wanted

    def _to_prepare(self, job: MigrationJob, volumes: list[DestinationVolume]) -> bool:
        """Whether a sync that waits for attach slots should have its missing volumes created now, so its
        slots are not held through their creation once it gets them (asked once per job and follower)."""
        return (
            job.kind == JobKind.SYNC
            and job.current_step in ("", JobState.PROVISIONING)
            and any(not v.volume_id for v in volumes)
            and job.pk not in self.prepare_asked
        )

    def _wait(self, job: MigrationJob, why: str) -> None:
        """A pending job says why it waits; the event log hears of it once per reason, not every tick."""
        if job.wait_reason == why:
            return
        with transaction.atomic():
            if MigrationJob.objects.filter(pk=job.pk, state=JobState.PENDING).update(wait_reason=scrub(why)[:255]):
                record_job_event(job, "job.queued", message=f"waiting: {why}")
        job.wait_reason = why


def _values(item: DiskProgress, disk: JobDisk | None) -> tuple[int, int, int, str, str, int] | None:
    if disk is None:
        return None
    return (
        int(item["bytes_done"]),
        int(item["bytes_total"] or disk.bytes_total),
        int(item["throughput_bps"]),
        str(item.get("change_id", "")),
        str(item.get("checkpoint") or disk.checkpoint),
        int(item.get("checkpoint_bytes") or disk.checkpoint_bytes),
    )


def write_progress(job: MigrationJob, disks: dict[int, JobDisk], reported: list[DiskProgress]) -> None:
    """One job's per-disk progress (one statement for all its disks), one throughput sample for its
    sparkline and a live update. Call it inside a transaction, with the job as read in it or this tick
    (its sparkline is extended from there: only the follower writes it while the copy runs); the caller
    batches jobs."""
    changed = []
    for item in reported:
        values = _values(item, disks.get(item["unit_number"]))
        if values is None:
            continue
        disk = disks[item["unit_number"]]
        for name, value in zip(PROGRESS_FIELDS, values, strict=True):  # _values gives them in this order
            setattr(disk, name, value)
        disk.checkpoint = disk.checkpoint[:255]
        changed.append(disk)
    JobDisk.objects.bulk_update(changed, PROGRESS_FIELDS)
    rate = sum(int(item.get("throughput_bps") or 0) for item in reported)
    job.throughput_samples = [*(job.throughput_samples or []), rate][-SPARKLINE_SAMPLES:]
    MigrationJob.objects.filter(pk=job.pk).update(throughput_samples=job.throughput_samples)
    announce(PROGRESS, job.pk)


PROGRESS_FIELDS = ["bytes_done", "bytes_total", "throughput_bps", "new_change_id", "checkpoint", "checkpoint_bytes"]


def record_progress(job: MigrationJob, reported: list[DiskProgress]) -> None:
    """One job's progress in its own transaction (what the follower batches for many jobs)."""
    with transaction.atomic():
        job.refresh_from_db(fields=["throughput_samples"])
        disks = {d.source_disk.unit_number: d for d in job.disks.select_related("source_disk")}
        write_progress(job, disks, reported)


def detach_volume(volume_pk: int) -> str:
    """Detach an idle volume to free its slot (its export stays: it points at the stable by-id device,
    so the VM's next sync reuses it once the volume is attached again)."""
    volume = DestinationVolume.objects.filter(pk=volume_pk).select_related("source_disk__vm").first()
    if volume is None or volume.state != DestinationVolume.State.DETACHING:
        return "not detaching"
    if MigrationJob.objects.filter(vm=volume.source_disk.vm, state__in=ACTIVE_STATES).exists():
        # Its VM asked for a sync since it was chosen: keep it attached (the sync needs it).
        DestinationVolume.objects.filter(pk=volume.pk).update(state=DestinationVolume.State.ATTACHED)
        return "kept: its VM is syncing"
    try:
        get_volume_backend().detach_volume(volume.volume_id)
    except VolumeError as exc:
        log.warning("detaching %s failed: %s", volume, exc)
        return f"failed: {exc}"
    release(volume, detached=True)
    return "detached"
