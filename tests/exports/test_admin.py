"""Django admin for mappings: same validation as the helper, changes only through exports.actions."""

from __future__ import annotations

import os
import threading
import time

import pytest
from django.contrib.auth import get_user_model
from django.db import connections, transaction
from django.test import Client
from django.urls import reverse

from exports import actions
from exports.health import check_nbd_server
from exports.models import ExportEvent, VMExportMapping
from migrations_app.follower import record_progress
from migrations_app.models import JobDisk, JobState
from tests.support.factories import make_jobs
from tests.support.nbd import RunningServer
from tests.support.vma import progress

VM = "4210aaaa-bbbb-4ccc-8ddd-eeeeffff0000"
NAME0 = f"migration-vm-{VM}-disk0"

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def admin_client_logged_in() -> Client:
    user = get_user_model().objects.create_superuser("boss", "boss@example.com", "pw-for-tests-only")
    client = Client()
    client.force_login(user)
    return client


def add(client: Client, **fields: object) -> object:
    data = {"vm_id": VM, "vm_name": "web-01", "disk_unit_number": 0, "device_path": "", **fields}
    return client.post(reverse("admin:exports_vmexportmapping_add"), data, follow=True)


def test_admin_add_goes_through_ensure_export(nbdkit_server: RunningServer, admin_client_logged_in: Client) -> None:
    device = nbdkit_server.volume("a.img")
    add(admin_client_logged_in, device_path=device)
    mapping = VMExportMapping.objects.get()
    assert mapping.export_name == NAME0 and mapping.status == VMExportMapping.Status.ACTIVE
    assert os.readlink(nbdkit_server.layout.export_root / NAME0) == device
    assert ExportEvent.objects.get(kind="export.created").actor == "boss"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"device_path": "/dev/vdb\n[x]"}, "must be an absolute path"),
        ({"device_path": "/dev/../etc/shadow"}, "must be an absolute path"),
        ({"vm_id": "nope", "device_path": "/dev/vdb"}, "not a VMware instance UUID"),
        ({"disk_unit_number": 64, "device_path": "/dev/vdb"}, "from 0 to 63"),
    ],
)
def test_admin_form_rejects_bad_input_with_the_reason(
    nbdkit_server: RunningServer, admin_client_logged_in: Client, fields: dict[str, object], message: str
) -> None:
    response = add(admin_client_logged_in, **fields)
    assert message in response.content.decode()  # type: ignore[attr-defined]
    assert not VMExportMapping.objects.exists()
    assert nbdkit_server.helper_calls() == []


def test_admin_add_refused_by_helper_changes_nothing(
    nbdkit_server: RunningServer, admin_client_logged_in: Client
) -> None:
    before = nbdkit_server.snapshot()
    response = add(admin_client_logged_in, device_path="/etc/shadow")
    assert "Refused, nothing changed" in response.content.decode()  # type: ignore[attr-defined]
    assert not VMExportMapping.objects.exists()
    assert nbdkit_server.snapshot() == before


def test_export_name_is_read_only_and_delete_is_not_offered(
    nbdkit_server: RunningServer, admin_client_logged_in: Client
) -> None:
    mapping = actions.ensure_export(vm_id=VM, vm_name="web", disk_unit=0, device=nbdkit_server.volume("a.img"))
    page = admin_client_logged_in.get(reverse("admin:exports_vmexportmapping_change", args=[mapping.pk]))
    html = page.content.decode()
    assert 'name="export_name"' not in html and NAME0 in html
    assert 'name="vm_id"' not in html, "vm_id of an existing mapping must not be editable"
    deleted = admin_client_logged_in.post(reverse("admin:exports_vmexportmapping_delete", args=[mapping.pk]))
    assert deleted.status_code == 403
    assert VMExportMapping.objects.filter(pk=mapping.pk).exists()


def test_admin_retire_action_removes_the_link(nbdkit_server: RunningServer, admin_client_logged_in: Client) -> None:
    mapping = actions.ensure_export(vm_id=VM, vm_name="web", disk_unit=0, device=nbdkit_server.volume("a.img"))
    admin_client_logged_in.post(
        reverse("admin:exports_vmexportmapping_changelist"),
        {"action": "retire", "_selected_action": [mapping.pk]},
    )
    mapping.refresh_from_db()
    assert mapping.status == VMExportMapping.Status.RETIRED
    assert not (nbdkit_server.layout.export_root / NAME0).is_symlink()


