"""check_nbd_server against real NBD servers: restarts, crashes and repairs are seen and recorded."""

from __future__ import annotations

import os
import signal
import time

import pytest

from exports import actions
from exports.health import check_nbd_server
from exports.models import NbdServerState
from tests.support.nbd import RunningServer

VM = "4210aaaa-bbbb-4ccc-8ddd-eeeeffff0000"
pytestmark = pytest.mark.django_db(transaction=True)


def ensure(server: RunningServer, device: str) -> None:
    actions.ensure_export(vm_id=VM, vm_name="web-01", disk_unit=0, device=device)


def test_check_detects_a_restart_made_outside_the_portal(nbd_server: RunningServer) -> None:
    ensure(nbd_server, nbd_server.volume("a.img"))
    check_nbd_server()
    assert nbd_server.helper("restart").returncode == 0
    check = check_nbd_server()
    assert any("restarted outside the portal" in i for i in check.incidents)
    assert NbdServerState.objects.get().restarts_detected == 1
    assert check.missing == [] and check.health == "ok"


def test_check_with_repair_starts_a_dead_server(nbd_server: RunningServer) -> None:
    ensure(nbd_server, nbd_server.volume("a.img"))
    check_nbd_server()
    os.kill(nbd_server.main_pid(), signal.SIGKILL)
    time.sleep(0.2)
    down = check_nbd_server()
    assert down.health == "down"
    repaired = check_nbd_server(repair=True)
    assert repaired.health == "ok" and repaired.missing == []
    assert NbdServerState.objects.get().crashes_detected >= 1


def test_nbd_server_version_warning_is_plain(nbdserver_server: RunningServer) -> None:
    check = check_nbd_server()
    if check.version != "3.24":
        pytest.skip(f"nbd-server {check.version} is not the known-bad 3.24")
    assert any("corrupts its memory on reload" in w and "nbdkit" in w for w in check.warnings)


def test_a_plain_data_path_is_a_warning_and_tls_is_not(nbd_server: RunningServer) -> None:
    warned = any("data path is plain" in w for w in check_nbd_server().warnings)
    assert warned == (not nbd_server.layout.tls)
