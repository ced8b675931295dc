"""The VMA client against the simulator, which moves real bytes into real NBD exports."""

from __future__ import annotations

import http.client
import json
import time
from typing import TYPE_CHECKING, Any

import pytest

from devtools.vma_sim import Faults
from migrations_app.vma_client import ReplicationTarget, VmaClient, VmaError, VmaUnavailable
from tests.support.nbd import RunningServer
from tests.support.vma import TOKEN, Sim, export_disks, sha, wait_done

if TYPE_CHECKING:
    from tests.support.vma import SimFactory

pytestmark = pytest.mark.django_db(transaction=True)


def test_health_and_inventory(sim: Sim) -> None:
    assert sim.client.health()["status"] == "ok"
    inventory = sim.client.inventory()
    assert [vm["name"] for vm in inventory] == ["web-01", "db-01", "app-01", "file-01"]
    assert {len(vm["disks"]) for vm in inventory} == {1, 2, 3}
    assert inventory[1]["disks"][1]["capacity_bytes"] == 16 << 20


def test_wrong_token_is_refused(sim: Sim) -> None:
    with pytest.raises(VmaError) as exc:
        VmaClient(sim.url, "wrong").inventory()
    assert exc.value.status == 401 and exc.value.code == "unauthorized"


def test_unreachable_vma_is_a_clear_error(sim: Sim) -> None:
    sim.close()
    with pytest.raises(VmaUnavailable):
        VmaClient(sim.url, TOKEN, timeout=1, retries=1).health()


def test_the_simulator_keeps_connections_open_and_going_offline_cuts_them(sim: Sim) -> None:
    """Keep-alive, as a real agent's server: two calls on one connection. Going offline cuts the open
    connection too, or a client that had one would still reach a VMA that is gone."""
    conn = http.client.HTTPConnection("127.0.0.1", sim.server.server_address[1], timeout=5)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for _ in range(2):
        conn.request("GET", "/api/v1/health", headers=headers)
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["status"] == "ok"
        assert not response.will_close, "the connection stays open for the next call"
    sim.go_offline()
    conn.auto_open = 0  # no quiet reconnect: the open connection itself must be cut
    with pytest.raises((http.client.HTTPException, OSError)):
        conn.request("GET", "/api/v1/health", headers=headers)
        conn.getresponse().read()
    conn.close()


def test_full_copy_moves_every_byte(nbdkit_server: RunningServer, sim: Sim) -> None:
    vm = sim.vm("db-01")
    disks = export_disks(nbdkit_server, vm, sim)
    started = sim.client.start_replication("job-1", vm.id, disks)
    assert started["state"] == "running"
    done = wait_done(sim.client, "job-1")
    assert done["state"] == "completed", done
    for disk, sent in zip(vm.disks, disks, strict=True):
        assert sha(sent["device"]) == sha(disk.image)
    assert all(d["bytes_done"] == d["bytes_total"] == 16 << 20 and d["change_id"] for d in done["disks"])


def test_starting_the_same_replication_twice_copies_once(nbdkit_server: RunningServer, sim: Sim) -> None:
    vm = sim.vm("web-01")
    disks = export_disks(nbdkit_server, vm, sim)
    sim.client.start_replication("job-2", vm.id, disks)
    again = sim.client.start_replication("job-2", vm.id, disks)
    assert again["replication_id"] == "job-2"
    assert len(sim.sim.replications) == 1
    wait_done(sim.client, "job-2")


def test_incremental_sync_writes_only_changed_blocks(nbdkit_server: RunningServer, sim: Sim) -> None:
    vm = sim.vm("web-01")
    disks = export_disks(nbdkit_server, vm, sim)
    sim.client.start_replication("job-full", vm.id, disks)
    first = wait_done(sim.client, "job-full")
    disks[0]["previous_change_id"] = first["disks"][0]["change_id"]
    sim.client.start_replication("job-incr", vm.id, disks)
    second = wait_done(sim.client, "job-incr")
    disk = second["disks"][0]
    assert second["state"] == "completed" and disk["mode"] == "incremental"
    assert 0 < disk["bytes_total"] < vm.disks[0].capacity_bytes // 4
    assert disk["change_id"] != first["disks"][0]["change_id"]
    assert sha(disks[0]["device"]) == sha(vm.disks[0].image), "destination must equal the changed source"


def test_unknown_change_id_falls_back_to_a_full_copy(nbdkit_server: RunningServer, sim: Sim) -> None:
    vm = sim.vm("web-01")
    disks = export_disks(nbdkit_server, vm, sim)
    disks[0]["previous_change_id"] = "sim:9999:3"
    sim.client.start_replication("job-x", vm.id, disks)
    done = wait_done(sim.client, "job-x")
    assert done["disks"][0]["mode"] == "full" and sha(disks[0]["device"]) == sha(vm.disks[0].image)


def test_cancel_stops_a_stalled_copy(nbdkit_server: RunningServer, make_sim: SimFactory) -> None:
    s = make_sim(Faults(stall=True))
    vm = s.vm("web-01")
    s.client.start_replication("job-c", vm.id, export_disks(nbdkit_server, vm, s))
    assert s.client.cancel("job-c")["state"] == "cancelling"
    assert wait_done(s.client, "job-c")["state"] == "cancelled"
    assert s.client.cancel("job-c")["state"] == "cancelled"  # idempotent


