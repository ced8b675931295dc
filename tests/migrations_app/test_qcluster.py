"""End to end through a real django-q2 cluster and a real progress follower, each its own process group
(what honcho and systemd run), not the synchronous path."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from devtools.vma_sim import Faults
from migrations_app import actions
from migrations_app.models import DestinationVolume, JobDisk, JobState, MigrationJob, OmaNode
from migrations_app.volumes import LocalVolumeBackend
from tests.support.fake_cloudstack import FakeCloudStack
from tests.support.flows import STALE_SECONDS, Cluster, assert_copied, wait_for, wire
from tests.support.nbd import RunningServer, run_helper, start_server
from tests.support.vma import Sim, SimFactory, sha

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]
FINISHED: set[str] = {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED}


@pytest.fixture
def sim(make_sim: SimFactory) -> Sim:
    return make_sim(size_mib=32)


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[Sim, threading.Event]]:
    """A simulator whose copies wait until the test opens the gate."""
    gate = threading.Event()
    slow = Sim(tmp_path / "gated", Faults(gate=gate), size_mib=32)
    yield slow, gate
    gate.set()
    slow.close()


def test_three_two_disk_vms_migrate_concurrently_through_the_cluster(
    nbdkit_server: RunningServer, sim: Sim, settings: object, tmp_path: Path
) -> None:
    wire(settings, nbdkit_server, sim)
    cluster = Cluster(nbdkit_server, sim, tmp_path / "cluster.log").start()
    try:
        jobs = [actions.start_migration(vm_id=sim.vm(name).id) for name in ("db-01", "file-01", "app-01")]
        for job in jobs:
            done = wait_for(job, FINISHED, log=cluster.log)
            assert done.state == JobState.COMPLETED, done.error
            assert_copied(done, sim)
        assert JobDisk.objects.count() == 7
    finally:
        cluster.kill(signal.SIGTERM)


def test_a_copy_longer_than_the_task_timeout_completes_without_recovery(
    nbdkit_server: RunningServer, gated: tuple[Sim, threading.Event], settings: object, tmp_path: Path
) -> None:
    """No worker waits for a copy, so the cluster's task timeout (5 s here) cannot cut one. (Not shorter:
    the task before the copy, attach, export and start, must fit in it, on a loaded CI machine too.)"""
    slow, gate = gated
    wire(settings, nbdkit_server, slow)
    cluster = Cluster(nbdkit_server, slow, tmp_path / "cluster.log", OMA_Q_TIMEOUT="5").start()
    try:
        job = actions.start_migration(vm_id=slow.vm("web-01").id)
        wait_for(job, {JobState.REPLICATING}, log=cluster.log)
        time.sleep(11)  # the copy outlives the task timeout twice over
        gate.set()
        done = wait_for(job, FINISHED, log=cluster.log)
        assert done.state == JobState.COMPLETED, done.error
        recovered = list(done.events.filter(kind="job.recovered").values_list("message", flat=True))
        assert recovered == [], recovered
        assert len(slow.sim.replications) == 1
        assert_copied(done, slow)
    finally:
        cluster.kill(signal.SIGTERM)


def test_the_oma_side_killed_mid_copy_picks_the_copy_up_again(
    nbdkit_server: RunningServer, gated: tuple[Sim, threading.Event], settings: object, tmp_path: Path
) -> None:
    """Workers and follower SIGKILLed while the VMA copies: started again, the follower takes the same copy
    up (the copy was never cut, nothing is copied twice) and the job completes."""
    slow, gate = gated
    wire(settings, nbdkit_server, slow)
    settings.OMA_WORKFLOW = {**settings.OMA_WORKFLOW, "HEARTBEAT_STALE_SECONDS": STALE_SECONDS}  # type: ignore[attr-defined]
    cluster = Cluster(nbdkit_server, slow, tmp_path / "cluster.log").start()
    try:
        job = actions.start_migration(vm_id=slow.vm("web-01").id)
        wait_for(job, {JobState.REPLICATING}, log=cluster.log)
        deadline = time.monotonic() + 30
        while not MigrationJob.objects.get(pk=job.pk).replication_id and time.monotonic() < deadline:
            time.sleep(0.05)
        cluster.kill(signal.SIGKILL)
        gate.set()
        cluster.start()  # the new follower waits out the dead one's lease (the stale period), then follows
        done = wait_for(job, FINISHED, log=cluster.log)
        assert done.state == JobState.COMPLETED, done.error
        assert len(slow.sim.replications) == 1, "the copy was followed again, not started again"
        assert_copied(done, slow)
        assert len(list(nbdkit_server.layout.volume_root.glob("*.img"))) == 1, "one volume, nothing leaked"
    finally:
        cluster.kill(signal.SIGTERM)


def cloudstack_env(fake: FakeCloudStack) -> dict[str, str]:
    return fake.portal_env()


def test_a_cloudstack_call_slower_than_the_stale_threshold_is_not_taken_over(
    nbdkit_server: RunningServer, cloud: FakeCloudStack, sim: Sim, settings: object, tmp_path: Path
) -> None:
    """createVolume takes three stale periods; the worker's heartbeat goes on during the call, so no one
    presumes it dead: one volume, no recovery."""
    wire(settings, nbdkit_server, sim)
    cloud.job_seconds["createVolume"] = 3 * STALE_SECONDS
    env = cloudstack_env(cloud)
    cluster = Cluster(nbdkit_server, sim, tmp_path / "cluster.log", **env).start()
    try:
        job = actions.start_migration(vm_id=sim.vm("web-01").id)
        done = wait_for(job, FINISHED, log=cluster.log)
        assert done.state == JobState.COMPLETED, done.error
        assert not done.events.filter(kind="job.recovered").exists()
        assert cloud.requests.count("createVolume") == 1 and len(cloud.volumes) == 1
        assert_copied(done, sim)
    finally:
        cluster.kill(signal.SIGTERM)


def test_a_worker_killed_in_a_step_is_recovered_and_its_step_resumed(
    nbdkit_server: RunningServer, cloud: FakeCloudStack, sim: Sim, settings: object, tmp_path: Path
) -> None:
    wire(settings, nbdkit_server, sim)
    cloud.job_seconds["createVolume"] = 2 * STALE_SECONDS
    cluster = Cluster(nbdkit_server, sim, tmp_path / "cluster.log", **cloudstack_env(cloud)).start()
    try:
        job = actions.start_migration(vm_id=sim.vm("web-01").id)
        deadline = time.monotonic() + 30
        while "createVolume" not in cloud.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        cluster.kill(signal.SIGKILL, "worker")  # dies inside the slow createVolume
        cluster.start("worker")
        done = wait_for(job, FINISHED, log=cluster.log)
        assert done.state == JobState.COMPLETED, done.error
        assert done.events.filter(kind="job.recovered", step=JobState.PROVISIONING).exists()
        # The create finished in the cloud meanwhile; the resumed step found it by name.
        assert cloud.requests.count("createVolume") == 1 and len(cloud.volumes) == 1
        assert DestinationVolume.objects.get().volume_id == next(iter(cloud.volumes))
        assert_copied(done, sim)
    finally:
        cluster.kill(signal.SIGTERM)


def test_the_workers_stop_within_seconds_when_their_process_group_gets_sigterm(
    nbdkit_server: RunningServer, sim: Sim, settings: object, tmp_path: Path
) -> None:
    """What honcho and systemd send: a plain qcluster hung here with its sentinel killed mid-stop."""
    wire(settings, nbdkit_server, sim)
    cluster = Cluster(nbdkit_server, sim, tmp_path / "cluster.log").start("worker")
    proc = cluster.procs["worker"]
    deadline = time.monotonic() + 30
    while "running." not in (tmp_path / "cluster.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=20)  # raises if it hangs
    assert psutil.pid_exists(proc.pid) is False or psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE
    assert "has stopped" in (tmp_path / "cluster.log").read_text(), "the cluster's own orderly stop ran"
    cluster.procs.pop("worker")


def test_a_cancel_after_the_oma_side_was_killed_stops_the_vmas_copy_and_a_retry_completes(
    nbdkit_server: RunningServer, gated: tuple[Sim, threading.Event], settings: object, tmp_path: Path
) -> None:
    slow, gate = gated
    wire(settings, nbdkit_server, slow)
    settings.OMA_WORKFLOW = {**settings.OMA_WORKFLOW, "HEARTBEAT_STALE_SECONDS": STALE_SECONDS}  # type: ignore[attr-defined]
    cluster = Cluster(nbdkit_server, slow, tmp_path / "cluster.log").start()
    try:
        job = actions.start_migration(vm_id=slow.vm("web-01").id)
        deadline = time.monotonic() + 30
        while not MigrationJob.objects.get(pk=job.pk).replication_id and time.monotonic() < deadline:
            time.sleep(0.05)
        cluster.kill(signal.SIGKILL)  # workers and follower die; the VMA copies on (held at the gate)
        actions.cancel_job(job_id=job.job_id, actor="tester")
        cluster.start()
        done = wait_for(job, FINISHED, log=cluster.log)
        assert done.state == JobState.CANCELLED
        assert slow.sim.replications[done.replication_id].state == "cancelled", "the VMA's copy was stopped"
        gate.set()
        retried = actions.retry_job(job_id=job.job_id)
        finished = wait_for(retried, FINISHED, log=cluster.log)
        assert finished.state == JobState.COMPLETED, finished.error
        assert_copied(finished, slow)
    finally:
        cluster.kill(signal.SIGTERM)


def test_a_copy_rides_out_an_nbd_server_restart_and_a_vma_outage(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object, tmp_path: Path
) -> None:
    """Mid-copy, the NBD server is down for 3 s, later the VMA is unreachable for 10 s: the job
    completes with no operator, resumed from its checkpoint, not copied again (< 1.2x the disk)."""
    sim = make_sim(Faults(rate_bits_per_second=16_000_000), size_mib=64)  # 64 MiB: about 35 s
    wire(settings, nbdkit_server, sim)
    cluster = Cluster(nbdkit_server, sim, tmp_path / "cluster.log", OMA_OUTAGE_WINDOW_SECONDS="60").start()
    try:
        job = actions.start_migration(vm_id=sim.vm("web-01").id)

        def confirmed() -> int:
            return sum(MigrationJob.objects.get(pk=job.pk).disks.values_list("checkpoint_bytes", flat=True))

        deadline = time.monotonic() + 60
        while confirmed() < 8 << 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert nbdkit_server.helper("stop").returncode == 0
        time.sleep(3)
        assert nbdkit_server.helper("start").returncode == 0
        while confirmed() < 32 << 20 and time.monotonic() < deadline + 60:
            time.sleep(0.1)
        sim.go_offline()
        time.sleep(10)
        sim.come_back()
        done = wait_for(job, FINISHED, timeout=120, log=cluster.log)
        assert done.state == JobState.COMPLETED, done.error
        kinds = list(done.events.values_list("kind", flat=True))
        assert "replication.interrupted" in kinds and "replication.resumed" in kinds
        written = sum(c.written for r in sim.sim.replications.values() for c in r.copies)
        assert written < 1.2 * (64 << 20), f"copied {written} bytes for a 64 MiB disk"
        assert_copied(done, sim)
    finally:
        cluster.kill(signal.SIGTERM)


@pytest.fixture
def frozen_volume_root(nbdkit_server: RunningServer) -> Iterator[Path]:
    """The volume folder made immutable (EPERM even for root), then thawed again."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("needs root and chattr")
    root = nbdkit_server.layout.volume_root
    (root / ".volumes.lock").touch()
    if subprocess.run(["chattr", "+i", str(root)], check=False).returncode != 0:
        pytest.skip("this file system does not take chattr +i")
    yield root
    subprocess.run(["chattr", "-i", str(root)], check=False)


