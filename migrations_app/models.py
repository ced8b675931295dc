"""Source VMs as the VMA reports them, migration jobs, their disks, and the step/event log.

The job state machine lives here, in one place: ``MigrationJob.transition_to`` is the only way a
job's state changes, and an illegal transition raises ``IllegalTransition``.
"""

from __future__ import annotations

import secrets
from datetime import datetime

from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from exports.models import VMExportMapping
from omaportal.scrub import scrub


class MigrationGroup(models.Model):
    """Warm migration (the original system's machine groups): a named set of VMs that get an incremental
    sync every ``sync_interval_minutes``, at most ``max_concurrent`` of them at a time, until failover."""

    name = models.CharField(max_length=100, unique=True)
    sync_interval_minutes = models.PositiveIntegerField(
        default=60, validators=[MinValueValidator(1)], help_text="minutes from one sync's end to the next's start"
    )
    max_concurrent = models.PositiveSmallIntegerField(
        default=5, validators=[MinValueValidator(1)], help_text="syncs of this group running at once, at most"
    )
    enabled = models.BooleanField(default=True, help_text="off: no scheduled syncs (manual ones still work)")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "migration group"

    def __str__(self) -> str:
        return self.name


class SourceVM(models.Model):
    """A VMware VM as the VMA agent's inventory reports it."""

    vm_id = models.CharField(max_length=36, unique=True, help_text="VMware instance UUID, lower case")
    name = models.CharField(max_length=255)
    path = models.CharField(max_length=1024, blank=True, help_text="inventory path in vCenter")
    power_state = models.CharField(max_length=32, blank=True)
    guest_os = models.CharField(max_length=128, blank=True)
    # What failover builds the destination VM from (as the VMA reports it).
    cpus = models.PositiveSmallIntegerField(null=True, blank=True)
    memory_mib = models.PositiveIntegerField(null=True, blank=True)
    firmware = models.CharField(max_length=8, blank=True, help_text="bios or efi")
    disk_controller = models.CharField(max_length=32, blank=True)
    nics = models.JSONField(default=list, blank=True, help_text='[{"network", "mac", "adapter"}, ...]')
    last_seen_at = models.DateTimeField(null=True, blank=True)
    # Set by a live failover that finished: the CloudStack VM that runs it now.
    destination_vm_id = models.CharField(max_length=64, blank=True)
    migrated_at = models.DateTimeField(null=True, blank=True)
    group = models.ForeignKey(MigrationGroup, null=True, blank=True, on_delete=models.SET_NULL, related_name="vms")

    class Meta:
        ordering = ["name"]
        verbose_name = "source VM"

    def __str__(self) -> str:
        return self.name


class SourceDisk(models.Model):
    vm = models.ForeignKey(SourceVM, on_delete=models.CASCADE, related_name="disks")
    unit_number = models.PositiveSmallIntegerField()
    key = models.IntegerField(help_text="VMware device key")
    label = models.CharField(max_length=255, blank=True)
    path = models.CharField(max_length=1024, blank=True, help_text="datastore path of the disk file")
    capacity_bytes = models.BigIntegerField()

    class Meta:
        ordering = ["vm", "unit_number"]
        constraints = [models.UniqueConstraint(fields=["vm", "unit_number"], name="one_source_disk_per_unit")]

    def __str__(self) -> str:
        return f"{self.vm.name} disk {self.unit_number}"