def test_changelist_search_and_filter(nbdkit_server: RunningServer, admin_client_logged_in: Client) -> None:
    actions.ensure_export(vm_id=VM, vm_name="web-01", disk_unit=0, device=nbdkit_server.volume("a.img"))
    url = reverse("admin:exports_vmexportmapping_changelist")
    assert NAME0 in admin_client_logged_in.get(url, {"q": "web-01"}).content.decode()
    assert NAME0 not in admin_client_logged_in.get(url, {"q": "db-02"}).content.decode()
    assert NAME0 in admin_client_logged_in.get(url, {"status__exact": "active"}).content.decode()


def test_pages_require_login_and_show_mappings_and_server_state(
    nbdkit_server: RunningServer, admin_client_logged_in: Client
) -> None:
    assert Client().get("/exports/").status_code == 302
    actions.ensure_export(vm_id=VM, vm_name="web-01", disk_unit=0, device=nbdkit_server.volume("a.img"))
    check_nbd_server()
    assert NAME0 in admin_client_logged_in.get("/exports/").content.decode()
    html = admin_client_logged_in.get("/nbd/").content.decode()
    assert "1 / 1" in html and "exports served / expected" in html and "nbdkit" in html


def test_a_worker_can_write_while_the_admin_waits_for_a_reload(
    nbdserver_server: RunningServer, admin_client_logged_in: Client, settings: object
) -> None:
    """The admin's add form runs ensure_export outside Django's form transaction: while it waits for
    nbd-server's reload spacing, the mapping row is already committed and other writers are not held
    (on SQLite an open transaction would hold the write lock for the whole wait)."""
    settings.OMA_NBD = {**settings.OMA_NBD, "MIN_RELOAD_SPACING": 4.0}  # type: ignore[attr-defined]
    actions.ensure_export(vm_id=VM, vm_name="web-01", disk_unit=0, device=nbdserver_server.volume("a.img"))
    job = make_jobs(1, state=JobState.REPLICATING, disks=1)[0]  # a copy whose progress a worker writes
    second = nbdserver_server.volume("b.img")
    responses: list[object] = []

    def admin_adds_disk_1() -> None:
        try:
            responses.append(add(admin_client_logged_in, disk_unit_number=1, device_path=second))
        finally:
            connections.close_all()

    admin = threading.Thread(target=admin_adds_disk_1)
    admin.start()
    deadline = time.monotonic() + 3
    while not VMExportMapping.objects.filter(vm_id=VM, disk_unit_number=1).exists():
        assert time.monotonic() < deadline, "the admin's mapping row was not committed before the reload"
        time.sleep(0.02)
    record_progress(job, [progress(0, 1, 2, 3)])
    assert admin.is_alive(), "the progress write had to wait for the admin's reload"
    admin.join(timeout=30)
    assert responses and VMExportMapping.objects.get(vm_id=VM, disk_unit_number=1).status == "active"
    assert JobDisk.objects.get(job=job).bytes_done == 1


def test_ensure_export_refuses_to_run_inside_a_callers_transaction(nbdkit_server: RunningServer) -> None:
    with pytest.raises(RuntimeError, match="outside any transaction"), transaction.atomic():
        actions.ensure_export(vm_id=VM, vm_name="web-01", disk_unit=0, device=nbdkit_server.volume("a.img"))
    assert not VMExportMapping.objects.exists()
    assert not (nbdkit_server.layout.export_root / NAME0).exists()


def test_admin_actions_need_the_change_permission(nbdkit_server: RunningServer) -> None:
    from django.contrib.auth.models import Permission

    mapping = actions.ensure_export(vm_id=VM, vm_name="web", disk_unit=0, device=nbdkit_server.volume("a.img"))
    auditor = get_user_model().objects.create_user("auditor", password="pw-for-tests-only", is_staff=True)
    auditor.user_permissions.add(Permission.objects.get(codename="view_vmexportmapping"))
    client = Client()
    client.force_login(auditor)
    changelist = reverse("admin:exports_vmexportmapping_changelist")
    page = client.get(changelist)
    assert page.status_code == 200 and mapping.export_name in page.content.decode()
    assert 'value="retire"' not in page.content.decode()  # not offered to a viewer of mappings
    helper_calls = len(nbdkit_server.helper_calls())
    for action in ("retire", "republish", "verify_served"):
        client.post(changelist, {"action": action, "_selected_action": [mapping.pk]})  # forged
    mapping.refresh_from_db()
    assert mapping.status == VMExportMapping.Status.ACTIVE
    assert (nbdkit_server.layout.export_root / NAME0).is_symlink()
    assert len(nbdkit_server.helper_calls()) == helper_calls
