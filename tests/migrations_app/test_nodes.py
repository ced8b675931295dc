"""OMA nodes: registration, the nodes command and page, and draining (nothing new is placed on a drained
node; what runs there finishes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from devtools.vma_sim import Faults
from migrations_app import actions
from migrations_app.follower import Follower, hold_lease
from migrations_app.models import DestinationVolume, JobState, MigrationJob, NodeEvent, OmaNode
from migrations_app.slots import this_node
from tests.support.factories import UserFactory, client_as
from tests.support.flows import wire
from tests.support.nbd import RunningServer
from tests.support.vma import SimFactory

pytestmark = pytest.mark.django_db(transaction=True)


def nodes_json() -> list[dict[str, object]]:
    out = StringIO()
    call_command("nodes", "--json", stdout=out)
    return json.loads(out.getvalue())


def test_a_node_registers_what_its_settings_say_and_records_changes(settings: object) -> None:
    settings.OMA_VMA = {**settings.OMA_VMA, "NBD_HOST": "10.0.0.5", "NBD_PORT": 10809}  # type: ignore[attr-defined]
    node = this_node()
    assert node.nbd_address == "10.0.0.5:10809"
    this_node()  # the same settings again: nothing new to record
    assert list(NodeEvent.objects.values_list("kind", flat=True)) == ["node.registered"]
    settings.OMA_VMA = {**settings.OMA_VMA, "NBD_HOST": "10.0.0.6"}  # type: ignore[attr-defined]
    assert this_node().nbd_address == "10.0.0.6:10809"
    assert OmaNode.objects.get(pk=node.pk).nbd_address == "10.0.0.6:10809"
    assert NodeEvent.objects.filter(kind="node.registered").count() == 2
    assert "10.0.0.6:10809" in NodeEvent.objects.first().message  # type: ignore[union-attr]


def test_the_nodes_command_says_up_down_and_drained() -> None:
    node = this_node()
    assert nodes_json()[0]["state"] == "down", "no follower has beaten yet"
    assert hold_lease(node, "follower-a")
    (row,) = nodes_json()
    assert row["state"] == "up" and row["name"] == node.name and row["slots_free"] == node.attach_slots
    call_command("drain_node", node.name, "--reason", "kernel update", stdout=StringIO())
    (row,) = nodes_json()
    assert row["state"] == "drained" and row["drain_reason"] == "kernel update"
    OmaNode.objects.filter(pk=node.pk).update(follower_beat_at=timezone.now() - timedelta(hours=1))
    assert nodes_json()[0]["state"] == "down", "a drained node that stopped beating is down"
    out = StringIO()
    call_command("nodes", stdout=out)
    assert node.name in out.getvalue() and "kernel update" in out.getvalue()


def test_draining_is_refused_clearly_and_changes_nothing() -> None:
    node = this_node()
    with pytest.raises(CommandError, match=r"no OMA node named 'nope' \(known: "):
        call_command("drain_node", "nope", stdout=StringIO())
    with pytest.raises(CommandError, match="at most 200"):
        call_command("drain_node", node.name, "--reason", "x" * 201, stdout=StringIO())
    with pytest.raises(CommandError, match="control characters"):
        call_command("drain_node", node.name, "--reason", "reboot\x00\x1b[2J", stdout=StringIO())
    node.refresh_from_db()
    assert not node.drained and not NodeEvent.objects.exclude(kind="node.registered").exists()
    out = StringIO()
    call_command("drain_node", node.name, "--json", stdout=out)
    assert json.loads(out.getvalue()) == {"node": node.name, "drained": True, "changed": True}
    out = StringIO()
    call_command("drain_node", node.name, "--reason", "another", stdout=out)
    assert "drained already" in out.getvalue()
    node.refresh_from_db()
    assert node.drain_reason == "", "a second drain keeps the first one's reason"
    out = StringIO()
    call_command("undrain_node", node.name, stdout=out)
    call_command("undrain_node", node.name, stdout=out)
    assert "undrained" in out.getvalue() and "was not drained" in out.getvalue()
    kinds = list(NodeEvent.objects.exclude(kind="node.registered").values_list("kind", flat=True))
    assert kinds == ["node.undrained", "node.drained"]


def test_a_lost_node_is_retired_only_once_it_holds_nothing_and_comes_back_when_it_starts(
    settings: object, make_user: UserFactory
) -> None:
    from django.test import Client

    from tests.migrations_app.test_metrics import TOKEN, samples
    from tests.support.factories import make_jobs

    settings.OMA_METRICS_TOKEN = TOKEN  # type: ignore[attr-defined]
    lost = OmaNode.objects.create(name="oma-gone")
    with pytest.raises(CommandError, match="oma-gone is not down"):
        call_command("retire_node", "oma-gone", stdout=StringIO())
    OmaNode.objects.filter(pk=lost.pk).update(down_since=timezone.now())
    (job,) = make_jobs(1, state=JobState.REPLICATING)
    MigrationJob.objects.filter(pk=job.pk).update(node=lost)
    with pytest.raises(CommandError, match=rf"still holds 1 active job\(s\) \({job.job_id}\)"):
        call_command("retire_node", "oma-gone", stdout=StringIO())
    MigrationJob.objects.filter(pk=job.pk).update(state=JobState.COMPLETED)
    volume = DestinationVolume.objects.create(
        source_disk=job.vm.disks.order_by("unit_number")[0], node=lost, state=DestinationVolume.State.ATTACHED
    )
    with pytest.raises(CommandError, match="still holds 1 volume"):
        call_command("retire_node", "oma-gone", stdout=StringIO())
    assert not NodeEvent.objects.filter(node=lost).exists(), "each refusal changed nothing"
    volume.delete()
    out = StringIO()
    call_command("retire_node", "oma-gone", "--json", stdout=out)
    assert json.loads(out.getvalue()) == {"node": "oma-gone", "retired": True}
    with pytest.raises(CommandError, match="retired already"):
        call_command("retire_node", "oma-gone", stdout=StringIO())
    assert [row["name"] for row in nodes_json()] == []
    page = client_as(make_user("viewer")).get("/nodes/").content.decode()
    assert 'id="node-row-oma-gone"' not in page and "taken out of the fleet" in page  # its event stays
    metrics = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").content
    assert ("oma_node_up", (("node", "oma-gone"),)) not in samples(metrics), "no alert for a node that is gone"
    assert MigrationJob.objects.get(pk=job.pk).node == lost, "its finished jobs keep naming it"
    settings.OMA_NBD = {**settings.OMA_NBD, "NODE": "oma-gone"}  # type: ignore[attr-defined]
    assert this_node().retired_at is None  # its services start again: it registers and is back
    assert [row["name"] for row in nodes_json()] == ["oma-gone"]
    kinds = list(NodeEvent.objects.filter(node=lost).values_list("kind", flat=True))
    assert kinds[:2] == ["node.rejoined", "node.registered"] and "node.retired" in kinds


def test_a_drained_node_starts_nothing_new_until_undrained(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    sim = make_sim()
    wire(settings, nbdkit_server, sim)
    queued: list[int] = []
    follower = Follower(enqueue=lambda task, pk: queued.append(pk), detach=lambda pk: None)
    try:
        call_command("drain_node", follower.node.name, "--reason", "moving racks", stdout=StringIO())
        job = actions.start_migration(vm_id=sim.vm("web-01").id)
        follower.tick()
        job.refresh_from_db()
        assert queued == [] and job.state == JobState.PENDING
        assert "drained: moving racks" in job.wait_reason
        call_command("undrain_node", follower.node.name, stdout=StringIO())
        follower.tick()
        job.refresh_from_db()
        assert queued == [job.pk] and job.state != JobState.PENDING
    finally:
        follower.close()


def test_the_nodes_page_shows_every_node_and_only_admins_drain(make_user: UserFactory) -> None:
    node = this_node()
    hold_lease(node, "follower-a")
    viewer = client_as(make_user("viewer"))
    page = viewer.get("/nodes/")
    assert page.status_code == 200
    text = page.content.decode()
    assert node.name in text and "Drain" not in text
    assert viewer.post(f"/nodes/{node.name}/drain/", {"reason": "x"}).status_code == 403
    assert client_as(make_user("operator")).post(f"/nodes/{node.name}/drain/").status_code == 403
    node.refresh_from_db()
    assert not node.drained

    admin = client_as(make_user("admin"))
    assert "Drain" in admin.get("/nodes/").content.decode()
    response = admin.post(f"/nodes/{node.name}/drain/", {"reason": "disk swap"}, follow=True)
    assert response.status_code == 200 and "drained" in response.content.decode()
    node.refresh_from_db()
    assert node.drained and node.drain_reason == "disk swap" and node.drained_by.startswith("admin-")
    assert "Undrain" in response.content.decode()
    event = NodeEvent.objects.get(kind="node.drained")
    assert event.actor == node.drained_by and event.message == "disk swap"
    missing = admin.post("/nodes/nope/drain/", follow=True)
    assert "no OMA node named" in missing.content.decode()
    admin.post(f"/nodes/{node.name}/undrain/")
    node.refresh_from_db()
    assert not node.drained
    assert admin.get(f"/nodes/{node.name}/drain/").status_code == 405


def test_each_node_takes_its_tasks_from_its_own_queue(settings: object) -> None:
    """A job's steps attach volumes and publish exports on the node it was placed on: its follower
    queues them under that node's name, and another node's workers never see them."""
    from django_q.brokers import get_broker

    from migrations_app.follower import enqueue_task

    own = settings.Q_CLUSTER["name"]  # type: ignore[attr-defined]
    assert own == f"oma-{settings.OMA_NBD['NODE']}"  # type: ignore[attr-defined]
    enqueue_task("run_job_task", 123)
    assert get_broker(own).queue_size() == 1
    assert get_broker("oma-node-b").queue_size() == 0
    proc = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "shell",
            "-c",
            "from django.conf import settings; print(settings.Q_CLUSTER['name'])",
        ],
        env={**os.environ, "OMA_NODE_NAME": "node-b"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert proc.stdout.strip().splitlines()[-1] == "oma-node-b", "a node's workers read its own queue"


def test_a_job_goes_to_the_node_with_the_most_free_slots_and_no_node_overfills(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    """Two nodes' followers on one database, each placing only on its own node under its own lock: a
    new VM goes where most slots are free, then where fewer jobs run; a drained node gets none."""
    sim = make_sim()
    wire(settings, nbdkit_server, sim)
    settings.OMA_WORKFLOW = {**settings.OMA_WORKFLOW, "ATTACH_SLOTS": 6}  # type: ignore[attr-defined]
    queues: dict[str, list[int]] = {"a": [], "b": []}
    a = Follower(enqueue=lambda task, pk: queues["a"].append(pk), detach=lambda pk: None)
    b = Follower(enqueue=lambda task, pk: queues["b"].append(pk), detach=lambda pk: None)
    b.node = OmaNode.objects.create(name="node-b", attach_slots=8)
    try:
        assert hold_lease(a.node, "follower-a") and hold_lease(b.node, "follower-b")
        jobs = {name: actions.start_migration(vm_id=sim.vm(name).id) for name in ("web-01", "db-01", "app-01")}
        # 6 free here, 8 on node-b: web-01 (1 disk) and db-01 (2) are left for node-b; then node-b's 5
        # free slots are fewer than this node's 6, so app-01 (3 disks) stays here.
        a.tick()
        b.tick()
        placed = {name: MigrationJob.objects.get(pk=job.pk).node.name for name, job in jobs.items()}  # type: ignore[union-attr]
        assert placed == {"web-01": "node-b", "db-01": "node-b", "app-01": a.node.name}
        assert queues == {"a": [jobs["app-01"].pk], "b": [jobs["web-01"].pk, jobs["db-01"].pk]}
        for node in (a.node, b.node):
            held = DestinationVolume.objects.filter(node=node).count()
            assert held <= OmaNode.objects.get(pk=node.pk).attach_slots

        # file-01 (2 disks) would go to node-b (5 free against 3 here), but node-b is drained.
        late = actions.start_migration(vm_id=sim.vm("file-01").id)
        a.tick()
        late.refresh_from_db()
        assert late.node is None and late.state == JobState.PENDING, "left for node-b"
        call_command("drain_node", "node-b", stdout=StringIO())
        b.tick()
        a.freed = True  # another node's change is seen by the periodic placement (every 2 s): now
        a.tick()
        late.refresh_from_db()
        assert late.node == a.node and queues["a"][-1] == late.pk
    finally:
        a.close()
        b.close()


def test_a_node_that_stops_beating_is_marked_down_once_and_its_waiting_jobs_go_elsewhere(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    sim = make_sim()
    wire(settings, nbdkit_server, sim)
    queued: list[int] = []
    a = Follower(enqueue=lambda task, pk: queued.append(pk), detach=lambda pk: None)
    lost = OmaNode.objects.create(name="node-b", attach_slots=25)
    try:
        assert hold_lease(a.node, "follower-a") and hold_lease(lost, "follower-b")
        # A retried job bound to node-b, holding none of its slots; node-b then goes silent.
        job = actions.start_migration(vm_id=sim.vm("web-01").id)
        MigrationJob.objects.filter(pk=job.pk).update(node=lost, wait_reason="waits on node-b")
        a.tick()
        job.refresh_from_db()
        assert job.node == lost and queued == [], "node-b is alive: its job is its own"

        OmaNode.objects.filter(pk=lost.pk).update(follower_beat_at=timezone.now() - timedelta(hours=1))
        a.checked_at = -1e9  # a poll interval later: lost nodes are looked for once an interval
        report = a.tick()
        assert report.lost_nodes == ["node-b"]
        job.refresh_from_db()
        assert job.node == a.node and queued == [job.pk], "placed on the live node in the same tick"
        (down,) = NodeEvent.objects.filter(kind="node.down")
        assert down.node == lost and down.actor == a.node.name and job.job_id in down.message
        a.checked_at = -1e9
        assert a.tick().lost_nodes == [], "marked once"

        b = Follower(enqueue=lambda task, pk: None, detach=lambda pk: None)
        b.node = lost
        try:
            assert hold_lease(lost, "follower-b2")
            b.tick()
        finally:
            b.close()
        lost.refresh_from_db()
        assert lost.down_since is None and NodeEvent.objects.filter(node=lost, kind="node.up").count() == 1
    finally:
        a.close()


def test_an_export_belongs_to_the_node_that_serves_it(nbdkit_server: RunningServer) -> None:
    """A device path names a device on one node: another node's live export of the same path is no
    conflict here, and this node's health and reconcile neither expect nor repair it."""
    from exports import actions as exports_actions
    from exports.health import check_nbd_server
    from exports.models import VMExportMapping, export_name_for
    from exports.reconcile import reconcile_exports

    device = nbdkit_server.volume("v0.img", size=1 << 20)
    other_vm = "4210bbbb-bbbb-4ccc-8ddd-eeeeffff0001"
    VMExportMapping.objects.create(
        vm_id=other_vm,
        vm_name="elsewhere",
        disk_unit_number=0,
        export_name=export_name_for(other_vm, 0),
        device_path=device,
        status=VMExportMapping.Status.ACTIVE,
        node="node-b",
    )
    vm = "4210aaaa-bbbb-4ccc-8ddd-eeeeffff0000"
    mapping = exports_actions.ensure_export(vm_id=vm, vm_name="here", disk_unit=0, device=device)
    assert mapping.node == "local" and mapping.status == VMExportMapping.Status.ACTIVE
    report = reconcile_exports(fix=False, actor="test")
    assert report.clean, report
    check = check_nbd_server(actor="test")
    assert check.health == "ok" and check.expected == [mapping.export_name] and check.missing == []