class OmaNode(models.Model):
    """One OMA: a CloudStack VM that attaches destination volumes and serves them through its NBD server.
    A KVM guest takes about 25 data disks, so its attach slots are a reserved resource. Every row that
    lives on an OMA names its node."""

    name = models.CharField(max_length=64, unique=True, help_text="OMA_NODE_NAME")
    attach_slots = models.PositiveSmallIntegerField(default=25)
    # What the node says of itself each time its services start (registration): where the VMAs reach
    # its NBD server, and its own CloudStack VM (the one its volumes are attached to).
    nbd_address = models.CharField(max_length=255, blank=True, help_text="host:port the VMAs copy to")
    oma_vm_id = models.CharField(max_length=64, blank=True, help_text="this OMA's CloudStack VM id")
    # The progress follower that holds this node's lease (one per node), and its last beat: the node's
    # heartbeat (a node whose follower stopped beating is down).
    follower = models.CharField(max_length=64, blank=True)
    follower_beat_at = models.DateTimeField(null=True, blank=True)
    # Set by another node's follower when this one stopped beating (recorded once), cleared when it
    # beats again.
    down_since = models.DateTimeField(null=True, blank=True)
    # Drained: copies running on it finish, nothing new is placed on it.
    drained_at = models.DateTimeField(null=True, blank=True)
    drained_by = models.CharField(max_length=150, blank=True)
    drain_reason = models.CharField(max_length=200, blank=True)
    # Retired: a lost node an admin took out of the fleet once nothing was left on it (retire_node); its
    # finished jobs keep naming it. It registers again, and is back, when its services start.
    retired_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "OMA node"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def drained(self) -> bool:
        return self.drained_at is not None

    def is_up(self, stale_before: datetime) -> bool:
        """Its follower beat since ``stale_before`` (the workflow's stale threshold ago)."""
        return self.follower_beat_at is not None and self.follower_beat_at >= stale_before


class NodeEvent(models.Model):
    """What happened to a node and who did it: drained, undrained, registered with a new address."""

    node = models.ForeignKey(OmaNode, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=32)
    actor = models.CharField(max_length=150, blank=True)
    message = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-pk"]

    def __str__(self) -> str:
        return f"{self.node}: {self.kind}"


