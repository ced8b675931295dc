"""The local volume backend: sparse files, idempotent create/attach, loop devices when root."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from migrations_app.volumes import GIB, LocalVolumeBackend, VolumeError, round_up_gib


def test_sizes_round_up_to_whole_gib() -> None:
    assert round_up_gib(1) == GIB
    assert round_up_gib(GIB) == GIB
    assert round_up_gib(GIB + 1) == 2 * GIB
    with pytest.raises(VolumeError):
        round_up_gib(0)


def test_create_is_sparse_and_idempotent_by_name(tmp_path: Path) -> None:
    backend = LocalVolumeBackend(tmp_path)
    first = backend.create_volume("oma-vm1-disk0", 3 * GIB - 5)
    again = backend.create_volume("oma-vm1-disk0", 3 * GIB - 5)
    assert again.id == first.id and first.size_bytes == 3 * GIB
    image = backend.image_path(first.id)
    assert image.stat().st_size == 3 * GIB
    assert image.stat().st_blocks * 512 < 1 << 20, "volumes must be sparse"
    assert [v.id for v in backend.list_volumes()] == [first.id]


def test_a_volume_is_found_by_its_name_without_reading_every_volume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fleet's root holds hundreds of volumes, and every new one is looked up by name first (under the
    lock every attach and detach also takes): through the name index, not a read of them all."""
    backend = LocalVolumeBackend(tmp_path)
    made = {f"oma-vm{n}-disk0": backend.create_volume(f"oma-vm{n}-disk0", GIB).id for n in range(20)}

    def every_volume() -> None:
        raise AssertionError("every volume's metadata was read")

    monkeypatch.setattr(backend, "list_volumes", every_volume)
    assert backend.create_volume("oma-vm7-disk0", GIB).id == made["oma-vm7-disk0"]
    found = backend.find_volume("oma-vm3-disk0")
    assert found is not None and found.id == made["oma-vm3-disk0"]
    new = backend.create_volume("oma-vm20-disk0", GIB)
    assert new.id not in made.values()
    assert backend.find_volume("oma-vm99-disk0") is None
    # Deleted: the name is free again.
    backend.delete_volume(made["oma-vm3-disk0"])
    assert backend.find_volume("oma-vm3-disk0") is None
    assert backend.create_volume("oma-vm3-disk0", GIB).id != made["oma-vm3-disk0"]


def test_a_root_made_before_the_name_index_keeps_its_names(tmp_path: Path) -> None:
    """Volumes made before the index (or an index lost) are indexed from their metadata on first use:
    creating one of their names again returns the volume, never a second one."""
    backend = LocalVolumeBackend(tmp_path)
    old = backend.create_volume("oma-vm1-disk0", GIB)
    backend.create_volume("oma-vm2-disk0", GIB)
    shutil.rmtree(tmp_path / "names")
    # A metadata file whose name would make a path (not one this backend writes) is left out of the index.
    (tmp_path / f"{uuid.uuid4()}.json").write_text(
        json.dumps({"id": str(uuid.uuid4()), "name": "../../x", "size_bytes": GIB})
    )
    again = LocalVolumeBackend(tmp_path)
    assert again.create_volume("oma-vm1-disk0", GIB).id == old.id
    assert sorted(p.name for p in (tmp_path / "names").iterdir()) == ["oma-vm1-disk0.id", "oma-vm2-disk0.id"]
    assert not (tmp_path.parent / "x.id").exists()
    assert sorted(v.name for v in again.list_volumes()) == ["../../x", "oma-vm1-disk0", "oma-vm2-disk0"]
    # An entry naming a volume whose files were removed by hand is not believed.
    again.image_path(old.id).unlink()
    again._meta_path(old.id).unlink()
    assert again.find_volume("oma-vm1-disk0") is None
    assert again.create_volume("oma-vm1-disk0", GIB).id != old.id


def test_existing_smaller_volume_is_an_error(tmp_path: Path) -> None:
    backend = LocalVolumeBackend(tmp_path)
    backend.create_volume("v", GIB)
    with pytest.raises(VolumeError, match="fewer than"):
        backend.create_volume("v", 2 * GIB)


