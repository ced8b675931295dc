"""ensure_export and retire_export against real NBD servers through the real helper."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from django.db import connection

from exports import actions
from exports.models import ExportEvent, NbdServerState, VMExportMapping
from tests.support.nbd import RunningServer

VM = "4210aaaa-bbbb-4ccc-8ddd-eeeeffff0000"
NAME0 = f"migration-vm-{VM}-disk0"

pytestmark = pytest.mark.django_db(transaction=True)


def ensure(server: RunningServer, device: str, disk: int = 0, vm: str = VM) -> VMExportMapping:
    return actions.ensure_export(vm_id=vm, vm_name="web-01", disk_unit=disk, device=device)


def reloads() -> int:
    state = NbdServerState.objects.first()
    return state.reload_count if state else 0


def read_export(server: RunningServer, name: str, length: int) -> bytearray:
    with server.connect() as conn:
        conn.open(name)
        return conn.pread(0, length)


def test_new_export_is_served_before_ensure_returns(nbd_server: RunningServer) -> None:
    device = nbd_server.volume("a.img", fill=b"disk-a")
    mapping = ensure(nbd_server, device)
    assert mapping.export_name == NAME0
    assert mapping.status == VMExportMapping.Status.ACTIVE
    assert NAME0 in nbd_server.list_exports()
    assert read_export(nbd_server, NAME0, 6) == b"disk-a"
    assert os.readlink(nbd_server.layout.export_root / NAME0) == device
    assert ExportEvent.objects.filter(kind="export.created", export_name=NAME0).count() == 1
    assert reloads() == (1 if nbd_server.backend == "nbd-server" else 0)


def test_reuse_calls_no_helper_and_reloads_nothing(nbd_server: RunningServer) -> None:
    device = nbd_server.volume("a.img")
    ensure(nbd_server, device)
    calls_before, reloads_before, pid_before = nbd_server.helper_calls(), reloads(), nbd_server.main_pid()
    again = ensure(nbd_server, device)
    assert again.export_name == NAME0 and again.last_used_at is not None
    assert nbd_server.helper_calls() == calls_before
    assert reloads() == reloads_before
    assert nbd_server.main_pid() == pid_before


def test_retarget_replaces_the_link_without_reload(nbd_server: RunningServer) -> None:
    ensure(nbd_server, nbd_server.volume("old.img", fill=b"old-volume"))
    reloads_before, pid_before = reloads(), nbd_server.main_pid()
    new = nbd_server.volume("new.img", fill=b"new-volume")
    mapping = ensure(nbd_server, new)
    assert mapping.device_path == new and mapping.export_name == NAME0
    assert read_export(nbd_server, NAME0, 10) == b"new-volume"
    assert reloads() == reloads_before and nbd_server.main_pid() == pid_before
    assert ExportEvent.objects.filter(kind="export.retargeted", export_name=NAME0).exists()


def test_second_disk_of_same_vm_gets_its_own_name(nbd_server: RunningServer) -> None:
    first = ensure(nbd_server, nbd_server.volume("d0.img"), disk=0)
    second = ensure(nbd_server, nbd_server.volume("d1.img"), disk=1)
    assert {first.export_name, second.export_name} == {NAME0, f"migration-vm-{VM}-disk1"}
    served = set(nbd_server.list_exports())
    assert {first.export_name, second.export_name} <= served


def test_device_already_exported_for_another_disk_is_a_conflict(nbd_server: RunningServer) -> None:
    device = nbd_server.volume("shared.img")
    ensure(nbd_server, device, disk=0)
    before = nbd_server.snapshot()
    with pytest.raises(actions.ExportConflict, match="already exported as"):
        ensure(nbd_server, device, disk=1)
    assert VMExportMapping.objects.count() == 1
    assert nbd_server.snapshot() == before


@pytest.mark.parametrize(
    ("vm", "disk", "device", "message"),
    [
        ("not-a-uuid", 0, "/dev/vdb", "not a VMware instance UUID"),
        (VM, 64, "/dev/vdb", "from 0 to 63"),
        (VM, 0, "/dev/vdb\n[evil]", "must be an absolute path"),
        (VM, 0, "/dev/../etc/shadow", "must be an absolute path"),
    ],
)
def test_invalid_requests_are_refused_before_anything_runs(
    nbd_server: RunningServer, vm: str, disk: int, device: str, message: str
) -> None:
    with pytest.raises(actions.ExportRefused, match=message):
        actions.ensure_export(vm_id=vm, vm_name="x", disk_unit=disk, device=device)
    assert nbd_server.helper_calls() == []
    assert not VMExportMapping.objects.exists()


def test_device_refused_by_the_helper_leaves_no_row_and_no_link(nbd_server: RunningServer) -> None:
    before = nbd_server.snapshot()
    with pytest.raises(actions.ExportRefused, match="outside the volume root"):
        ensure(nbd_server, "/etc/shadow")
    assert not VMExportMapping.objects.exists()
    assert nbd_server.snapshot() == before


def test_vm_id_is_normalised_to_lower_case(nbd_server: RunningServer) -> None:
    mapping = ensure(nbd_server, nbd_server.volume("a.img"), vm=VM.upper())
    assert mapping.vm_id == VM and mapping.export_name == NAME0


def test_retire_removes_the_link_and_reactivation_restores_it(nbd_server: RunningServer) -> None:
    device = nbd_server.volume("a.img")
    ensure(nbd_server, device)
    retired = actions.retire_export(vm_id=VM, disk_unit=0)
    assert retired.status == VMExportMapping.Status.RETIRED
    assert not (nbd_server.layout.export_root / NAME0).is_symlink()
    assert os.path.exists(device), "retiring never deletes the volume"
    back = ensure(nbd_server, device)
    assert back.status == VMExportMapping.Status.ACTIVE and back.pk == retired.pk
    assert ExportEvent.objects.filter(kind="export.reactivated").count() == 1


def test_retired_device_can_be_used_by_another_disk(nbd_server: RunningServer) -> None:
    device = nbd_server.volume("a.img")
    ensure(nbd_server, device, disk=0)
    actions.retire_export(vm_id=VM, disk_unit=0)
    assert ensure(nbd_server, device, disk=1).export_name.endswith("disk1")


def test_twenty_concurrent_callers_make_one_mapping_and_one_link(nbd_server: RunningServer) -> None:
    device = nbd_server.volume("a.img")
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(20)

    def call() -> None:
        try:
            barrier.wait()
            results.append(ensure(nbd_server, device).export_name)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=call) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [NAME0] * 20
    assert VMExportMapping.objects.count() == 1
    assert [p.name for p in nbd_server.layout.export_root.iterdir()] == [NAME0]
    links = nbd_server.helper_calls().count("link")
    # nbd-server callers that arrive before the first reload finishes repeat an idempotent link.
    assert links == 1 if nbd_server.backend == "nbdkit" else 1 <= links <= 20
    assert ExportEvent.objects.filter(kind="export.created").count() == 1
    assert not ExportEvent.objects.filter(kind__in=["export.relinked", "export.retargeted"]).exists()
    if nbd_server.backend == "nbd-server":
        assert sorted(p.name for p in nbd_server.layout.confd.iterdir()) == [f"{NAME0}.conf"]


def test_many_new_exports_share_few_reloads(nbdserver_server: RunningServer) -> None:
    devices = [nbdserver_server.volume(f"v{i}.img") for i in range(12)]
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            vm = f"4210aaaa-bbbb-4ccc-8ddd-{i:012x}"
            actions.ensure_export(vm_id=vm, vm_name=f"vm{i}", disk_unit=0, device=devices[i])
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    served = set(nbdserver_server.list_exports())
    assert {m.export_name for m in VMExportMapping.objects.all()} <= served
    assert 1 <= reloads() < 12, "reloads must be coalesced"


def test_crashed_nbd_server_is_detected_and_repaired_on_next_export(nbdserver_server: RunningServer) -> None:
    first = ensure(nbdserver_server, nbdserver_server.volume("a.img"), disk=0)
    old_pid = nbdserver_server.main_pid()
    os.kill(old_pid, signal.SIGKILL)
    time.sleep(0.2)
    second = ensure(nbdserver_server, nbdserver_server.volume("b.img"), disk=1)
    served = set(nbdserver_server.list_exports())
    assert {first.export_name, second.export_name} <= served
    state = NbdServerState.objects.get()
    assert state.crashes_detected >= 1 and state.repairs >= 1
    assert nbdserver_server.main_pid() != old_pid
    assert ExportEvent.objects.filter(kind="server.crash").exists()


def test_a_vms_disks_together_share_one_reload(nbdserver_server: RunningServer) -> None:
    requests = [actions.ExportRequest(VM, "web-01", d, nbdserver_server.volume(f"d{d}.img")) for d in range(3)]
    mappings = actions.ensure_exports(requests)
    assert [m.export_name for m in mappings] == [f"migration-vm-{VM}-disk{d}" for d in range(3)]
    assert all(m.status == VMExportMapping.Status.ACTIVE for m in mappings)
    assert reloads() == 1
    assert nbdserver_server.helper_calls().count("link") == 1
    assert {m.export_name for m in mappings} <= set(nbdserver_server.list_exports())


def test_a_batch_answers_in_request_order(nbd_server: RunningServer) -> None:
    requests = [actions.ExportRequest(VM, "web-01", d, nbd_server.volume(f"d{d}.img")) for d in (2, 0, 1)]
    mappings = actions.ensure_exports(requests)
    assert [(m.disk_unit_number, m.device_path) for m in mappings] == [(r.disk_unit, r.device) for r in requests]
    assert nbd_server.helper_calls().count("link") == 1


def test_a_batch_the_helper_refuses_leaves_no_row_and_no_link(nbd_server: RunningServer, tmp_path: Path) -> None:
    outside = tmp_path / "outside.img"
    outside.write_bytes(b"x" * 4096)
    good = actions.ExportRequest(VM, "web-01", 0, nbd_server.volume("d0.img"))
    with pytest.raises(actions.ExportRefused):
        actions.ensure_exports([good, actions.ExportRequest(VM, "web-01", 1, str(outside))])
    assert not VMExportMapping.objects.exists()
    assert not any(nbd_server.layout.export_root.iterdir()) and not any(nbd_server.layout.confd.iterdir())


def test_a_batch_with_one_bad_disk_changes_nothing(nbd_server: RunningServer) -> None:
    good = actions.ExportRequest(VM, "web-01", 0, nbd_server.volume("d0.img"))
    for bad in (
        actions.ExportRequest(VM, "web-01", 1, "/dev/vdb\n"),
        actions.ExportRequest(VM, "web-01", 1, good.device),
    ):
        with pytest.raises(actions.ExportError):
            actions.ensure_exports([good, bad])
    assert not VMExportMapping.objects.exists()
    assert not any(nbd_server.layout.export_root.iterdir()) and not any(nbd_server.layout.confd.iterdir())
    assert nbd_server.helper_calls() == []


def test_a_batch_mixes_reuse_and_new_exports(nbd_server: RunningServer) -> None:
    first = ensure(nbd_server, nbd_server.volume("d0.img"), disk=0)
    calls = len(nbd_server.helper_calls())
    both = actions.ensure_exports(
        [
            actions.ExportRequest(VM, "web-01", 0, first.device_path),
            actions.ExportRequest(VM, "web-01", 1, nbd_server.volume("d1.img")),
        ]
    )
    assert [m.export_name for m in both] == [NAME0, f"migration-vm-{VM}-disk1"]
    new_calls = nbd_server.helper_calls()[calls:]
    assert new_calls.count("link") == 1, new_calls


def test_an_export_that_fails_to_open_once_is_tried_again_before_it_counts_as_lost(
    nbd_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One failed connection on a loaded machine is not a lost export: with a settle time the check
    opens it again; without one (a quick probe) the failure counts."""
    from exports.backends import get_backend
    from exports.nbd_protocol import NbdConnectionLost

    device = nbd_server.volume("v0.img", size=1 << 20)
    mapping = actions.ensure_export(vm_id=VM, vm_name="vm", disk_unit=0, device=device)
    backend = get_backend()
    real = backend.export_size
    failures = {"left": 0}

    def flaky(name: str) -> int:
        if failures["left"]:
            failures["left"] -= 1
            raise NbdConnectionLost("connection closed after 0 of 20 bytes")
        return real(name)

    monkeypatch.setattr(backend, "export_size", flaky)
    failures["left"] = 1
    assert backend.unopenable({mapping.export_name}) == {mapping.export_name}
    failures["left"] = 1
    assert backend.unopenable({mapping.export_name}, settle=1.0) == set()
    failures["left"] = 10**6  # it really does not open: still reported, after trying more than once
    assert backend.unopenable({mapping.export_name}, settle=0.3) == {mapping.export_name}
    assert 10**6 - failures["left"] > 1


