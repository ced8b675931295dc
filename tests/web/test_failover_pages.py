"""The failover page and the mappings page: what each role sees, and what a wrong or forged request
changes (nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.test import Client

from migrations_app.compute import LOCAL_NETWORKS
from migrations_app.models import DestinationVolume, JobKind, JobState, MigrationJob, NetworkMapping, OmaNode
from tests.support.factories import make_jobs

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def offline_peers(settings: object, tmp_path: Path) -> None:
    settings.OMA_VOLUMES = {"BACKEND": "local", "ROOT": str(tmp_path / "volumes"), "LOOP": False}  # type: ignore[attr-defined]
    settings.OMA_VMA = {**settings.OMA_VMA, "URL": "http://127.0.0.1:9", "RETRIES": 0, "TIMEOUT": 1}  # type: ignore[attr-defined]


def test_the_failover_page_says_what_is_missing_and_gives_a_viewer_no_buttons(viewer: Client) -> None:
    (job,) = make_jobs(1)
    page = viewer.get(f"/vms/{job.vm.vm_id}/failover/").content.decode()
    assert "Fail over " + job.vm.name in page
    assert "the VMA reports no NIC for this VM" in page and "no completed sync yet" not in page
    assert "the VMA cannot power the source down" in page
    assert "virtio drivers" in page
    assert "Fail over now" not in page and "Start test failover" not in page
    assert "on no OMA node" in page
    node = OmaNode.objects.create(name="oma-7")
    disk = job.vm.disks.earliest("unit_number")
    DestinationVolume.objects.create(
        source_disk=disk, volume_id="v-1", state=DestinationVolume.State.ATTACHED, node=node
    )
    page = viewer.get(f"/vms/{job.vm.vm_id}/failover/").content.decode()
    assert 'attached to OMA node <span data-testid="volume-node">oma-7</span>' in page


def test_a_live_failover_needs_the_typed_name_and_an_operator(operator: Client, viewer: Client) -> None:
    (job,) = make_jobs(1)
    vm = job.vm
    url = f"/vms/{vm.vm_id}/failover/start/"
    assert viewer.post(url, {"kind": JobKind.LIVE_FAILOVER, "confirm_name": vm.name}).status_code == 403
    answer = operator.post(url, {"kind": JobKind.LIVE_FAILOVER, "confirm_name": "not-the-name"}, follow=True)
    assert f"Type the VM&#x27;s name, {vm.name}" in answer.content.decode()
    assert not MigrationJob.objects.exclude(kind=JobKind.SYNC).exists()
    answer = operator.post(url, {"kind": JobKind.LIVE_FAILOVER, "confirm_name": vm.name}, follow=True)
    failover = MigrationJob.objects.get(kind=JobKind.LIVE_FAILOVER)
    assert failover.state == JobState.PENDING and failover.requested_by.startswith("operator")
    assert answer.redirect_chain[-1][0] == f"/jobs/{failover.job_id}/"


def test_the_mappings_page_checks_ids_against_the_cloud(operator: Client, viewer: Client) -> None:
    bad = {"kind": "network", "source_network": "VM Network", "network_id": "nope", "test_network_id": ""}
    assert viewer.post("/failover/", bad).status_code == 403
    answer = operator.post("/failover/", bad)
    assert "CloudStack has no network with id nope" in answer.content.decode()
    assert not NetworkMapping.objects.exists()
    good = {**bad, "network_id": LOCAL_NETWORKS[0].id}
    assert operator.post("/failover/", good).status_code == 302
    mapping = NetworkMapping.objects.get()
    page = viewer.get("/failover/").content.decode()
    assert LOCAL_NETWORKS[0].id in page and "edit" not in page.split("<h2>Templates")[0].split("Networks")[1]
    assert operator.post("/failover/", {"kind": "network", "pk": mapping.pk, "delete": "1"}).status_code == 302
    assert not NetworkMapping.objects.exists()


def test_a_failed_over_vm_cannot_be_selected_for_another_sync(operator: Client) -> None:
    from django.utils import timezone

    (job,) = make_jobs(1)
    job.vm.migrated_at, job.vm.destination_vm_id = timezone.now(), "0f0e0d0c-0000-4000-8000-000000000001"
    job.vm.save()
    page = operator.get("/vms/").content.decode()
    row = page.split(f'id="vm-{job.vm.vm_id}"')[1].split("</tr>")[0]
    assert "runs in CloudStack" in row and 'disabled title="failed over: it runs in CloudStack"' in row


def test_a_failover_request_outside_its_choices_is_refused_and_changes_nothing(operator: Client) -> None:
    (job,) = make_jobs(1)
    answer = operator.post(f"/vms/{job.vm.vm_id}/failover/end/", {"what": "nuke"})
    assert answer.status_code == 400 and b"end_test or rollback" in answer.content
    bad = {"kind": "volume", "source_network": "VM Network", "network_id": LOCAL_NETWORKS[0].id}
    assert operator.post("/failover/", bad).status_code == 400
    assert not NetworkMapping.objects.exists()
    answer = operator.post(f"/vms/{job.vm.vm_id}/failover/start/", {"kind": "sync"}, follow=True)
    assert "is not a failover" in answer.content.decode()
    assert not MigrationJob.objects.exclude(kind=JobKind.SYNC).exists()
