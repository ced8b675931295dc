"""Failover mappings: every id is checked against the cloud before it is saved (admin and GUI share the
forms), and the plan picks the smallest offering that fits."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.test import Client

from migrations_app.compute import LOCAL_NETWORKS, LOCAL_OFFERINGS, LOCAL_TEMPLATES
from migrations_app.failover import pick_offering, plan_for, vm_name
from migrations_app.models import FailoverPlan, NetworkMapping, OfferingMapping, SourceVM, TemplateMapping

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def local_cloud(settings: object, tmp_path: Path) -> None:
    settings.OMA_VOLUMES = {"BACKEND": "local", "ROOT": str(tmp_path / "volumes"), "LOOP": False}  # type: ignore[attr-defined]


def test_admin_refuses_an_id_the_cloud_does_not_have_and_saves_nothing(admin_client: Client) -> None:
    answer = admin_client.post(
        "/admin/migrations_app/networkmapping/add/",
        {"source_network": "VM Network", "network_id": "no-such-network", "test_network_id": ""},
    )
    assert answer.status_code == 200
    assert "CloudStack has no network with id no-such-network" in answer.content.decode()
    assert not NetworkMapping.objects.exists()
    answer = admin_client.post(
        "/admin/migrations_app/networkmapping/add/",
        {"source_network": "VM Network", "network_id": LOCAL_NETWORKS[0].id, "test_network_id": LOCAL_NETWORKS[2].id},
    )
    assert answer.status_code == 302
    assert NetworkMapping.objects.get().network_id == LOCAL_NETWORKS[0].id


def test_an_offering_needs_both_sizes_or_neither(admin_client: Client) -> None:
    answer = admin_client.post(
        "/admin/migrations_app/offeringmapping/add/",
        {"name": "half", "offering_id": LOCAL_OFFERINGS[0].id, "cpus": "2", "memory_mib": ""},
    )
    assert "give both CPUs and memory, or neither" in answer.content.decode()
    assert not OfferingMapping.objects.exists()


def test_the_plan_picks_the_smallest_offering_that_fits_and_honours_overrides() -> None:
    for offering in LOCAL_OFFERINGS:
        OfferingMapping.objects.create(
            name=offering.name, offering_id=offering.id, cpus=offering.cpus, memory_mib=offering.memory_mib
        )
    TemplateMapping.objects.create(firmware="efi", template_id=LOCAL_TEMPLATES[1].id)
    NetworkMapping.objects.create(source_network="VM Network", network_id=LOCAL_NETWORKS[0].id)
    vm = SourceVM.objects.create(
        vm_id="4210aaaa-bbbb-4ccc-8ddd-eeeeffff0001",
        name="App Server #1",
        cpus=3,
        memory_mib=6000,
        firmware="efi",
        nics=[{"network": "VM Network", "mac": "00:50:56:aa:bb:cc"}, {"network": "Backup", "mac": "00:50:56:aa:bb:cd"}],
    )
    assert pick_offering(vm) is not None and pick_offering(vm).name.startswith("Large")  # type: ignore[union-attr]
    vm.cpus, vm.memory_mib = 32, 65536
    assert pick_offering(vm).name == "Custom"  # type: ignore[union-attr]
    plan = plan_for(vm)
    assert plan.efi and plan.template_id == LOCAL_TEMPLATES[1].id
    assert [n.mac for n in plan.nics] == ["00:50:56:aa:bb:cc"] and plan.unmapped == ["Backup"]
    FailoverPlan.objects.create(vm=vm, networks={"Backup": LOCAL_NETWORKS[1].id})
    assert [n.network_id for n in plan_for(vm).nics] == [LOCAL_NETWORKS[0].id, LOCAL_NETWORKS[1].id]
    # A test VM gets the isolated network and new MACs (the source runs on beside it).
    assert plan_for(vm, test=True).unmapped == ["VM Network", "Backup"]
    assert vm_name(vm, test=False) == "app-server-1-4210aaaa" and vm_name(vm, test=True) == "app-server-1-test-4210aaaa"
