"""The portal's export name and device rules agree with the privileged helper's, string for string:
the portal never offers the helper a request it will refuse for its syntax, and the helper accepts no
name or device the portal could not have produced."""

from __future__ import annotations

import random
import string
import uuid
from typing import Any

import pytest
from django.core.exceptions import ValidationError

from exports.models import MAX_DISK_UNIT, export_name_for, normalize_vm_id, validate_device_path, validate_disk_unit
from tests.support.nbd import load_helper_module

HELPER: Any = load_helper_module()


def portal_accepts_device(device: str) -> bool:
    try:
        validate_device_path(device)
    except ValidationError:
        return False
    return True


def helper_accepts_device(device: str) -> bool:
    try:
        HELPER.check_device_syntax(device)
    except HELPER.HelperError:
        return False
    return True


def helper_accepts_name(name: str) -> bool:
    try:
        HELPER.validate_name(name)
    except HELPER.HelperError:
        return False
    return True


DEVICES = [
    "/dev/disk/by-id/virtio-0123456789abcdef0123",
    "/dev//vdb",
    "/dev/./vdb",
    "/dev/vdb/",
    "/dev/vdb/.",
    "//dev/vdb",
    "/var/lib/oma/vol/v1.img",
    "/var/lib/oma/vol/./v1.img",
    "/var/lib/oma/vol//v1.img",
    "/dev/vdb",
    "/var/lib/oma/volumes/web-01-0.img",
    "/dev/disk/by-id/virtio-a b",
    "/dev/../etc/shadow",
    "/dev/vdb\n[export]",
    "/dev/vdb]",
    "/dev/vdb=1",
    "/dev/vdb\x00",
    "/dev/vdb%20",
    "/dev/vdb#x",
    "/dev/vdé",
    "relative/path",
    "",
    "/",
    "/" + "a" * 254,
    "/" + "a" * 255,
    "/dev/disk/by-path/pci-0000:00:05.0",
    "/dev/mapper/vg-lv+snap@1",
]


def random_devices(count: int) -> list[str]:
    alphabet = string.ascii_letters + string.digits + "._/+:@-" + " \t\n[]=%#$&;'\"\\é\x00"
    rng = random.Random(20261127)  # noqa: S311 - a fixed corpus, not a secret
    return ["/" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(count)]


@pytest.mark.parametrize("device", DEVICES + random_devices(500))
def test_device_syntax_agrees(device: str) -> None:
    assert portal_accepts_device(device) == helper_accepts_device(device), repr(device)


def test_the_corpus_has_both_kinds() -> None:
    verdicts = {portal_accepts_device(d) for d in DEVICES + random_devices(500)}
    assert verdicts == {True, False}


def test_every_name_the_portal_makes_is_one_the_helper_accepts() -> None:
    for unit in range(MAX_DISK_UNIT + 1):
        vm = str(uuid.uuid4())
        for spelling in (vm, vm.upper(), uuid.UUID(vm).hex):
            assert helper_accepts_name(export_name_for(spelling, unit))


@pytest.mark.parametrize(
    ("name", "accepted"),
    [
        ("migration-vm-4210aaaa-bbbb-4ccc-8ddd-eeeeffff0000-disk0", True),
        ("migration-vm-4210aaaa-bbbb-4ccc-8ddd-eeeeffff0000-disk63", True),
        ("migration-vm-4210aaaa-bbbb-4ccc-8ddd-eeeeffff0000-disk64", False),
        ("migration-vm-4210aaaa-bbbb-4ccc-8ddd-eeeeffff0000-disk07", False),
        ("migration-vm-4210AAAA-bbbb-4ccc-8ddd-eeeeffff0000-disk0", False),
        ("migration-vm-4210aaaabbbb4ccc8dddeeeeffff0000-disk0", False),
        ("migration-vm-4210aaaa-bbbb-4ccc-8ddd-eeeeffff0000-disk0.conf", False),
        ("../migration-vm-4210aaaa-bbbb-4ccc-8ddd-eeeeffff0000-disk0", False),
        ("oma-health", False),
    ],
)
def test_the_helper_accepts_only_names_the_portal_could_make(name: str, accepted: bool) -> None:
    """A name the helper takes parses back into a VM id and unit that the portal turns into that name."""
    assert helper_accepts_name(name) == accepted
    if not accepted:
        return
    body = name.removeprefix("migration-vm-")
    vm_id, _, unit = body.rpartition("-disk")
    try:
        normalized = normalize_vm_id(vm_id)
        validate_disk_unit(int(unit))
    except (ValidationError, ValueError) as exc:
        raise AssertionError(f"the helper accepts {name!r}, which the portal cannot make") from exc
    assert export_name_for(normalized, int(unit)) == name