def test_a_system_error_in_a_step_is_shown_tried_again_and_then_fails_the_job(
    nbdkit_server: RunningServer, sim: Sim, settings: object, tmp_path: Path, frozen_volume_root: Path
) -> None:
    wire(settings, nbdkit_server, sim)
    cluster = Cluster(nbdkit_server, sim, tmp_path / "cluster.log", OMA_STEP_RETRY_SECONDS="0.3").start()
    try:
        job = actions.start_migration(vm_id=sim.vm("web-01").id)
        done = wait_for(job, FINISHED, log=cluster.log)
        assert done.state == JobState.FAILED and done.current_step == JobState.PROVISIONING
        assert "Operation not permitted [EPERM]" in done.error and "(failed 3 times in a row)" in done.error
        errors = list(done.events.filter(kind="step.error").values_list("message", flat=True))
        assert len(errors) == 2 and all("[EPERM]" in e and "trying provisioning again in" in e for e in errors)
        # Fixed, a retry goes through.
        subprocess.run(["chattr", "-i", str(frozen_volume_root)], check=True)
        finished = wait_for(actions.retry_job(job_id=job.job_id), FINISHED, log=cluster.log)
        assert finished.state == JobState.COMPLETED, finished.error
        assert_copied(finished, sim)
    finally:
        cluster.kill(signal.SIGTERM)


