"""Attach slots: a node's reserved resource (a KVM guest takes about 25 data disks).

A volume holds a slot on a node while it is reserved, attached or detaching (``DestinationVolume.node``).
Slots are reserved for all of a VM's disks at once, under the node row's lock, so two dispatchers never
overfill a node; they are released when the volume leaves the node (eviction, cleanup, failover). When a
job needs more slots than are free, idle volumes (attached, their VM without an active job) are detached,
least recently used first, for all the jobs that wait for slots at once; the VM's next sync attaches them
again, and since its export points at the stable by-id device, the export is reused with no helper write
and no reload. A sync that waits for slots has its missing volumes created meanwhile, holding none
(``workflow.prepare_volumes``): the slots it gets are held from its attach on.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import transaction
from django.db.models import Count, F
from django.utils import timezone

from exports.conf import nbd_conf

from .conf import vma_conf, volume_conf, workflow_conf
from .models import ACTIVE_STATES, DestinationVolume, JobDisk, MigrationJob, NodeEvent, OmaNode

Volume = DestinationVolume
State = DestinationVolume.State


def this_node() -> OmaNode:
    """This OMA's node row (OMA_NODE_NAME), registered with what its own settings say: its slot count,
    where the VMAs reach its NBD server, and its CloudStack VM. A change is recorded on the node."""
    said = {
        "attach_slots": workflow_conf().attach_slots,
        "nbd_address": f"{vma_conf().nbd_host}:{vma_conf().nbd_port}",
        "oma_vm_id": volume_conf().cloudstack.oma_vm_id if volume_conf().backend == "cloudstack" else "",
    }
    node, created = OmaNode.objects.get_or_create(name=nbd_conf().node, defaults=said)
    changed = {key: value for key, value in said.items() if getattr(node, key) != value}
    if changed:
        OmaNode.objects.filter(pk=node.pk).update(**changed)
        for key, value in changed.items():
            setattr(node, key, value)
    if created or changed:
        message = ", ".join(f"{key.replace('_', ' ')} {value or '-'}" for key, value in said.items())
        NodeEvent.objects.create(node=node, kind="node.registered", message=message)
    if node.retired_at is not None and OmaNode.objects.filter(pk=node.pk, retired_at__isnull=False).update(
        retired_at=None
    ):
        node.retired_at = None
        NodeEvent.objects.create(node=node, kind="node.rejoined", message="its services started again")
    return node


def volumes_for(job: MigrationJob, disks: list[JobDisk] | None = None) -> list[DestinationVolume]:
    """The job's destination volumes, one per VM disk (made when first needed), in the order of its
    ``disks`` (read here if not given, by unit number)."""
    if disks is None:
        disks = list(JobDisk.objects.filter(job=job).select_related("source_disk").order_by("source_disk__unit_number"))
    made = {v.source_disk_id: v for v in DestinationVolume.objects.filter(source_disk__job_disks__job=job)}
    volumes = []
    for disk in disks:
        volume = made.get(disk.source_disk_id)
        if volume is None:
            volume, _ = DestinationVolume.objects.get_or_create(source_disk=disk.source_disk)
        volumes.append(volume)
    return volumes


@dataclass
class Reservation:
    """What reserving a job's slots did: reserved (all or none), or why not, and what to evict for it."""

    reserved: bool
    wait_reason: str = ""
    evict: list[DestinationVolume] | None = None


def used_slots(node: OmaNode) -> int:
    return DestinationVolume.objects.filter(node=node).count()


def used_slots_by_node(nodes: list[OmaNode] | None = None) -> dict[int, int]:
    """Slots held per node pk (a volume holds one while it names a node), in one query."""
    volumes = DestinationVolume.objects.filter(node__isnull=False)
    if nodes is not None:
        volumes = volumes.filter(node__in=nodes)
    return dict(volumes.values_list("node").annotate(n=Count("pk")).values_list("node", "n"))