@pytest.mark.parametrize(
    ("faults", "message"),
    [(Faults(fail_at_percent=30), "injected failure at 30%"), (Faults(drop_at_percent=50), "dropped at 50%")],
)
def test_injected_faults_fail_the_replication(
    nbdkit_server: RunningServer, make_sim: SimFactory, faults: Faults, message: str
) -> None:
    s = make_sim(faults, size_mib=64)
    vm = s.vm("web-01")
    s.client.start_replication("job-f", vm.id, export_disks(nbdkit_server, vm, s))
    done = wait_done(s.client, "job-f")
    assert done["state"] == "failed" and message in done["error"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"replication_id": "a b", "vm_id": "x", "disks": []}, 400),
        ({"replication_id": "j", "vm_id": "no-such-vm", "disks": []}, 404),
    ],
)
def test_bad_requests_get_json_errors(sim: Sim, body: dict[str, Any], status: int) -> None:
    with pytest.raises(VmaError) as exc:
        sim.client.start_replication(body["replication_id"], body["vm_id"], body["disks"])
    assert exc.value.status == status and exc.value.message


def test_a_bad_nbd_url_is_refused(sim: Sim) -> None:
    vm = sim.vm("web-01")
    bad: list[ReplicationTarget] = [
        {"unit_number": 0, "nbd_url": "nbd://127.0.0.1:1/x; rm -rf /", "previous_change_id": ""}
    ]
    with pytest.raises(VmaError) as exc:
        sim.client.start_replication("job-bad", vm.id, bad)
    assert exc.value.status == 400 and not sim.sim.replications


def test_inventory_reports_what_failover_needs(sim: Sim) -> None:
    db = next(vm for vm in sim.client.inventory() if vm["name"] == "db-01")
    assert (db["cpus"], db["memory_mib"], db["firmware"], db["disk_controller"]) == (4, 8192, "bios", "pvscsi")
    assert [n["network"] for n in db["nics"]] == ["VM Network", "Storage"]
    assert len({n["mac"] for n in db["nics"]}) == 2
    assert all(n["mac"].startswith("00:50:56:") for n in db["nics"])


def test_a_guest_shutdown_flushes_its_last_writes_and_blocks_syncs_meanwhile(
    nbdkit_server: RunningServer, sim: Sim
) -> None:
    vm = sim.vm("web-01")
    vm.shutdown_seconds = 1.0
    generation = vm.disks[0].generation
    answer = sim.client.power(vm.id, "shutdown", timeout_seconds=30)
    assert answer["power_state"] == "shuttingDown"
    targets = export_disks(nbdkit_server, vm, sim)
    with pytest.raises(VmaError) as refused:
        sim.client.start_replication("r-during-shutdown", vm.id, targets)
    assert refused.value.status == 409 and "being shut down" in refused.value.message
    deadline = time.monotonic() + 10
    while sim.client.vm(vm.id)["power_state"] != "poweredOff":
        assert time.monotonic() < deadline, "the guest never shut down"
        time.sleep(0.05)
    assert vm.disks[0].generation == generation + 1  # its last writes, for the final sync to carry
    # Asked again, nothing changes; powered on, it runs again.
    assert sim.client.power(vm.id, "shutdown")["power_state"] == "poweredOff"
    assert sim.client.power(vm.id, "on")["power_state"] == "poweredOn"


def test_a_guest_without_tools_cannot_be_shut_down_but_can_be_powered_off(sim: Sim) -> None:
    vm = sim.vm("file-01")
    vm.tools_running = False
    with pytest.raises(VmaError) as exc:
        sim.client.power(vm.id, "shutdown")
    assert exc.value.code == "tools_not_running" and exc.value.status == 409
    assert sim.client.vm(vm.id)["power_state"] == "poweredOn"
    assert sim.client.power(vm.id, "off")["power_state"] == "poweredOff"


def test_a_hung_shutdown_ends_with_the_guest_still_on_and_says_why(sim: Sim) -> None:
    vm = sim.vm("app-01")
    vm.shutdown_hangs = True
    sim.client.power(vm.id, "shutdown", timeout_seconds=1)
    time.sleep(1.4)
    assert vm.power_state == "poweredOn" and "did not shut down within 1 s" in vm.power_error


def test_a_power_action_outside_the_contract_is_refused(sim: Sim) -> None:
    with pytest.raises(VmaError, match="power action"):
        sim.client.power(sim.vm("web-01").id, "reboot")
    with pytest.raises(VmaError) as exc:
        sim.client.power("4210aaaa-bbbb-4ccc-8ddd-eeeeffff0009", "off")
    assert exc.value.status == 404


def test_the_inventory_keeps_each_vms_hardware(sim: Sim) -> None:
    from migrations_app.actions import sync_inventory
    from migrations_app.models import SourceVM

    sync_inventory(sim.client.inventory())
    db = SourceVM.objects.get(name="db-01")
    assert (db.cpus, db.memory_mib, db.firmware, db.disk_controller) == (4, 8192, "bios", "pvscsi")
    assert [n["network"] for n in db.nics] == ["VM Network", "Storage"]
    assert SourceVM.objects.get(name="app-01").firmware == "efi"
