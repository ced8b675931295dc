"""One device, one export: the helper refuses every other spelling of a device already exported (or
requested twice), non-canonical paths, a main process it cannot tie to its own pidfile, and dev mode
run as root from a folder others could write. Every refusal leaves the files byte-identical."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from devtools.devserver import DevServerLayout, free_port, write_layout
from tests.support.nbd import RunningServer, run_helper

VM = "4210aaaa-bbbb-4ccc-8ddd-eeeeffff0000"
NAME = f"migration-vm-{VM}-disk0"
NAME1 = f"migration-vm-{VM}-disk1"
OTHER = "migration-vm-4210aaaa-bbbb-4ccc-8ddd-eeeeffff0001-disk0"


def reply(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def snapshot(layout: DevServerLayout) -> dict[str, str]:
    return RunningServer(layout, layout.root / "none").snapshot()


@pytest.fixture
def layout(tmp_path: Path) -> DevServerLayout:
    return write_layout(tmp_path / "nbd", "nbdkit", "127.0.0.1", free_port())


@pytest.fixture
def volume(layout: DevServerLayout) -> Path:
    path = layout.volume_root / "v1.img"
    path.write_bytes(bytes(4096))
    return path


def refused(layout: DevServerLayout, *args: str, error: str) -> None:
    before = snapshot(layout)
    proc = run_helper(layout, "link", *args)
    assert proc.returncode == 3 and reply(proc)["error"] == error, proc.stdout
    assert snapshot(layout) == before


@pytest.mark.parametrize("spelling", ["{root}//v1.img", "{root}/./v1.img", "{root}/v1.img/", "{root}/v1.img/."])
def test_non_canonical_spellings_are_refused(layout: DevServerLayout, volume: Path, spelling: str) -> None:
    refused(layout, NAME, spelling.format(root=layout.volume_root), error="not_canonical")


def test_a_second_name_for_an_exported_file_is_refused_in_a_later_call(layout: DevServerLayout, volume: Path) -> None:
    assert run_helper(layout, "link", NAME, str(volume)).returncode == 0
    refused(layout, OTHER, str(volume), error="alias")
    # The same name again is no alias: it is the same export.
    assert run_helper(layout, "link", NAME, str(volume)).returncode == 0


def test_a_symlink_or_a_hard_link_to_an_exported_file_is_refused(layout: DevServerLayout, volume: Path) -> None:
    assert run_helper(layout, "link", NAME, str(volume)).returncode == 0
    symlink = layout.volume_root / "alias.img"
    symlink.symlink_to(volume)
    hard = layout.volume_root / "hard.img"
    os.link(volume, hard)
    refused(layout, OTHER, str(symlink), error="alias")
    refused(layout, OTHER, str(hard), error="alias")


def test_two_spellings_in_one_call_are_refused(layout: DevServerLayout, volume: Path) -> None:
    hard = layout.volume_root / "hard.img"
    os.link(volume, hard)
    refused(layout, NAME, str(volume), NAME1, str(hard), error="alias")


def test_of_two_parallel_calls_for_one_device_exactly_one_wins(layout: DevServerLayout, volume: Path) -> None:
    hard = layout.volume_root / "hard.img"
    os.link(volume, hard)
    results: list[int] = []

    def call(name: str, device: Path) -> None:
        results.append(run_helper(layout, "link", name, str(device)).returncode)

    threads = [threading.Thread(target=call, args=a) for a in ((NAME, volume), (OTHER, hard))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [0, 3]
    links = [p for p in layout.export_root.iterdir() if p.is_symlink()]
    assert len(links) == 1


def test_dev_mode_keeps_a_by_id_link_and_refuses_one_leading_out(
    layout: DevServerLayout, volume: Path, tmp_path: Path
) -> None:
    by_id = layout.volume_root / "by-id"
    by_id.mkdir()
    (by_id / "virtio-0001").symlink_to(volume)
    proc = run_helper(layout, "link", NAME, str(by_id / "virtio-0001"))
    assert proc.returncode == 0, proc.stdout
    # The stable by-id path is the target (it goes away on detach, comes back on attach).
    assert os.readlink(layout.export_root / NAME) == str(by_id / "virtio-0001")
    outside = tmp_path / "secret.img"
    outside.write_bytes(b"not a volume")
    (by_id / "virtio-0002").symlink_to(outside)
    refused(layout, OTHER, str(by_id / "virtio-0002"), error="device_not_allowed")


@pytest.mark.skipif(os.geteuid() != 0, reason="the rule applies when the helper runs as root")
def test_dev_mode_as_root_needs_a_volume_root_only_root_can_write(layout: DevServerLayout, volume: Path) -> None:
    layout.volume_root.chmod(0o777)
    try:
        before = snapshot(layout)
        proc = run_helper(layout, "link", NAME, str(volume))
        assert proc.returncode == 4 and reply(proc)["error"] == "unsafe_dev_root"
        assert snapshot(layout) == before
    finally:
        layout.volume_root.chmod(0o755)


def test_a_by_id_style_alias_of_an_exported_block_device_is_refused(loop_device: str, tmp_path: Path) -> None:
    # Another node for the same block device (as udev's /dev/disk/by-id and /dev/block names are):
    # a different path and inode, the same device number.
    alias = Path(f"/dev/oma-test-alias-{os.getpid()}")
    os.mknod(alias, 0o600 | stat.S_IFBLK, os.stat(loop_device).st_rdev)
    try:
        layout = write_layout(tmp_path / "nbd", "nbdkit", "127.0.0.1", free_port())
        text = layout.helper_config.read_text()
        layout.helper_config.write_text(
            text.replace(f"dev_volume_root = {layout.volume_root}", "device_prefixes = /dev/loop /dev/oma-test-")
        )
        assert run_helper(layout, "link", NAME, loop_device).returncode == 0
        refused(layout, OTHER, str(alias), error="alias")
    finally:
        alias.unlink(missing_ok=True)


def test_a_process_with_the_pidfile_only_somewhere_in_its_arguments_is_not_the_server(
    layout: DevServerLayout, tmp_path: Path
) -> None:
    # An nbdkit that names the pidfile as the file it serves, not as its own -P: not the server.
    layout.pidfile.write_text("0\n")
    port = free_port()
    impostor = subprocess.Popen(
        ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", str(layout.pidfile)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        layout.pidfile.write_text(f"{impostor.pid}\n")
        out = reply(run_helper(layout, "status"))
        assert out["verified"] is False and "-P" in str(out["why"])
        stop = run_helper(layout, "stop")
        assert reply(stop)["stopped"] is False and impostor.poll() is None  # never signalled
    finally:
        impostor.kill()
        impostor.wait()


def test_a_pid_started_after_its_pidfile_was_written_is_a_reused_pid(nbdkit_server: RunningServer) -> None:
    pidfile = nbdkit_server.layout.pidfile
    assert reply(nbdkit_server.helper("status"))["verified"] is True
    hour_ago = time.time() - 3600
    os.utime(pidfile, (hour_ago, hour_ago))
    out = reply(nbdkit_server.helper("status"))
    assert out["verified"] is False and "reused PID" in str(out["why"])
