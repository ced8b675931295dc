"""OMA nodes: registration, the nodes command and page, and draining (nothing new is placed on a drained
node; what runs there finishes)."""

from __future__ import annotations

import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from migrations_app import actions
from migrations_app.follower import Follower, hold_lease
from migrations_app.models import JobState, NodeEvent, OmaNode
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
