"""Management commands, run in-process through call_command against real servers."""

from __future__ import annotations

import io
import json
import os

import pytest
from django.core.management import CommandError, call_command

from exports import actions
from exports.models import VMExportMapping
from tests.support.nbd import RunningServer

VM = "4210aaaa-bbbb-4ccc-8ddd-eeeeffff0000"
NAME0 = f"migration-vm-{VM}-disk0"

pytestmark = pytest.mark.django_db(transaction=True)


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_ensure_export_command_prints_the_served_name(nbd_server: RunningServer) -> None:
    device = nbd_server.volume("a.img")
    out = run("ensure_export", "--vm-id", VM, "--vm-name", "web", "--disk", "0", "--device", device)
    assert out.strip() == NAME0
    assert VMExportMapping.objects.get().status == VMExportMapping.Status.ACTIVE


def test_ensure_export_command_refuses_bad_device_clearly(nbd_server: RunningServer) -> None:
    with pytest.raises(CommandError, match="outside the volume root"):
        run("ensure_export", "--vm-id", VM, "--vm-name", "web", "--disk", "0", "--device", "/etc/passwd")
    assert not VMExportMapping.objects.exists()


def test_retire_export_command(nbd_server: RunningServer) -> None:
    actions.ensure_export(vm_id=VM, vm_name="web", disk_unit=0, device=nbd_server.volume("a.img"))
    assert run("retire_export", "--vm-id", VM, "--disk", "0").strip() == f"retired {NAME0}"
    with pytest.raises(CommandError, match="no export mapping"):
        run("retire_export", "--vm-id", VM, "--disk", "5")


def status(*args: str) -> tuple[int, str]:
    """nbd_status's exit code (monitoring-plugin style) and what it printed."""
    out = io.StringIO()
    with pytest.raises(SystemExit) as exited:
        call_command("nbd_status", *args, stdout=out, stderr=io.StringIO())
    return int(exited.value.code or 0), out.getvalue()


def test_nbd_status_exit_code_says_healthy_degraded_or_down(nbd_server: RunningServer) -> None:
    actions.ensure_export(vm_id=VM, vm_name="web", disk_unit=0, device=nbd_server.volume("a.img"))
    assert status()[0] == 0
    # The export's link goes behind the portal's back: not served any more.
    nbd_server.helper("unlink", NAME0)
    if nbd_server.backend == "nbd-server":
        assert nbd_server.helper("restart").returncode == 0  # nbd-server only drops an export on restart
    code, out = status()
    assert code == 1 and f"missing: {NAME0}" in out
    assert nbd_server.helper("stop").returncode == 0
    assert status()[0] == 2


def test_nbd_status_json_reports_served_and_expected(nbd_server: RunningServer) -> None:
    actions.ensure_export(vm_id=VM, vm_name="web", disk_unit=0, device=nbd_server.volume("a.img"))
    code, out = status("--json")
    data = json.loads(out)
    assert code == 0
    assert data["backend"] == nbd_server.backend
    assert data["health"] == "ok"
    assert data["pid"] == nbd_server.main_pid()
    assert data["expected"] == [NAME0] and data["served"] == [NAME0] and data["missing"] == []


def test_reconcile_is_clean_when_everything_agrees(nbd_server: RunningServer) -> None:
    actions.ensure_export(vm_id=VM, vm_name="web", disk_unit=0, device=nbd_server.volume("a.img"))
    data = json.loads(run("reconcile_exports", "--json"))
    assert data["clean"] is True


def test_reconcile_finds_and_fixes_a_missing_link(nbd_server: RunningServer) -> None:
    device = nbd_server.volume("a.img")
    actions.ensure_export(vm_id=VM, vm_name="web", disk_unit=0, device=device)
    os.unlink(nbd_server.layout.export_root / NAME0)  # someone removed the link by hand
    with pytest.raises(SystemExit) as exc:
        run("reconcile_exports", "--json")
    assert exc.value.code == 1
    data = json.loads(run("reconcile_exports", "--fix", "--json"))
    assert data["missing_link"] == [NAME0] and data["fixed"] == [f"republished {NAME0}"]
    assert os.readlink(nbd_server.layout.export_root / NAME0) == device
    assert json.loads(run("reconcile_exports", "--json"))["clean"] is True


def test_reconcile_fixes_a_link_pointing_at_the_wrong_device(nbd_server: RunningServer) -> None:
    device = nbd_server.volume("a.img")
    actions.ensure_export(vm_id=VM, vm_name="web", disk_unit=0, device=device)
    wrong = nbd_server.volume("b.img")
    assert nbd_server.helper("link", NAME0, wrong).returncode == 0
    data = json.loads(run("reconcile_exports", "--fix", "--json"))
    assert data["wrong_link"] and data["fixed"] == [f"republished {NAME0}"]
    assert os.readlink(nbd_server.layout.export_root / NAME0) == device


def test_reconcile_reports_but_keeps_an_orphaned_link(nbd_server: RunningServer) -> None:
    orphan = f"migration-vm-{VM[:-1]}1-disk3"
    assert nbd_server.helper("link", orphan, nbd_server.volume("o.img")).returncode == 0
    with pytest.raises(SystemExit):
        run("reconcile_exports", "--fix", "--json")
    assert (nbd_server.layout.export_root / orphan).is_symlink()


def test_reconcile_removes_the_link_of_a_retired_mapping(nbd_server: RunningServer) -> None:
    device = nbd_server.volume("a.img")
    actions.ensure_export(vm_id=VM, vm_name="web", disk_unit=0, device=device)
    actions.retire_export(vm_id=VM, disk_unit=0)
    assert nbd_server.helper("link", NAME0, device).returncode == 0  # brought back by hand
    data = json.loads(run("reconcile_exports", "--fix", "--json"))  # fixed everything: exit 0
    assert data["retired_but_linked"] == [NAME0]
    assert f"removed link of retired {NAME0}" in data["fixed"]
    assert not (nbd_server.layout.export_root / NAME0).is_symlink()