class DestinationVolume(models.Model):
    """A VM disk's destination volume, kept across its syncs. While it holds an attach slot on a node
    (reserved, attached or detaching) ``node`` names that node; idle attached volumes are detached,
    least recently used first, when a node runs short of slots, and attached again for the next sync."""

    class State(models.TextChoices):
        NEW = "new", "Not created yet"
        DETACHED = "detached", "Detached (kept)"
        RESERVED = "reserved", "Slot reserved"
        ATTACHED = "attached", "Attached"
        DETACHING = "detaching", "Detaching"
        IN_VM = "in_vm", "On the destination VM"

    SLOT_STATES = (State.RESERVED, State.ATTACHED, State.DETACHING)

    source_disk = models.OneToOneField(SourceDisk, on_delete=models.PROTECT, related_name="volume")
    volume_id = models.CharField(max_length=64, blank=True, help_text="the volume backend's id")
    device_path = models.CharField(max_length=255, blank=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.NEW)
    node = models.ForeignKey(OmaNode, null=True, blank=True, on_delete=models.PROTECT, related_name="volumes")
    # When a sync last finished on it: the least recently used idle volume is detached first.
    last_used_at = models.DateTimeField(null=True, blank=True)
    attaches = models.PositiveIntegerField(default=0)
    detaches = models.PositiveIntegerField(default=0)
    # A destination VM ran on it and was rolled back: its writes are unknown to the source's changed-block
    # tracking, so the next sync copies the whole disk again.
    full_copy_next = models.BooleanField(default=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["source_disk"]
        indexes = [models.Index(fields=["node", "state", "last_used_at"])]
        constraints = [
            # A slot is held exactly while the volume is reserved, attached or detaching.
            models.CheckConstraint(
                condition=Q(node__isnull=True, state__in=["new", "detached", "in_vm"])
                | Q(node__isnull=False, state__in=["reserved", "attached", "detaching"]),
                name="slot_held_while_on_a_node",
            )
        ]

    def __str__(self) -> str:
        return f"{self.source_disk} volume {self.volume_id or '(none)'} ({self.state})"


class NetworkMapping(models.Model):
    """A source network (VMware port group) and the CloudStack network its NICs join after failover."""

    source_network = models.CharField(max_length=255, unique=True, help_text="the port group name the VMA reports")
    network_id = models.CharField(max_length=64, help_text="CloudStack network id for live failovers")
    test_network_id = models.CharField(
        max_length=64, blank=True, help_text="isolated network for test failovers (blank: OMA_FAILOVER TEST_NETWORK_ID)"
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["source_network"]

    def __str__(self) -> str:
        return f"{self.source_network} -> {self.network_id}"


class OfferingMapping(models.Model):
    """A CloudStack service offering a VM may get: the smallest that fits its CPUs and memory is chosen;
    one without sizes is a custom offering, sized to the source VM."""

    name = models.CharField(max_length=100, unique=True)
    offering_id = models.CharField(max_length=64, help_text="CloudStack service offering id")
    cpus = models.PositiveSmallIntegerField(null=True, blank=True, help_text="blank: custom (sized per VM)")
    memory_mib = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["cpus", "memory_mib", "name"]

    def __str__(self) -> str:
        return self.name

    @property
    def custom(self) -> bool:
        return self.cpus is None or self.memory_mib is None


class TemplateMapping(models.Model):
    """The placeholder template a destination VM is created from, by the source's firmware: its root is
    replaced by the migrated disk 0, but its boot type (BIOS or UEFI) is the VM's."""

    class Firmware(models.TextChoices):
        BIOS = "bios", "BIOS"
        EFI = "efi", "UEFI"

    firmware = models.CharField(max_length=8, choices=Firmware.choices, unique=True)
    template_id = models.CharField(max_length=64, help_text="CloudStack template id")

    class Meta:
        ordering = ["firmware"]

    def __str__(self) -> str:
        return f"{self.get_firmware_display()} -> {self.template_id}"


class FailoverPlan(models.Model):
    """One VM's overrides of the mappings."""

    vm = models.OneToOneField(SourceVM, on_delete=models.CASCADE, related_name="failover_plan")
    offering = models.ForeignKey(OfferingMapping, null=True, blank=True, on_delete=models.SET_NULL)
    template_id = models.CharField(max_length=64, blank=True)
    networks = models.JSONField(default=dict, blank=True, help_text='{"source network": "CloudStack network id"}')

    def __str__(self) -> str:
        return f"failover plan of {self.vm}"


class JobState(models.TextChoices):
    PENDING = "pending", "Pending"
    # Failover (docs/failover.md): before the final sync, and after it.
    VALIDATING = "validating", "Checking readiness"
    SHUTTING_DOWN = "shutting_down", "Shutting the source down"
    PROVISIONING = "provisioning", "Provisioning volumes"
    ATTACHING = "attaching", "Attaching volumes"
    EXPORTING = "exporting", "Exporting over NBD"
    REPLICATING = "replicating", "Replicating"
    VERIFYING = "verifying", "Verifying what was written"
    CREATING_VM = "creating_vm", "Creating the VM"
    MOVING_VOLUMES = "moving_volumes", "Moving the volumes to the VM"
    SNAPSHOTTING = "snapshotting", "Taking the rollback snapshot"
    STARTING_VM = "starting_vm", "Starting the VM"
    TESTING = "testing", "Test VM running"
    ROLLING_BACK = "rolling_back", "Putting everything back"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"
    CANCELLING = "cancelling", "Cancelling"
    CANCELLED = "cancelled", "Cancelled"
    ROLLED_BACK = "rolled_back", "Rolled back"


class JobKind(models.TextChoices):
    SYNC = "sync", "Sync"
    LIVE_FAILOVER = "live_failover", "Live failover"
    TEST_FAILOVER = "test_failover", "Test failover"


# A sync's steps, in order; a sync job's current_step is one of these.
STEPS = [JobState.PROVISIONING, JobState.ATTACHING, JobState.EXPORTING, JobState.REPLICATING, JobState.VERIFYING]
# The steps a worker runs to get a copy going; the copy is the follower's; a worker verifies it after.
STEPS_TO_COPY = STEPS[: STEPS.index(JobState.REPLICATING) + 1]
# Each kind's steps, in order. A live failover's final sync is a sync's steps inside it.
SEQUENCES: dict[str, list[JobState]] = {
    JobKind.SYNC: STEPS,
    JobKind.LIVE_FAILOVER: [
        JobState.VALIDATING,
        JobState.SHUTTING_DOWN,
        *STEPS,
        JobState.CREATING_VM,
        JobState.MOVING_VOLUMES,
        JobState.STARTING_VM,
    ],
    JobKind.TEST_FAILOVER: [
        JobState.VALIDATING,
        JobState.CREATING_VM,
        JobState.MOVING_VOLUMES,
        JobState.SNAPSHOTTING,
        JobState.STARTING_VM,
    ],
}
FAILOVER_STEPS = [
    JobState.VALIDATING,
    JobState.SHUTTING_DOWN,
    JobState.CREATING_VM,
    JobState.MOVING_VOLUMES,
    JobState.SNAPSHOTTING,
    JobState.STARTING_VM,
    JobState.ROLLING_BACK,
]
# Every state in which a worker runs a step (and a silent worker is replaced).
WORKER_STEPS = [*STEPS, *FAILOVER_STEPS]
ACTIVE_STATES = {JobState.PENDING, JobState.CANCELLING, JobState.TESTING, *WORKER_STEPS}
FINAL_STATES = {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.ROLLED_BACK}
# A job whose node was lost in one of these goes back to pending, its step kept, for a live node to take
# (``transition_to(..., node_lost=True)``; migrations_app/follower.py, take_over): nothing of it is on a
# destination VM yet. Not a transition anyone may ask for: the job runs.
MOVABLE_STATES = {JobState.VALIDATING, JobState.SHUTTING_DOWN, *STEPS}
# A failover step that failed puts everything back (a failed readiness check changed nothing).
ROLLBACK_ON_FAILURE = set(WORKER_STEPS) - {JobState.VALIDATING, JobState.ROLLING_BACK}

_TO_FAILURE: set[str] = {JobState.FAILED, JobState.CANCELLING, JobState.ROLLING_BACK}
TRANSITIONS: dict[str, set[str]] = {
    JobState.PENDING: {s for s in WORKER_STEPS if s != JobState.ROLLING_BACK} | {JobState.CANCELLED, JobState.FAILED},
    JobState.VALIDATING: {JobState.SHUTTING_DOWN, JobState.CREATING_VM, JobState.FAILED, JobState.CANCELLING},
    JobState.SHUTTING_DOWN: {JobState.PROVISIONING, *_TO_FAILURE},
    JobState.PROVISIONING: {JobState.ATTACHING, *_TO_FAILURE},
    JobState.ATTACHING: {JobState.EXPORTING, *_TO_FAILURE},
    JobState.EXPORTING: {JobState.REPLICATING, *_TO_FAILURE},
    JobState.REPLICATING: {JobState.VERIFYING, JobState.COMPLETED, *_TO_FAILURE},
    JobState.VERIFYING: {JobState.COMPLETED, JobState.CREATING_VM, *_TO_FAILURE},
    JobState.CREATING_VM: {JobState.MOVING_VOLUMES, *_TO_FAILURE},
    JobState.MOVING_VOLUMES: {JobState.SNAPSHOTTING, JobState.STARTING_VM, *_TO_FAILURE},
    JobState.SNAPSHOTTING: {JobState.STARTING_VM, *_TO_FAILURE},
    JobState.STARTING_VM: {JobState.COMPLETED, JobState.TESTING, *_TO_FAILURE},
    # A test VM runs until the test ends (by the operator or its time): then everything goes back.
    JobState.TESTING: {JobState.ROLLING_BACK},
    JobState.ROLLING_BACK: {JobState.ROLLED_BACK, JobState.COMPLETED, JobState.FAILED},
    JobState.CANCELLING: {JobState.CANCELLED, JobState.FAILED, JobState.ROLLING_BACK},
    # Retry: back to pending, keeping current_step so the job resumes where it stopped. A failover that
    # failed, was cancelled or finished can be rolled back by the operator.
    JobState.FAILED: {JobState.PENDING, JobState.ROLLING_BACK},
    JobState.CANCELLED: {JobState.PENDING, JobState.ROLLING_BACK},
    JobState.COMPLETED: {JobState.ROLLING_BACK},
    JobState.ROLLED_BACK: set(),
}


class IllegalTransition(Exception):
    def __init__(self, job: MigrationJob, to: str) -> None:
        super().__init__(f"{job.job_id}: cannot go from {job.state} to {to}")
        self.job_id = job.job_id
        self.from_state = job.state
        self.to_state = to


def new_job_id() -> str:
    """A readable, sortable job id such as job-20250812-080802-ab12cd (six hex digits: a burst of jobs in
    one second does not collide)."""
    return f"job-{timezone.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


class MigrationJob(models.Model):
    job_id = models.CharField(max_length=40, unique=True, default=new_job_id, editable=False)
    vm = models.ForeignKey(SourceVM, on_delete=models.PROTECT, related_name="jobs")
    kind = models.CharField(max_length=16, choices=JobKind.choices, default=JobKind.SYNC)
    state = models.CharField(max_length=16, choices=JobState.choices, default=JobState.PENDING, db_index=True)
    current_step = models.CharField(max_length=16, choices=JobState.choices, blank=True)
    requested_by = models.CharField(max_length=150, default="system")
    attempt = models.PositiveIntegerField(default=1)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # Which worker runs the job now: a worker that finds another runner here stops (recovery took over).
    runner = models.CharField(max_length=64, blank=True)
    cleanup_requested = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    # The VMA's replication of this attempt: the progress follower polls it (no worker waits on a copy).
    replication_id = models.CharField(max_length=64, blank=True)
    # The node whose slots, NBD server and follower serve this job.
    node = models.ForeignKey(OmaNode, null=True, blank=True, on_delete=models.PROTECT, related_name="jobs")
    # Why a pending job waits (attach slots, the active-job limit), for the operator.
    wait_reason = models.CharField(max_length=255, blank=True)
    # A worker task is queued for the job: the dispatcher never queues a second one.
    queued_at = models.DateTimeField(null=True, blank=True)
    # Unexpected errors of the current step in a row; it is tried again at retry_at, a few times at most.
    step_errors = models.PositiveSmallIntegerField(default=0)
    retry_at = models.DateTimeField(null=True, blank=True)
    # A copy interrupted by an outage (VMA, network, NBD server): since when, and how often it was resumed.
    outage_since = models.DateTimeField(null=True, blank=True)
    resumes = models.PositiveSmallIntegerField(default=0)
    # Recent total throughput samples (bytes/s), newest last: the dashboard's sparkline.
    throughput_samples = models.JSONField(default=list, blank=True)
    # An incremental sync: when the sync it builds on finished (what "Incremental since ..." shows).
    since_sync_at = models.DateTimeField(null=True, blank=True)
    # Failover: what it asked for and what it made, so every step (and a rollback) can be done again.
    allow_power_off = models.BooleanField(default=False, help_text="power the source off if a guest shutdown fails")
    source_was_on = models.BooleanField(null=True, blank=True, help_text="the source's power before the failover")
    destination_vm_id = models.CharField(max_length=64, blank=True)
    snapshot_id = models.CharField(max_length=64, blank=True)
    test_ends_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["vm", "-created_at"]),
            # The follower's every tick asks for a node's jobs in a few active states: without this the
            # node's whole finished history (all its jobs share the node) was read through the node index.
            models.Index(fields=["node", "state"], name="job_node_state"),
        ]
        constraints = [
            # Never two jobs copying into one VM's volumes: start, retry, schedules and failover all
            # go through this.
            models.UniqueConstraint(
                fields=["vm"],
                condition=Q(state__in=sorted(ACTIVE_STATES)),
                name="one_active_job_per_vm",
            )
        ]
        permissions = [("operate_migrations", "Can start, cancel and retry migrations")]

    def __str__(self) -> str:
        return self.job_id

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_STATES

    def can_transition_to(self, to: str) -> bool:
        return to in TRANSITIONS[self.state]

    @property
    def cancel_target(self) -> str:
        """Where a cancel takes the job: a pending job is cancelled at once, a running one is cancelling
        until its worker has stopped the copy."""
        return JobState.CANCELLED if self.state == JobState.PENDING else JobState.CANCELLING

    @property
    def can_cancel(self) -> bool:
        return self.can_transition_to(self.cancel_target)

    @property
    def can_retry(self) -> bool:
        return self.can_transition_to(JobState.PENDING) and self.current_step != JobState.ROLLING_BACK

    @property
    def retry_plan(self) -> str:
        """What Retry will do, in a sentence (its button asks with it)."""
        if self.cleanup_requested:
            return "Retry provisions the removed volumes again and copies those disks in full."
        if self.current_step == JobState.VERIFYING:
            return "Retry copies every disk again: what this attempt wrote did not check out."
        if self.current_step == JobState.REPLICATING:
            return "Retry resumes the copy from what the VMA confirmed written; nothing copied is lost."
        step = JobState(self.current_step).label.lower() if self.current_step else "the start"
        return f"Retry resumes at {step}; what was copied is kept."

    @property
    def cancel_plan(self) -> str:
        if self.kind != JobKind.SYNC and self.current_step not in ("", JobState.VALIDATING):
            return "Cancel puts everything back: the VM goes, the volumes return to the OMA, the source runs again."
        if self.state == JobState.PENDING:
            return "Cancel takes the job out of the queue; nothing was copied yet."
        return "Cancel stops the copy at the VMA; volumes and exports are kept for a retry."

    @property
    def is_failover(self) -> bool:
        return self.kind != JobKind.SYNC

    @property
    def can_roll_back(self) -> bool:
        """A failover that ended (failed, cancelled, a live one completed, or a rollback that failed) can
        be put back; a running test ends through ``can_end_test``."""
        return self.is_failover and self.can_transition_to(JobState.ROLLING_BACK) and self.state != JobState.TESTING

    @property
    def can_end_test(self) -> bool:
        return self.state == JobState.TESTING

    @property
    def worker_silent_for(self) -> int | None:
        """Seconds since the worker running this job's step last beat, once past the stale threshold
        (another worker is about to take the step over); None while all is well."""
        from .conf import workflow_conf

        followed = self.state == JobState.REPLICATING and bool(self.replication_id)
        if self.state not in WORKER_STEPS or followed or not self.runner or self.heartbeat_at is None:
            return None
        silent = (timezone.now() - self.heartbeat_at).total_seconds()
        return int(silent) if silent > workflow_conf().heartbeat_stale_seconds else None

    def transition_to(self, to: str, *, error: str = "", node_lost: bool = False) -> None:
        """Move to state ``to`` (not saved). Raises IllegalTransition for anything the machine forbids.
        ``node_lost``: the job's node is gone, and the job goes back to pending for another one."""
        moved = node_lost and to == JobState.PENDING and self.state in MOVABLE_STATES
        if not moved and not self.can_transition_to(to):
            raise IllegalTransition(self, to)
        now = timezone.now()
        if to in WORKER_STEPS:
            self.current_step = to
            self.started_at = self.started_at or now
        if to == JobState.PENDING:
            # A new attempt: its own start time and sparkline (the last one's are in its event log).
            self.attempt += 1
            self.error = ""
            self.finished_at = None
            self.started_at = None
            self.throughput_samples = []
        if to in FINAL_STATES:
            self.finished_at = now
        if to == JobState.FAILED:
            self.error = scrub(error or self.error or "failed")
        elif to == JobState.ROLLING_BACK:
            self.error = scrub(error or self.error)
            self.finished_at = None
        self.state = to
        self.heartbeat_at = now