def test_a_node_back_from_down_reconciles_its_exports_before_it_takes_work(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object
) -> None:
    from exports import actions as exports_actions

    sim = make_sim()
    wire(settings, nbdkit_server, sim)
    device = nbdkit_server.volume("v0.img", size=1 << 20)
    mapping = exports_actions.ensure_export(
        vm_id="4210aaaa-bbbb-4ccc-8ddd-eeeeffff0000", vm_name="here", disk_unit=0, device=device
    )
    link = nbdkit_server.layout.export_root / mapping.export_name
    queued: list[int] = []
    follower = Follower(enqueue=lambda task, pk: queued.append(pk), detach=lambda pk: None)
    try:
        # While it was away another node marked it down, and its export link was lost.
        OmaNode.objects.filter(pk=follower.node.pk).update(down_since=timezone.now())
        link.unlink()
        job = actions.start_migration(vm_id=sim.vm("web-01").id)
        follower.tick()
        assert link.is_symlink() and str(link.readlink()) == device, "republished from the database"
        back = NodeEvent.objects.get(kind="node.up")
        assert "exports reconciled, 1 repaired" in back.message and mapping.export_name in back.message
        assert OmaNode.objects.get(pk=follower.node.pk).down_since is None
        assert queued == [job.pk], "it takes work once reconciled"
    finally:
        follower.close()