def test_a_server_that_breaks_after_its_reload_checks_is_restarted_by_the_last_check(
    nbdserver_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nbd-server 3.24 can pass a reload's own checks, then keep listing every name while its children
    drop every open (caught by the export storm). The last check restarts the main process once, and
    the export opens from the fresh one."""
    from exports.backends import get_backend
    from exports.nbd_protocol import NbdConnectionLost
    from exports.nbd_servers import NbdServerBackend, ServeReport

    mapping = ensure(nbdserver_server, nbdserver_server.volume("a.img", fill=b"disk-a"))
    backend = get_backend()
    assert isinstance(backend, NbdServerBackend)
    broken_pid = nbdserver_server.main_pid()
    real = backend.export_size

    def children_of_the_broken_main_drop_opens(name: str) -> int:
        if nbdserver_server.main_pid() == broken_pid:
            raise NbdConnectionLost("connection closed after 0 of 20 bytes")
        return real(name)

    monkeypatch.setattr(backend, "export_size", children_of_the_broken_main_drop_opens)
    report = ServeReport()
    assert backend._served_or_repaired({mapping.export_name}, 2.0, report) == set()
    assert report.repairs == 1 and report.lost == [mapping.export_name]
    assert nbdserver_server.main_pid() != broken_pid
    assert read_export(nbdserver_server, mapping.export_name, 6) == b"disk-a"


def test_a_server_that_died_after_its_reload_checks_is_started_and_counted_as_a_crash(
    nbdserver_server: RunningServer,
) -> None:
    """A main process that dies after a reload's checks passed (3.24 can crash on a later connection)
    is started again by the last check at once, and reported as the crash it was, not as lost exports."""
    from exports.backends import get_backend
    from exports.nbd_servers import NbdServerBackend, ServeReport

    mapping = ensure(nbdserver_server, nbdserver_server.volume("a.img", fill=b"disk-a"))
    backend = get_backend()
    assert isinstance(backend, NbdServerBackend)
    dead_pid = nbdserver_server.main_pid()
    os.kill(dead_pid, signal.SIGKILL)
    report = ServeReport()
    assert backend._served_or_repaired({mapping.export_name}, 60.0, report) == set()
    assert report.crashes == 1 and report.lost == [], vars(report)
    assert [kind for kind, _ in report.incidents] == ["server.crash"]
    assert nbdserver_server.main_pid() != dead_pid
    assert read_export(nbdserver_server, mapping.export_name, 6) == b"disk-a"