class JobDisk(models.Model):
    job = models.ForeignKey(MigrationJob, on_delete=models.CASCADE, related_name="disks")
    source_disk = models.ForeignKey(SourceDisk, on_delete=models.PROTECT, related_name="job_disks")
    volume_id = models.CharField(max_length=64, blank=True)
    device_path = models.CharField(max_length=255, blank=True)
    mapping = models.ForeignKey(VMExportMapping, null=True, blank=True, on_delete=models.SET_NULL)
    bytes_done = models.BigIntegerField(default=0)
    bytes_total = models.BigIntegerField(default=0)
    throughput_bps = models.BigIntegerField(default=0)
    previous_change_id = models.CharField(max_length=255, blank=True)
    new_change_id = models.CharField(max_length=255, blank=True)
    # What the VMA says it wrote in this sync: {"algorithm", "ranges": [[offset, length], ...], "value"}.
    digest = models.JSONField(default=dict, blank=True)
    verified_at = models.DateTimeField(null=True, blank=True)
    # What the VMA confirmed written so far in this sync: a resumed copy continues from there.
    checkpoint = models.CharField(max_length=255, blank=True)
    checkpoint_bytes = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["job", "source_disk__unit_number"]
        constraints = [models.UniqueConstraint(fields=["job", "source_disk"], name="one_job_disk_per_source_disk")]

    def __str__(self) -> str:
        return f"{self.job.job_id} disk {self.source_disk.unit_number}"


class JobEvent(models.Model):
    """Step log: every step start/finish/failure and every operator action, with timings."""

    job = models.ForeignKey(MigrationJob, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=48)
    step = models.CharField(max_length=16, blank=True)
    message = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    actor = models.CharField(max_length=150, default="system")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.job_id} {self.kind}"