@pytest.mark.parametrize("backend", ["local", "cloudstack"])
def test_a_lost_nodes_copy_moves_only_once_the_vma_says_it_stopped(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object, request: pytest.FixtureRequest, backend: str
) -> None:
    """The node this test runs as starts a copy and dies; node-a takes over. While the VMA cannot say
    the copy stopped, nothing moves (a copy still writing through the lost node must not meet a second
    one); then the copy is stopped, what it confirmed kept, its volumes detached from the lost node (on
    CloudStack: detachVolume from the lost node's VM, through the signed API), and the job placed on
    node-a to resume, in one tick."""
    from exports.reconcile import reconcile_exports
    from migrations_app.volumes import LocalVolumeBackend
    from tests.support.flows import InProcess

    sim = make_sim(Faults(rate_bits_per_second=8_000_000), size_mib=16)
    wire(settings, nbdkit_server, sim)
    fake = None
    if backend == "cloudstack":
        from tests.support.fake_cloudstack import use_cloud

        fake = request.getfixturevalue("cloud")
        use_cloud(settings, fake)
    runner = InProcess()
    lost = runner.follower.node
    job = actions.start_migration(vm_id=sim.vm("db-01").id)
    queued: list[int] = []
    a = Follower(enqueue=lambda task, pk: queued.append(pk), detach=lambda pk: None)
    a.node = OmaNode.objects.create(name="node-a", attach_slots=25)
    try:
        deadline = time.monotonic() + 30
        while sum(MigrationJob.objects.get(pk=job.pk).disks.values_list("checkpoint_bytes", flat=True)) < 1 << 20:
            assert time.monotonic() < deadline, MigrationJob.objects.get(pk=job.pk).state
            runner.tick()
            time.sleep(0.05)
        job.refresh_from_db()
        replication_id = job.replication_id
        assert job.state == JobState.REPLICATING and job.node == lost and replication_id
        assert hold_lease(a.node, "follower-a")
        OmaNode.objects.filter(pk=lost.pk).update(follower_beat_at=timezone.now() - timedelta(hours=1))

        sim.go_offline()
        assert a.tick().lost_nodes == [lost.name]
        job.refresh_from_db()
        assert job.state == JobState.REPLICATING and job.node == lost, "the VMA cannot say it stopped"
        assert DestinationVolume.objects.filter(node=lost).count() == 2

        sim.come_back()
        while job.job_id not in a.tick().taken_over:  # asked to stop, the copy says "cancelling" first
            assert time.monotonic() < deadline + 30, "the copy stops"
            time.sleep(0.05)
        job.refresh_from_db()
        assert sim.sim.replications[replication_id].state == "cancelled"
        confirmed = sum(job.disks.values_list("checkpoint_bytes", flat=True))
        assert confirmed >= 1 << 20 and all(job.disks.values_list("checkpoint", flat=True)), "what it confirmed"
        assert job.node == a.node and queued == [job.pk], "placed on node-a in the same tick"
        assert job.state == JobState.ATTACHING and job.attempt == 2, "attached again there, then resumed"
        moved = job.events.get(kind="job.moved")
        assert f"node {lost.name} was lost in replicating" in moved.message and moved.actor == "node-a"
        assert not DestinationVolume.objects.filter(node=lost).exists()
        if fake is None:
            local = LocalVolumeBackend(nbdkit_server.layout.volume_root)
            assert all(v.attached_device == "" for v in local.list_volumes()), "detached from the lost node"
        else:
            assert lost.oma_vm_id == fake.oma_vm_id and fake.requests.count("detachVolume") == 2
            assert len(fake.volumes) == 2 and not any(v.get("virtualmachineid") for v in fake.volumes.values())
            assert not list(fake.device_root.glob("virtio-*")), "its devices went with the detach"
        taken = NodeEvent.objects.get(kind="node.taken_over")
        assert taken.node == lost and "2 volume(s) detached" in taken.message and job.job_id in taken.message
        # The export links it left: once its VM's export moved to node-a, reconcile there removes them.
        from exports.models import VMExportMapping

        VMExportMapping.objects.filter(vm_id=job.vm.vm_id).update(node="node-a")
        report_back = reconcile_exports(fix=True, actor="test")
        assert len(report_back.moved_away) == 2 and not report_back.orphaned
        assert not [p for p in nbdkit_server.layout.export_root.iterdir() if job.vm.vm_id in p.name]
    finally:
        a.close()
        runner.close()
