"""Destination VMs through both adapters: the local cloud and CloudStack (production code, PyPI ``cs``)
against the signed fake API server. One scenario each, with CloudStack's rules for moving volumes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrations_app.cloudstack import CloudStackCompute
from migrations_app.compute import ComputeBackend, ComputeError, LocalComputeBackend, Nic
from migrations_app.volumes import GIB, LocalVolumeBackend, VolumeBackend
from tests.migrations_app.test_cloudstack import backend_for
from tests.support.fake_cloudstack import FakeCloudStack


@pytest.fixture(params=["local", "cloudstack"])
def cloud(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[VolumeBackend, ComputeBackend, object]]:
    if request.param == "local":
        volumes = LocalVolumeBackend(tmp_path / "volumes")
        yield volumes, LocalComputeBackend(volumes), volumes.image_path
        return
    (tmp_path / "by-id").mkdir()
    fake = FakeCloudStack(tmp_path / "by-id").start()
    try:
        cs_volumes = backend_for(fake)
        yield cs_volumes, CloudStackCompute(cs_volumes), fake.file_of
    finally:
        fake.stop()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_failover_moves_the_volumes_and_the_rules_hold(cloud: tuple[VolumeBackend, ComputeBackend, object]) -> None:
    volumes, compute, file_of = cloud
    compute.check()
    network = next(n for n in compute.networks() if not n.isolated)
    offering = next(o for o in compute.offerings() if o.cpus)
    template = compute.templates()[0]
    disk0 = volumes.create_volume("oma-x-disk0", GIB)
    disk1 = volumes.create_volume("oma-x-disk1", GIB)
    vm = compute.deploy_vm(
        "web-01",
        template_id=template.id,
        offering_id=offering.id,
        nics=[Nic(network.id, "00:50:56:01:02:03")],
        cpus=2,
        memory_mib=4096,
        efi=False,
    )
    assert vm.state == "Stopped" and vm.root is not None
    # Idempotent on its name: a worker that died after the deploy finds it.
    assert (
        compute.deploy_vm(
            "web-01",
            template_id=template.id,
            offering_id=offering.id,
            nics=[Nic(network.id)],
            cpus=2,
            memory_mib=4096,
            efi=False,
        ).id
        == vm.id
    )
    with pytest.raises(ComputeError, match="already has root"):
        compute.attach(disk0.id, vm.id, device_id=0)
    # Its placeholder root goes (the VM is stopped); without a root it cannot start.
    compute.detach(vm.root.volume_id)
    compute.delete_volume(vm.root.volume_id)
    with pytest.raises(ComputeError, match="no root"):
        compute.start_vm(vm.id)
    compute.attach(disk0.id, vm.id, device_id=0)
    compute.attach(disk1.id, vm.id)
    moved = compute.get_vm(vm.id)
    assert moved is not None and moved.root is not None and moved.root.volume_id == disk0.id
    assert [d.volume_id for d in moved.disks] == [disk0.id, disk1.id]
    compute.start_vm(vm.id)
    running = compute.get_vm(vm.id)
    assert running is not None and running.state == "Running"
    # A root volume moves only while its VM is stopped.
    with pytest.raises(ComputeError, match=r"[Ss]topped"):
        compute.detach(disk0.id)
    # A VM snapshot pins every volume; a revert gives back what the disks held.
    before = _sha(file_of(disk1.id))  # type: ignore[operator]
    snapshot = compute.snapshot_vm(vm.id, "oma-test-web-01")
    assert compute.snapshot_vm(vm.id, "oma-test-web-01") == snapshot
    with open(file_of(disk1.id), "r+b") as fh:  # type: ignore[operator]
        fh.write(b"the test VM wrote this")
    with pytest.raises(ComputeError, match="VM snapshots"):
        compute.detach(disk1.id)
    compute.stop_vm(vm.id)
    compute.revert_snapshot(snapshot)
    assert _sha(file_of(disk1.id)) == before  # type: ignore[operator]
    compute.delete_snapshot(snapshot)
    compute.detach(disk0.id)
    compute.detach(disk1.id)
    # Back on the OMA, then the VM goes.
    assert volumes.attach_volume(disk0.id)
    compute.destroy_vm(vm.id)
    assert compute.get_vm(vm.id) is None and compute.find_vm("web-01") is None
    assert volumes.get_volume(disk1.id) is not None


def test_another_tenants_vm_is_never_touched(tmp_path: Path) -> None:
    (tmp_path / "by-id").mkdir()
    fake = FakeCloudStack(tmp_path / "by-id").start()
    try:
        compute = CloudStackCompute(backend_for(fake))
        theirs = fake.add_foreign_vm("their-db", owner="oma-portal:someone-else")
        untagged = fake.add_foreign_vm("their-web")
        for vm_id in (theirs, untagged):
            for call in (compute.stop_vm, compute.destroy_vm, compute.start_vm):
                with pytest.raises(ComputeError, match="not created by this portal"):
                    call(vm_id)
        with pytest.raises(ComputeError, match="another portal"):
            compute.find_vm("their-db")
        assert fake.vms[theirs]["state"] == fake.vms[untagged]["state"] == "Running"
        assert "stopVirtualMachine" not in fake.requests and "destroyVirtualMachine" not in fake.requests
    finally:
        fake.stop()


def test_what_a_deploy_makes_carries_the_owner_tag(tmp_path: Path) -> None:
    from migrations_app.compute import Nic as NicSpec

    (tmp_path / "by-id").mkdir()
    fake = FakeCloudStack(tmp_path / "by-id").start()
    try:
        compute = CloudStackCompute(backend_for(fake))
        vm = compute.deploy_vm(
            "web-01-4210aaaa",
            template_id=fake.templates[0]["id"],
            offering_id=str(fake.service_offerings[0]["id"]),
            nics=[NicSpec(fake.networks[0]["id"])],
            cpus=2,
            memory_mib=4096,
            efi=False,
        )
        owner = compute.volumes.owner
        assert {"key": "oma-owner", "value": owner} in [
            {k: t[k] for k in ("key", "value")} for t in fake.vms[vm.id]["tags"]
        ]
        root = fake.volumes[vm.root.volume_id]  # type: ignore[union-attr]
        assert [t["value"] for t in root["tags"]] == [owner], "its placeholder root is ours to delete"
    finally:
        fake.stop()
