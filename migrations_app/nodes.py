"""OMA nodes as the operator sees them: each node's slots, copies, NBD server and heartbeat, and draining
(copies running on a node finish; nothing new is placed on it until it is undrained).

A node registers itself when its follower starts (``slots.this_node``) and beats through its follower's
lease; a node whose follower has not beaten for the stale period is shown as down.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from django.db import transaction
from django.db.models import Count, Q
from django.utils import timezone

from exports.models import NbdServerState

from .models import ACTIVE_STATES, WORKER_STEPS, DestinationVolume, JobState, MigrationJob, NodeEvent, OmaNode
from .slots import used_slots_by_node
from .workflow import stale_before

DRAIN_REASON_MAX = 200

log = logging.getLogger(__name__)


class NodeError(Exception):
    """A node request that cannot be taken; nothing was changed."""


@dataclass(frozen=True)
class NodeRow:
    node: OmaNode
    state: str  # "up", "down" or "drained" (a drained node that stopped beating is "down")
    slots_used: int
    active_jobs: int
    copies: int  # jobs whose copy runs at a VMA into this node
    nbd_health: str
    beat_at: datetime | None

    @property
    def slots_free(self) -> int:
        return max(0, self.node.attach_slots - self.slots_used)

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.node.name,
            "state": self.state,
            "drained_at": self.node.drained_at.isoformat() if self.node.drained_at else None,
            "drained_by": self.node.drained_by,
            "drain_reason": self.node.drain_reason,
            "attach_slots": self.node.attach_slots,
            "slots_used": self.slots_used,
            "slots_free": self.slots_free,
            "active_jobs": self.active_jobs,
            "copies": self.copies,
            "nbd_health": self.nbd_health,
            "nbd_address": self.node.nbd_address,
            "oma_vm_id": self.node.oma_vm_id,
            "heartbeat_at": self.beat_at.isoformat() if self.beat_at else None,
        }


def node_rows() -> list[NodeRow]:
    """Every node (but the retired) with its figures, in a fixed number of queries."""
    nodes = list(OmaNode.objects.filter(retired_at__isnull=True).order_by("name"))
    slots = used_slots_by_node()
    jobs: dict[int, tuple[int, int]] = {
        row["node"]: (row["active"], row["copies"])
        for row in MigrationJob.objects.filter(node__isnull=False, state__in=[*WORKER_STEPS, JobState.CANCELLING])
        .values("node")
        .annotate(active=Count("pk"), copies=Count("pk", filter=Q(state=JobState.REPLICATING)))
    }
    health = dict(NbdServerState.objects.values_list("node", "health"))
    stale = stale_before()
    rows = []
    for node in nodes:
        up = node.is_up(stale)
        state = "down" if not up else "drained" if node.drained else "up"
        active, copies = jobs.get(node.pk, (0, 0))
        rows.append(
            NodeRow(
                node=node,
                state=state,
                slots_used=slots.get(node.pk, 0),
                active_jobs=active,
                copies=copies,
                nbd_health=health.get(node.name, "unknown"),
                beat_at=node.follower_beat_at,
            )
        )
    return rows


def _node(name: str) -> OmaNode:
    node = OmaNode.objects.select_for_update().filter(name=name).first()
    if node is None:
        known = ", ".join(OmaNode.objects.order_by("name").values_list("name", flat=True)) or "none yet"
        raise NodeError(f"no OMA node named {name!r} (known: {known})")
    return node


def drain(name: str, actor: str, reason: str = "") -> tuple[OmaNode, bool]:
    """Stop placing new work on the node; returns the node and whether this call drained it (False:
    it was drained already, and its reason is kept)."""
    if any(not char.isprintable() and not char.isspace() for char in reason):
        raise NodeError("the reason holds control characters; write it as plain text")
    reason = " ".join(reason.split())
    if len(reason) > DRAIN_REASON_MAX:
        raise NodeError(f"the reason is {len(reason)} characters long; at most {DRAIN_REASON_MAX}")
    with transaction.atomic():
        node = _node(name)
        if node.drained:
            return node, False
        node.drained_at, node.drained_by, node.drain_reason = timezone.now(), actor, reason
        node.save(update_fields=["drained_at", "drained_by", "drain_reason"])
        NodeEvent.objects.create(node=node, kind="node.drained", actor=actor, message=reason or "no reason given")
    return node, True


def undrain(name: str, actor: str) -> tuple[OmaNode, bool]:
    """Let the node take new work again; returns the node and whether this call changed it."""
    with transaction.atomic():
        node = _node(name)
        if not node.drained:
            return node, False
        node.drained_at, node.drained_by, node.drain_reason = None, "", ""
        node.save(update_fields=["drained_at", "drained_by", "drain_reason"])
        NodeEvent.objects.create(node=node, kind="node.undrained", actor=actor)
    return node, True


def retire(name: str, actor: str) -> OmaNode:
    """Take a lost node out of the fleet (an OMA decommissioned, or gone for good): the nodes page, the
    node list and the metrics stop showing it as down. Only a node that is down and holds nothing (no
    active job, no volume) can be retired: the live nodes take a lost node's work over first. Its
    finished jobs keep naming it; if its services start again it registers and is back."""
    with transaction.atomic():
        node = _node(name)
        if node.retired_at is not None:
            raise NodeError(f"{node.name} is retired already")
        if node.down_since is None:
            raise NodeError(
                f"{node.name} is not down: only a node whose services stopped (and that a live node marked "
                "down) can be retired; stop them first, or drain it to stop new work"
            )
        jobs = list(
            MigrationJob.objects.filter(node=node, state__in=sorted(ACTIVE_STATES)).values_list("job_id", flat=True)
        )
        if jobs:
            raise NodeError(
                f"{node.name} still holds {len(jobs)} active job(s) ({', '.join(jobs[:5])}): a live node takes "
                "them over, or cancel them; then retire it"
            )
        volumes = DestinationVolume.objects.filter(node=node).count()
        if volumes:
            raise NodeError(f"{node.name} still holds {volumes} volume(s); a live node detaches them first")
        node.retired_at = timezone.now()
        node.save(update_fields=["retired_at"])
        NodeEvent.objects.create(node=node, kind="node.retired", actor=actor, message="taken out of the fleet")
    return node


def drained_wait_reason(node: OmaNode) -> str:
    why = f": {node.drain_reason}" if node.drain_reason else ""
    return f"node {node.name} is drained{why}; nothing new starts on it until it is undrained"


def mark_lost_nodes(me: OmaNode) -> list[str]:
    """Seen from a live node: every other node whose follower stopped beating is marked down (once, as
    a node event), and the jobs that wait there without holding any of its slots are let go, so the
    live nodes place them. Returns the names marked down now. The rest of its work (copies, volumes)
    is taken over by the live nodes' followers (``Follower.take_over``)."""
    lost = []
    stale = stale_before()
    candidates = OmaNode.objects.exclude(pk=me.pk).filter(down_since__isnull=True, follower_beat_at__lt=stale)
    for node in candidates:
        with transaction.atomic():
            if not OmaNode.objects.filter(pk=node.pk, down_since__isnull=True, follower_beat_at__lt=stale).update(
                down_since=timezone.now()
            ):
                continue  # another live node marked it first, or it beat again
            held_vms = DestinationVolume.objects.filter(node=node).values("source_disk__vm_id")
            let_go = list(
                MigrationJob.objects.filter(node=node, state=JobState.PENDING)
                .exclude(vm_id__in=held_vms)
                .values_list("job_id", flat=True)
            )
            MigrationJob.objects.filter(job_id__in=let_go).update(node=None, wait_reason="")
            message = f"no heartbeat since {node.follower_beat_at:%Y-%m-%d %H:%M:%S} UTC"
            if let_go:
                message += f"; {len(let_go)} waiting job(s) let go to the live nodes: {', '.join(let_go)}"
            NodeEvent.objects.create(node=node, kind="node.down", actor=me.name, message=message)
        lost.append(node.name)
    return lost


def mark_back(node: OmaNode) -> bool:
    """This node beats again after another marked it down. Before it takes work again it reconciles its
    exports with the database (its own rows only): links are republished, leftovers reported. Returns
    False, leaving it marked down (so it places nothing), while that fails; recorded once when done."""
    from exports.helper_client import HelperFailed
    from exports.reconcile import reconcile_exports

    try:
        report = reconcile_exports(fix=True, actor=f"node {node.name}")
    except HelperFailed as exc:
        log.warning("node %s is back but cannot reconcile its exports yet: %s", node.name, exc)
        return False
    message = "its follower beats again; exports reconciled"
    if report.fixed:
        message += f", {len(report.fixed)} repaired: {', '.join(report.fixed[:10])}"
    if report.unfixed:
        message += f"; {len(report.unfixed)} left for a person: {', '.join(report.unfixed[:10])}"
    with transaction.atomic():
        if not OmaNode.objects.filter(pk=node.pk, down_since__isnull=False).update(down_since=None):
            return False
        NodeEvent.objects.create(node=node, kind="node.up", message=message[:500])
    node.down_since = None
    return True