def wait_until_beating(*names: str) -> None:
    """Until every named node registered and its follower beat (its services are up)."""
    deadline = time.monotonic() + 60
    while OmaNode.objects.filter(name__in=names, follower_beat_at__isnull=False).count() < len(names):
        assert time.monotonic() < deadline, f"nodes {names} register and beat"
        time.sleep(0.1)


def test_two_nodes_share_the_work_each_with_its_own_server_queue_and_volumes(
    nbdkit_server: RunningServer, sim: Sim, settings: object, tmp_path: Path
) -> None:
    """Two OMA nodes as separate process groups on one database, each with its own nbdkit, helper
    config, volume root and django-q2 queue: new VMs go where most slots are free, each job's steps
    run on its node, its volumes and export live there, and the VMA copies into that node's server."""
    wire(settings, nbdkit_server, sim)
    layout_b, helper_b, _ = start_server(tmp_path / "node-b", "nbdkit")
    layout_b.psk_file.write_bytes(nbdkit_server.layout.psk_file.read_bytes())  # the same VMA and portal keys
    node_b_env = {
        "OMA_NODE_NAME": "node-b",
        "OMA_ATTACH_SLOTS": "6",
        "OMA_NBD_PORT": str(layout_b.port),
        "OMA_NBD_HELPER": shlex.join(helper_b),
        "OMA_NBD_HELPER_CONFIG": str(layout_b.helper_config),
        "OMA_NBD_EXPORT_ROOT": str(layout_b.export_root),
        "OMA_NBD_STATE_DIR": str(layout_b.state_dir),
        "OMA_VOLUME_ROOT": str(layout_b.volume_root),
        "OMA_VMA_NBD_PORT": str(layout_b.port),
    }
    a = Cluster(nbdkit_server, sim, tmp_path / "node-a.log", OMA_NODE_NAME="node-a", OMA_ATTACH_SLOTS="6")
    b = Cluster(nbdkit_server, sim, tmp_path / "node-b.log", **node_b_env)
    roots = {"node-a": nbdkit_server.layout.volume_root, "node-b": layout_b.volume_root}
    ports = {"node-a": nbdkit_server.layout.port, "node-b": layout_b.port}
    try:
        a.start()
        b.start()
        wait_until_beating(*roots)
        jobs = [actions.start_migration(vm_id=sim.vm(name).id) for name in ("web-01", "db-01", "app-01", "file-01")]
        done = [wait_for(job, FINISHED, timeout=120, log=a.log) for job in jobs]
        assert [job.state for job in done] == [JobState.COMPLETED] * 4, [job.error for job in done]
        placed = {job.vm.name: job.node.name for job in done}  # type: ignore[union-attr]
        assert set(placed.values()) == {"node-a", "node-b"}, placed
        for job in done:
            node = job.node.name  # type: ignore[union-attr]
            assert_copied(job, sim)
            for disk in JobDisk.objects.filter(job=job).select_related("mapping"):
                assert Path(disk.device_path).resolve().is_relative_to(roots[node]), (node, disk.device_path)
                assert disk.mapping is not None and disk.mapping.node == node
            replication = sim.sim.replications[job.replication_id]
            assert all(f":{ports[node]}/" in copy.nbd_url for copy in replication.copies), "the node's own server"
        for node in OmaNode.objects.filter(name__in=roots):
            assert DestinationVolume.objects.filter(node=node).count() <= node.attach_slots
    finally:
        a.kill(signal.SIGTERM)
        b.kill(signal.SIGTERM)
        run_helper(layout_b, "stop")