@pytest.mark.parametrize("name", ["", "a/b", "../x", "x\n", "é", "a" * 129])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(VolumeError):
        LocalVolumeBackend(tmp_path).create_volume(name, GIB)
    assert not list(tmp_path.glob("*.img"))


def test_attach_detach_delete_without_loop(tmp_path: Path) -> None:
    backend = LocalVolumeBackend(tmp_path)
    volume = backend.create_volume("v", GIB)
    device = backend.attach_volume(volume.id)
    # Like KVM's /dev/disk/by-id/virtio-<serial>: a stable link that shows while attached.
    assert device == str(tmp_path / "by-id" / f"virtio-{volume.id.replace('-', '')[:20]}")
    assert device == backend.attach_volume(volume.id)
    assert os.path.realpath(device) == str(backend.image_path(volume.id))
    with pytest.raises(VolumeError, match="detach it first"):
        backend.delete_volume(volume.id)
    backend.detach_volume(volume.id)
    assert not os.path.lexists(device)
    backend.detach_volume(volume.id)
    assert backend.attach_volume(volume.id) == device  # attached again: the same device path
    backend.detach_volume(volume.id)
    backend.delete_volume(volume.id)
    backend.delete_volume(volume.id)
    assert backend.list_volumes() == [] and not list(tmp_path.glob("*.img"))


def test_nodes_sharing_a_root_attach_a_volume_one_at_a_time(tmp_path: Path) -> None:
    """Two OMA nodes on one volume root, each with its own by-id folder: a volume attached to one is
    refused to the other (and to its plain detach) until it is taken from the lost node."""
    a = LocalVolumeBackend(tmp_path, node="node-a", device_root=tmp_path / "by-id-a")
    b = LocalVolumeBackend(tmp_path, node="node-b", device_root=tmp_path / "by-id-b")
    volume = a.create_volume("v", GIB)
    on_a = a.attach_volume(volume.id)
    assert Path(on_a).parent == tmp_path / "by-id-a" and a.get_volume(volume.id).attached_node == "node-a"  # type: ignore[union-attr]
    with pytest.raises(VolumeError, match="attached to OMA node node-a; detach it there first"):
        b.attach_volume(volume.id)
    with pytest.raises(VolumeError, match="attached to OMA node node-a; not detaching"):
        b.detach_volume(volume.id)
    b.detach_from_node(volume.id, "node-c", "")  # not attached there: nothing happens
    assert os.path.lexists(on_a)
    b.detach_from_node(volume.id, "node-a", "")
    assert not os.path.lexists(on_a) and a.get_volume(volume.id).attached_node == ""  # type: ignore[union-attr]
    on_b = b.attach_volume(volume.id)
    assert Path(on_b).parent == tmp_path / "by-id-b" and os.path.realpath(on_b) == str(b.image_path(volume.id))
    b.detach_from_node(volume.id, "node-b", "")
    assert not os.path.lexists(on_b)


def test_unknown_or_malformed_ids_are_errors(tmp_path: Path) -> None:
    backend = LocalVolumeBackend(tmp_path)
    with pytest.raises(VolumeError, match="not a volume id"):
        backend.attach_volume("../../etc/passwd")
    with pytest.raises(VolumeError, match="no volume"):
        backend.attach_volume("00000000-0000-4000-8000-000000000000")


def test_loop_attach_gives_a_block_device_with_the_volume_data(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("loop devices need root")
    backend = LocalVolumeBackend(tmp_path, loop=True)
    volume = backend.create_volume("v", GIB)
    with open(backend.image_path(volume.id), "r+b") as fh:
        fh.write(b"volume-bytes")
    try:
        device = backend.attach_volume(volume.id)
    except VolumeError as exc:
        pytest.skip(f"loop devices unavailable here: {exc}")
    try:
        assert device.startswith("/dev/loop") and backend.attach_volume(volume.id) == device
        with open(device, "rb") as fh:
            assert fh.read(12) == b"volume-bytes"
    finally:
        backend.detach_volume(volume.id)
    listed = subprocess.run(["losetup", "-j", str(backend.image_path(volume.id))], capture_output=True, text=True)
    assert listed.stdout.strip() == ""
