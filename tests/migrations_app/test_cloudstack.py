"""The CloudStack volume backend (production code, PyPI ``cs``) against the signed fake API server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from migrations_app.cloudstack import CloudStackVolumeBackend, by_id_serial
from migrations_app.volumes import GIB, VolumeError
from tests.support.fake_cloudstack import FakeCloudStack, cloudstack_signature


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeCloudStack]:
    (tmp_path / "by-id").mkdir()
    server = FakeCloudStack(tmp_path / "by-id").start()
    yield server
    server.stop()


def backend_for(fake: FakeCloudStack, secret: str | None = None, job_timeout: int = 10) -> CloudStackVolumeBackend:
    return CloudStackVolumeBackend(
        endpoint=fake.endpoint,
        key=fake.key,
        secret=secret or fake.secret,
        zone_id=fake.zone_id,
        disk_offering_id=fake.offering_id,
        oma_vm_id=fake.oma_vm_id,
        job_timeout=job_timeout,
        poll_interval=0.01,
        device_root=str(fake.device_root),
        device_timeout=2,
    )


def test_by_id_serial_is_the_first_20_hex_characters() -> None:
    assert by_id_serial("0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0") == "0b1c2d3e4f5061728394"


def test_create_rounds_up_to_whole_gib_and_waits_for_the_job(fake: FakeCloudStack) -> None:
    volume = backend_for(fake).create_volume("oma-web-disk0", int(2.5 * GIB))
    assert volume.size_bytes == 3 * GIB and volume.name == "oma-web-disk0"
    # Two async jobs, each waited for: createVolume, then createTags (the owner tag).
    assert fake.requests.count("queryAsyncJobResult") == 2 * (fake.pending_polls + 1)
    assert fake.volumes[volume.id]["state"] == "Allocated"


def test_create_is_idempotent_by_name(fake: FakeCloudStack) -> None:
    backend = backend_for(fake)
    first = backend.create_volume("oma-web-disk0", GIB)
    again = backend.create_volume("oma-web-disk0", GIB)
    assert again.id == first.id and fake.requests.count("createVolume") == 1


def test_attach_returns_the_by_id_device_and_is_idempotent(fake: FakeCloudStack) -> None:
    backend = backend_for(fake)
    volume = backend.create_volume("v", GIB)
    device = backend.attach_volume(volume.id)
    assert device == str(fake.device_root / f"virtio-{by_id_serial(volume.id)}")
    assert fake.volumes[volume.id]["virtualmachineid"] == fake.oma_vm_id
    assert backend.attach_volume(volume.id) == device
    assert fake.requests.count("attachVolume") == 1
    assert backend.get_volume(volume.id).attached_device == device  # type: ignore[union-attr]


def test_detach_then_delete(fake: FakeCloudStack) -> None:
    backend = backend_for(fake)
    volume = backend.create_volume("v", GIB)
    backend.attach_volume(volume.id)
    with pytest.raises(VolumeError, match="detach it first"):
        backend.delete_volume(volume.id)
    backend.detach_volume(volume.id)
    backend.detach_volume(volume.id)  # idempotent
    assert fake.requests.count("detachVolume") == 1
    backend.delete_volume(volume.id)
    assert fake.volumes == {} and backend.get_volume(volume.id) is None
    assert backend.list_volumes() == []


def test_volume_attached_to_another_vm_is_left_alone(fake: FakeCloudStack) -> None:
    backend = backend_for(fake)
    volume = backend.create_volume("v", GIB)
    fake.volumes[volume.id]["virtualmachineid"] = "some-other-vm"
    with pytest.raises(VolumeError, match="another VM"):
        backend.attach_volume(volume.id)
    with pytest.raises(VolumeError, match="another VM"):
        backend.detach_volume(volume.id)
    assert "attachVolume" not in fake.requests and "detachVolume" not in fake.requests


def test_a_lost_nodes_volume_is_detached_from_its_vm_only(fake: FakeCloudStack) -> None:
    backend = backend_for(fake)
    lost_oma = fake.add_foreign_vm("oma-node-b", owner="portal")
    other = fake.add_foreign_vm("someone-else")
    ours, theirs = backend.create_volume("v", GIB), backend.create_volume("w", GIB)
    fake.volumes[ours.id].update(virtualmachineid=lost_oma, deviceid=1)
    fake.volumes[theirs.id].update(virtualmachineid=other, deviceid=1)
    with pytest.raises(VolumeError, match="never registered its CloudStack VM"):
        backend.detach_from_node(ours.id, "node-b", "")
    backend.detach_from_node(theirs.id, "node-b", lost_oma)  # attached elsewhere: not the lost node's to give
    assert fake.volumes[theirs.id]["virtualmachineid"] == other
    backend.detach_from_node(ours.id, "node-b", lost_oma)
    backend.detach_from_node(ours.id, "node-b", lost_oma)  # nothing left to detach
    assert "virtualmachineid" not in fake.volumes[ours.id] and fake.requests.count("detachVolume") == 1
    backend.attach_volume(ours.id)  # and this node can take it
    assert fake.volumes[ours.id]["virtualmachineid"] == fake.oma_vm_id


@pytest.mark.parametrize(("command", "code"), [("createVolume", 530), ("createVolume", 533), ("attachVolume", 530)])
def test_async_job_failures_carry_code_and_text(fake: FakeCloudStack, command: str, code: int) -> None:
    backend = backend_for(fake)
    volume = backend.create_volume("v", GIB) if command == "attachVolume" else None
    fake.job_failures[command] = (code, "Failed to allocate storage (fake)")
    with pytest.raises(VolumeError, match=rf"{command} failed \({code}\): Failed to allocate storage"):
        backend.attach_volume(volume.id) if volume else backend.create_volume("w", GIB)


def test_parameter_errors_431_are_reported(fake: FakeCloudStack) -> None:
    fake.sync_failures["createVolume"] = (431, "Invalid parameter size")
    with pytest.raises(VolumeError, match=r"\(431\): Invalid parameter size"):
        backend_for(fake).create_volume("v", GIB)


def test_a_job_that_never_finishes_times_out(fake: FakeCloudStack) -> None:
    fake.stall = True
    with pytest.raises(VolumeError, match="did not finish within 1s"):
        backend_for(fake, job_timeout=1).create_volume("v", GIB)
    assert fake.requests.count("queryAsyncJobResult") > 1


def test_a_sub_second_job_timeout_is_refused(fake: FakeCloudStack) -> None:
    with pytest.raises(VolumeError, match="at least 1 second"):
        backend_for(fake, job_timeout=0)


def test_wrong_secret_is_rejected_by_signature_check(fake: FakeCloudStack) -> None:
    with pytest.raises(VolumeError, match=r"\(401\)"):
        backend_for(fake, secret="not-the-secret").create_volume("v", GIB)
    assert fake.volumes == {}


def test_the_fake_itself_rejects_a_tampered_request(fake: FakeCloudStack) -> None:
    params = {"command": "listVolumes", "apiKey": fake.key, "response": "json"}
    signed = {**params, "signature": cloudstack_signature(params, fake.secret)}
    assert httpx.get(fake.endpoint, params=signed).status_code == 200
    tampered = {**signed, "name": "added-after-signing"}
    assert httpx.get(fake.endpoint, params=tampered).status_code == 401


def test_unreachable_cloudstack_is_a_clear_error(fake: FakeCloudStack) -> None:
    backend = backend_for(fake)
    fake.stop()
    with pytest.raises(VolumeError, match="CloudStack"):
        backend.create_volume("v", GIB)


def test_what_the_portal_creates_carries_its_owner_tag(fake: FakeCloudStack) -> None:
    volume = backend_for(fake).create_volume("oma-vm-disk0", 1 << 30)
    assert fake.volumes[volume.id]["tags"] == [
        {"key": "oma-owner", "value": f"oma-portal:{fake.oma_vm_id}", "resourcetype": "Volume", "resourceid": volume.id}
    ]


def test_only_the_portals_own_volumes_are_listed_or_touched(fake: FakeCloudStack) -> None:
    backend = backend_for(fake)
    ours = backend.create_volume("oma-vm-disk0", 1 << 30)
    other_tenant = fake.add_foreign_volume("their-data")
    other_portal = fake.add_foreign_volume("oma-vm-disk1", owner="oma-portal:someone-else")
    assert [v.id for v in backend.list_volumes()] == [ours.id]
    for volume_id in (other_tenant, other_portal):
        for action in (backend.attach_volume, backend.detach_volume, backend.delete_volume):
            with pytest.raises(VolumeError, match="not created by this portal"):
                action(volume_id)
        assert volume_id in fake.volumes
    assert "attachVolume" not in fake.requests and "deleteVolume" not in fake.requests


def test_a_name_taken_by_another_portal_is_refused_not_adopted(fake: FakeCloudStack) -> None:
    fake.add_foreign_volume("oma-vm-disk0", owner="oma-portal:someone-else")
    with pytest.raises(VolumeError, match="belongs to another portal"):
        backend_for(fake).create_volume("oma-vm-disk0", 1 << 30)
    assert "createVolume" not in fake.requests


def test_a_create_whose_tag_call_failed_is_adopted_and_tagged_on_retry(fake: FakeCloudStack) -> None:
    backend = backend_for(fake)
    fake.job_failures["createTags"] = (530, "tagging failed")
    with pytest.raises(VolumeError, match="createTags failed"):
        backend.create_volume("oma-vm-disk0", 1 << 30)
    (untagged,) = fake.volumes.values()
    assert untagged["tags"] == []
    again = backend.create_volume("oma-vm-disk0", 1 << 30)
    assert again.id == untagged["id"] and fake.requests.count("createVolume") == 1
    assert [v.id for v in backend.list_volumes()] == [again.id]