def test_a_node_killed_mid_copy_hands_its_copies_to_a_live_node_with_every_byte_intact(
    nbdkit_server: RunningServer, make_sim: SimFactory, settings: object, tmp_path: Path
) -> None:
    """Two nodes on one database and one shared volume root (as a zone's volumes are shared by its VMs),
    each linking its attached devices in its own folder. Mid-copy, node-b dies at once (its workers,
    follower and NBD server, SIGKILL): node-a marks it down, stops its copies at the VMA, detaches its
    volumes and places its jobs again; they finish on node-a, resumed from what the VMA confirmed
    written, with every byte intact, and no volume is ever attached to both nodes."""
    sim = make_sim(Faults(rate_bits_per_second=24_000_000), size_mib=32)  # about 11 s a disk
    wire(settings, nbdkit_server, sim)
    shared = nbdkit_server.layout.volume_root
    layout_b, helper_b, _ = start_server(tmp_path / "node-b", "nbdkit", volume_root=shared)
    layout_b.psk_file.write_bytes(nbdkit_server.layout.psk_file.read_bytes())
    devices = {"node-a": shared / "by-id-node-a", "node-b": shared / "by-id-node-b"}
    a = Cluster(
        nbdkit_server,
        sim,
        tmp_path / "node-a.log",
        OMA_NODE_NAME="node-a",
        OMA_ATTACH_SLOTS="6",
        OMA_VOLUME_DEVICE_ROOT=str(devices["node-a"]),
    )
    b = Cluster(
        nbdkit_server,
        sim,
        tmp_path / "node-b.log",
        OMA_NODE_NAME="node-b",
        OMA_ATTACH_SLOTS="6",
        OMA_NBD_PORT=str(layout_b.port),
        OMA_NBD_HELPER=shlex.join(helper_b),
        OMA_NBD_HELPER_CONFIG=str(layout_b.helper_config),
        OMA_NBD_EXPORT_ROOT=str(layout_b.export_root),
        OMA_NBD_STATE_DIR=str(layout_b.state_dir),
        OMA_VOLUME_DEVICE_ROOT=str(devices["node-b"]),
        OMA_VMA_NBD_PORT=str(layout_b.port),
    )
    both: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # every 20 ms: a volume's device on both nodes at once is a double attach
        while not stop.wait(0.02):
            seen = [{p.name for p in d.glob("virtio-*")} if d.exists() else set() for d in devices.values()]
            both.extend(seen[0] & seen[1])

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        a.start()
        b.start()
        watcher.start()
        wait_until_beating(*devices)
        deadline = time.monotonic() + 60
        jobs = [actions.start_migration(vm_id=sim.vm(name).id) for name in ("web-01", "db-01", "app-01", "file-01")]
        node_b = OmaNode.objects.get(name="node-b")

        def copying_on_b() -> list[MigrationJob]:
            return list(
                MigrationJob.objects.filter(pk__in=[j.pk for j in jobs], node=node_b, state=JobState.REPLICATING)
            )

        while not any(sum(j.disks.values_list("checkpoint_bytes", flat=True)) >= 4 << 20 for j in copying_on_b()):
            assert time.monotonic() < deadline + 60, ("node-b never copied", a.log.read_text()[-2000:])
            time.sleep(0.05)
        on_b = {j.job_id for j in copying_on_b()}
        # A copy that confirmed nothing yet starts again from the start; one that did resumes from there.
        checkpointed = {j.job_id for j in copying_on_b() if j.disks.exclude(checkpoint="").exists()}
        b.kill(signal.SIGKILL)
        os.kill(int(layout_b.pidfile.read_text()), signal.SIGKILL)  # its NBD server dies with it

        done = [wait_for(job, FINISHED, timeout=180, log=a.log) for job in jobs]
        assert [job.state for job in done] == [JobState.COMPLETED] * 4, [job.error for job in done]
        volumes = LocalVolumeBackend(shared)
        for job in done:
            assert job.node is not None and job.node.name == "node-a", (job.job_id, job.node)
            for disk in JobDisk.objects.filter(job=job).select_related("source_disk"):
                # Read from the volume itself: node-a, 2 slots short now, may have detached it since.
                source = sim.vm(job.vm.name).disks[disk.source_disk.unit_number]
                image = volumes.image_path(disk.volume_id)
                assert sha(image, source.capacity_bytes) == sha(source.image), (job.job_id, disk.pk)
        moved = {job.job_id for job in done if job.events.filter(kind="job.moved").exists()}
        assert on_b and on_b <= moved, (on_b, moved)
        assert checkpointed, "the copy that was 4 MiB in had a checkpoint"
        for job in done:
            if job.job_id in checkpointed:
                replications = [r for rid, r in sim.sim.replications.items() if rid.startswith(job.job_id)]
                resumed = [c for r in replications for c in r.copies if c.resume_from]
                assert resumed, f"{job.job_id} resumed from its checkpoint, not copied again"
        node_b.refresh_from_db()
        assert node_b.down_since is not None
        kinds = set(node_b.events.values_list("kind", flat=True))
        assert {"node.down", "node.taken_over"} <= kinds, kinds
        assert not DestinationVolume.objects.filter(node=node_b).exists(), "nothing is left on the lost node"
        assert not list(devices["node-b"].glob("virtio-*")), "its devices are detached"
        stop.set()
        watcher.join(5)
        assert both == [], f"attached to both nodes at once: {sorted(set(both))}"
    finally:
        stop.set()
        a.kill(signal.SIGTERM)
        b.kill(signal.SIGKILL)
        run_helper(layout_b, "stop")