class Placer:
    """One dispatch tick's slot bookkeeping on a node. Use it inside the transaction that locked the node
    row: it counts the node's used slots once, then hands them out in memory, oldest job first."""

    def __init__(self, node: OmaNode) -> None:
        self.node = node
        self.free = node.attach_slots - used_slots(node)
        self.detaching = DestinationVolume.objects.filter(node=node, state=State.DETACHING).count()
        self.blocked = False  # an older job waits for slots: younger ones may not take freed ones first
        self.wanted = 0  # new slots the jobs waiting for them need, oldest first, this tick
        self.first_wanted = 0  # new slots the oldest of them needs: what a freed slot must add up to
        self.idle: list[DestinationVolume] | None = None  # idle volumes not chosen yet, least recently used first
        self.active = MigrationJob.objects.filter(node=node, state__in=ACTIVE_STATES).count()
        self.others = other_nodes(node)

    def better_node(self, volumes: list[DestinationVolume]) -> OmaNode | None:
        """For a job no node holds yet: another node that should take it instead (more free slots, then
        fewer active jobs, then its name), or None. Its follower places it there under that node's own
        lock, so no node is ever overfilled; the job it is left for counts against that node's free slots
        for the rest of this tick."""
        needed = sum(1 for v in volumes if v.node_id is None)
        if not needed or len(volumes) != needed:
            return None  # some of its volumes are on a node already: that node takes it
        mine = (-self.free, self.active, self.node.name)
        best = min(
            (other for other in self.others if other.free >= needed and other.key < mine),
            key=lambda other: other.key,
            default=None,
        )
        if best is None:
            return None
        best.free -= needed
        best.active += 1
        return best.node

    def place(self, volumes: list[DestinationVolume]) -> Reservation:
        """Reserve a slot for every volume of one job that holds none: all or none. When slots are short,
        idle volumes are chosen (and marked detaching) to free them, and the job waits for them."""
        elsewhere = [v for v in volumes if v.node_id is not None and v.node_id != self.node.pk]
        if elsewhere:
            return Reservation(False, f"{len(elsewhere)} of its volumes are attached to another node")
        if any(v.state == State.DETACHING for v in volumes):
            return Reservation(False, "one of its volumes is being detached; it is attached again next")
        needed = [v for v in volumes if v.node_id is None]
        if not needed:
            return Reservation(True)
        if not self.blocked and len(needed) <= self.free:
            DestinationVolume.objects.filter(pk__in=[v.pk for v in needed]).update(
                node=self.node, state=State.RESERVED, updated_at=timezone.now()
            )
            for volume in needed:
                volume.node, volume.state = self.node, State.RESERVED
            self.free -= len(needed)
            return Reservation(True)
        # Idle volumes are detached for every waiting job, not only the oldest: the detaches run side by
        # side, and the slots they free still go to the oldest job first.
        behind = self.blocked
        self.blocked = True
        self.wanted += len(needed)
        self.first_wanted = self.first_wanted or len(needed)
        evict = self._choose_idle(self.wanted - max(self.free, 0) - self.detaching)
        if behind:
            return Reservation(False, "waits for attach slots behind an older job", evict)
        why = f"needs {len(needed)} attach slots; {max(self.free, 0)} of {self.node.attach_slots} free"
        if self.detaching:
            why += f", {self.detaching} idle volume(s) being detached"
        return Reservation(False, why, evict)

    def _choose_idle(self, count: int) -> list[DestinationVolume]:
        """Mark up to ``count`` idle volumes detaching, least recently used first."""
        if count <= 0:
            return []
        if self.idle is None:
            self.idle = idle_volumes(self.node)
        evict, self.idle = self.idle[:count], self.idle[count:]
        if evict:
            DestinationVolume.objects.filter(pk__in=[v.pk for v in evict]).update(
                state=State.DETACHING, updated_at=timezone.now()
            )
        self.detaching += len(evict)
        return evict


@dataclass
class OtherNode:
    node: OmaNode
    free: int
    active: int

    @property
    def key(self) -> tuple[int, int, str]:
        return (-self.free, self.active, self.node.name)


def other_nodes(node: OmaNode) -> list[OtherNode]:
    """The other nodes that take new work now (their follower beats, not drained), with their free slots
    and active jobs as of this moment (read without their locks: a node only ever reserves its own)."""
    from .workflow import stale_before

    nodes = list(
        OmaNode.objects.exclude(pk=node.pk).filter(drained_at__isnull=True, follower_beat_at__gte=stale_before())
    )
    if not nodes:
        return []
    used = used_slots_by_node(nodes)
    active = dict(
        MigrationJob.objects.filter(node__in=nodes, state__in=ACTIVE_STATES)
        .values_list("node")
        .annotate(n=Count("pk"))
        .values_list("node", "n")
    )
    return [OtherNode(n, n.attach_slots - used.get(n.pk, 0), active.get(n.pk, 0)) for n in nodes]


def idle_volumes(node: OmaNode) -> list[DestinationVolume]:
    """Attached volumes whose VM has no active job, least recently used first."""
    busy_vms = MigrationJob.objects.filter(state__in=ACTIVE_STATES).values("vm_id")
    return list(
        DestinationVolume.objects.filter(node=node, state=State.ATTACHED)
        .exclude(source_disk__vm_id__in=busy_vms)
        .order_by("last_used_at", "pk")
        .select_related("source_disk__vm")
    )


def mark_attached(attached: list[tuple[DestinationVolume, str]]) -> None:
    """Volumes attached to their node now, each as the device it shows as, counted in their attaches."""
    if not attached:
        return
    now = timezone.now()
    for volume, device in attached:
        volume.state, volume.device_path, volume.updated_at = State.ATTACHED, device, now
        volume.attaches += 1
    DestinationVolume.objects.bulk_update(
        [volume for volume, _ in attached], ["state", "device_path", "updated_at", "attaches"]
    )


@transaction.atomic
def release(volume: DestinationVolume, *, detached: bool = False) -> None:
    """The volume left its node (deleted, or ``detached``: counted in its detaches): its slot is free.
    One write: a follower detaching many volumes takes the write lock once for each."""
    DestinationVolume.objects.filter(pk=volume.pk).update(
        node=None,
        state=State.DETACHED if volume.volume_id else State.NEW,
        device_path="",
        updated_at=timezone.now(),
        **({"detaches": F("detaches") + 1} if detached else {}),
    )
