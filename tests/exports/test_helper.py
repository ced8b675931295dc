"""The privileged helper, run as the real program: hostile input is refused and changes nothing."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from devtools.devserver import DevServerLayout, free_port, write_layout
from tests.support.nbd import HELPER, HELPER_MODULE, RunningServer, load_helper_module, run_helper

VM = "4210aaaa-bbbb-4ccc-8ddd-eeeeffff0000"
NAME = f"migration-vm-{VM}-disk0"


def result_of(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"helper must print exactly one JSON line, got {proc.stdout!r} {proc.stderr!r}"
    return json.loads(lines[0])


@pytest.fixture(params=["nbdkit", "nbd-server"])
def layout(request: pytest.FixtureRequest, tmp_path: Path) -> DevServerLayout:
    """A laid-out (not started) server: link/unlink validation needs no running server."""
    return write_layout(tmp_path / "nbd", request.param, "127.0.0.1", free_port())


def snapshot(layout: DevServerLayout) -> dict[str, str]:
    return RunningServer(layout, layout.root / "none").snapshot()


def test_link_writes_link_and_conf_atomically(layout: DevServerLayout) -> None:
    volume = layout.volume_root / "v0.img"
    volume.write_bytes(b"x" * 4096)
    proc = run_helper(layout, "link", NAME, str(volume))
    out = result_of(proc)
    assert proc.returncode == 0 and out["ok"] is True and out["link_changed"] is True
    assert os.readlink(layout.export_root / NAME) == str(volume)
    if layout.backend == "nbd-server":
        conf = (layout.confd / f"{NAME}.conf").read_text()
        assert f"[{NAME}]" in conf and f"exportname = {layout.export_root / NAME}" in conf
    else:
        assert list(layout.confd.iterdir()) == []
    # No temp files left behind.
    assert not [p for p in layout.export_root.iterdir() if p.name.startswith(".")]


def test_link_again_with_same_device_changes_nothing(layout: DevServerLayout) -> None:
    volume = layout.volume_root / "v0.img"
    volume.write_bytes(b"x")
    run_helper(layout, "link", NAME, str(volume))
    out = result_of(run_helper(layout, "link", NAME, str(volume)))
    assert out["link_changed"] is False and out["conf_changed"] is False and out["needs_reload"] is False


def test_unlink_removes_link_and_conf_and_is_idempotent(layout: DevServerLayout) -> None:
    volume = layout.volume_root / "v0.img"
    volume.write_bytes(b"x")
    run_helper(layout, "link", NAME, str(volume))
    first = result_of(run_helper(layout, "unlink", NAME))
    second = result_of(run_helper(layout, "unlink", NAME))
    assert first["link_removed"] is True and second["link_removed"] is False
    assert not (layout.export_root / NAME).is_symlink()
    assert not (layout.confd / f"{NAME}.conf").exists()
    assert volume.exists(), "unlink must never touch the volume itself"


HOSTILE_NAMES = [
    f"{NAME}\n[evil]",
    "[x]",
    f"{NAME}=1",
    f"../{NAME}",
    "migration-vm-..-disk0",
    "m" * 300,
    f"migration-vm-{VM}-disk64",
    f"migration-vm-{VM.upper()}-disk0",
    f"migration-vm-{VM}-disk0 ",
    "migration-vm-4210aaaa-bbbb-4ccc-8ddd-eeeeffff000é-disk0",
    "",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_are_refused_and_change_nothing(layout: DevServerLayout, name: str) -> None:
    volume = layout.volume_root / "v0.img"
    volume.write_bytes(b"x")
    run_helper(layout, "link", NAME, str(volume))
    before = snapshot(layout)
    for args in (("link", name, str(volume)), ("unlink", name)):
        proc = run_helper(layout, *args)
        out = result_of(proc)
        assert proc.returncode == 3, out
        assert out["ok"] is False and out["message"]
    assert snapshot(layout) == before


def hostile_devices(layout: DevServerLayout) -> list[tuple[str, str]]:
    root = layout.volume_root
    os_disk_link = root / "os-disk"
    os_disk_link.symlink_to("/dev/vda" if Path("/dev/vda").exists() else "/dev/sda")
    shadow_link = root / "shadow"
    shadow_link.symlink_to("/etc/shadow")
    (root / "a-directory").mkdir()
    return [
        (str(os_disk_link), "device_not_allowed"),
        (str(shadow_link), "device_not_allowed"),
        ("/etc/shadow", "device_not_allowed"),
        (str(root / "a-directory"), "not_a_volume"),
        (str(root / "missing.img"), "device_missing"),
        (f"{root}/../helper.conf", "forbidden_character"),
        (f"{root}/v0.img\nexportname = /etc/shadow", "forbidden_character"),
        (f"{root}/[generic].img", "forbidden_character"),
        (f"{root}/a=b.img", "forbidden_character"),
        (f"{root}/vé.img", "forbidden_character"),
        (f"{root}/" + "v" * 300, "too_long"),
        ("relative/v0.img", "invalid_device"),
        ("/tmp/v0.img", "device_not_allowed"),
    ]


def test_hostile_devices_are_refused_and_change_nothing(layout: DevServerLayout) -> None:
    volume = layout.volume_root / "v0.img"
    volume.write_bytes(b"x")
    run_helper(layout, "link", NAME, str(volume))
    other = f"migration-vm-{VM}-disk1"
    for device, kind in hostile_devices(layout):
        before = snapshot(layout)
        for name in (NAME, other):
            proc = run_helper(layout, "link", name, device)
            out = result_of(proc)
            assert proc.returncode == 3, (device, out)
            assert out["error"] == kind, (device, out)
            assert snapshot(layout) == before, device
    assert os.readlink(layout.export_root / NAME) == str(volume)


def test_nul_byte_is_refused_in_process(layout: DevServerLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    # argv cannot carry NUL through exec, so call the helper's own main() with one.
    helper = load_helper_module()
    monkeypatch.setenv("OMA_NBD_HELPER_CONFIG", str(layout.helper_config))
    before = snapshot(layout)
    for args in (["link", f"{NAME}\x00", "/x"], ["link", NAME, f"{layout.volume_root}/v\x00.img"], ["unlink", "\x00"]):
        buf = io.StringIO()
        with redirect_stdout(buf):
            code = helper.main(args)
        out = json.loads(buf.getvalue())
        assert code == 3 and out["error"] == "forbidden_character" and "NUL" in out["message"]
    assert snapshot(layout) == before


def test_link_takes_a_vms_disks_in_one_call(layout: DevServerLayout) -> None:
    volumes = [layout.volume_root / f"v{n}.img" for n in range(3)]
    for volume in volumes:
        volume.write_bytes(b"x")
    names = [f"migration-vm-{VM}-disk{n}" for n in range(3)]
    args = [part for name, volume in zip(names, volumes, strict=True) for part in (name, str(volume))]
    links: list[dict[str, object]] = result_of(run_helper(layout, "link", *args))["links"]  # type: ignore[assignment]
    assert [link["name"] for link in links] == names
    assert all(link["link_changed"] for link in links)
    for name, volume in zip(names, volumes, strict=True):
        assert os.readlink(layout.export_root / name) == str(volume)


def test_one_hostile_pair_refuses_the_whole_link_call(layout: DevServerLayout) -> None:
    volume = layout.volume_root / "v0.img"
    volume.write_bytes(b"x")
    other = f"migration-vm-{VM}-disk1"
    before = snapshot(layout)
    for pairs in (
        [NAME, str(volume), other, "/etc/shadow"],
        [NAME, str(volume), "../etc", str(volume)],
        [NAME, str(volume), NAME, str(volume)],
        [NAME, str(volume), other, str(volume)],
    ):
        proc = run_helper(layout, "link", *pairs)
        assert proc.returncode == 3, result_of(proc)
        assert snapshot(layout) == before, pairs


def test_usage_errors_exit_2() -> None:
    for args in (["link", NAME], ["link", NAME, "/x", NAME], ["link", *(["n", "/d"] * 65)], ["status", "x"]):
        proc = subprocess.run(["python3", str(HELPER), *args], capture_output=True, text=True, check=False)
        assert proc.returncode == 2 and result_of(proc)["error"] == "usage", args
    proc = subprocess.run(["python3", str(HELPER), "format-disk"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2


def test_config_override_is_ignored_under_sudo(layout: DevServerLayout) -> None:
    # Under sudo the caller must not choose the config: the helper falls back to /etc/oma.
    proc = run_helper(layout, "status", env={"SUDO_UID": "1000", "SUDO_USER": "oma"})
    if Path("/etc/oma/nbd-helper.conf").exists():
        pytest.skip("a real /etc/oma/nbd-helper.conf is installed on this machine")
    out = result_of(proc)
    assert proc.returncode == 4 and "/etc/oma/nbd-helper.conf" in str(out["message"])


def test_group_writable_config_is_refused(layout: DevServerLayout) -> None:
    layout.helper_config.chmod(0o666)
    proc = run_helper(layout, "status")
    assert proc.returncode == 4 and "writable only by its owner" in str(result_of(proc)["message"])


def test_config_with_unsafe_path_is_refused(layout: DevServerLayout) -> None:
    text = layout.helper_config.read_text().replace(f"export_root = {layout.export_root}", "export_root = /tmp/x\n[y]")
    layout.helper_config.write_text(text)
    assert run_helper(layout, "status").returncode == 4


def test_reload_without_running_server_exits_5(tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "nbd", "nbd-server", "127.0.0.1", free_port())
    proc = run_helper(layout, "reload")
    assert proc.returncode == 5 and result_of(proc)["error"] == "server_not_running"


def test_reload_refuses_a_stray_conf_file(nbdserver_server: RunningServer) -> None:
    layout = nbdserver_server.layout
    (layout.confd / "stray.conf").write_text("[stray]\n    exportname = /etc/shadow\n")
    pid = nbdserver_server.main_pid()
    proc = run_helper(layout, "reload")
    assert proc.returncode == 4 and result_of(proc)["error"] == "bad_conf_file"
    assert nbdserver_server.main_pid() == pid


def test_status_reports_verified_pid_and_listening(nbd_server: RunningServer) -> None:
    out = result_of(nbd_server.helper("status"))
    assert out["verified"] is True and out["listening"] is True
    assert out["pid"] == nbd_server.main_pid()


def test_status_does_not_trust_a_pidfile_naming_another_process(nbd_server: RunningServer) -> None:
    real = nbd_server.main_pid()
    nbd_server.layout.pidfile.write_text(f"{os.getpid()}\n")
    out = result_of(nbd_server.helper("status"))
    assert out["verified"] is False and "runs" in str(out["why"])
    assert result_of(nbd_server.helper("reload"))["ok"] is (nbd_server.backend == "nbdkit")
    nbd_server.layout.pidfile.write_text(f"{real}\n")


def test_start_refuses_a_taken_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        layout = write_layout(tmp_path / "nbd", "nbdkit", "127.0.0.1", sock.getsockname()[1])
        proc = run_helper(layout, "start")
    assert proc.returncode == 5 and result_of(proc)["error"] == "port_taken"


# --- production mode: block devices under allowed prefixes ----------------------------------


@pytest.fixture
def prod_layout(tmp_path: Path) -> DevServerLayout:
    layout = write_layout(tmp_path / "nbd", "nbdkit", "127.0.0.1", free_port())
    text = layout.helper_config.read_text()
    text = text.replace(f"dev_volume_root = {layout.volume_root}", "device_prefixes = /dev/loop /dev/vd /dev/sd")
    layout.helper_config.write_text(text)
    return layout


def test_os_disk_is_refused_in_production_mode(prod_layout: DevServerLayout) -> None:
    disk = next((d for d in ("/dev/vda", "/dev/sda") if Path(d).exists()), None)
    if disk is None:
        pytest.skip("no /dev/vda or /dev/sda here")
    proc = run_helper(prod_layout, "link", NAME, disk)
    out = result_of(proc)
    assert proc.returncode == 3 and out["error"] in {"os_disk", "device_in_use"}
    assert not (prod_layout.export_root / NAME).is_symlink()


def test_regular_file_is_refused_in_production_mode(prod_layout: DevServerLayout, tmp_path: Path) -> None:
    proc = run_helper(prod_layout, "link", NAME, "/dev/null")
    assert proc.returncode == 3 and result_of(proc)["error"] == "device_not_allowed"


def test_unmounted_loop_device_is_accepted_in_production_mode(prod_layout: DevServerLayout, loop_device: str) -> None:
    proc = run_helper(prod_layout, "link", NAME, loop_device)
    assert proc.returncode == 0, proc.stdout
    assert os.readlink(prod_layout.export_root / NAME) == loop_device


def test_mounted_loop_device_is_refused(prod_layout: DevServerLayout, loop_device: str, tmp_path: Path) -> None:
    if not shutil.which("mkfs.ext4"):
        pytest.skip("mkfs.ext4 missing")
    subprocess.run(["mkfs.ext4", "-q", "-F", loop_device], capture_output=True, check=True)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", loop_device, str(mountpoint)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount here: {mounted.stderr.strip()}")
    try:
        before = snapshot(prod_layout)
        proc = run_helper(prod_layout, "link", NAME, loop_device)
        assert proc.returncode == 3 and result_of(proc)["error"] == "device_in_use"
        assert snapshot(prod_layout) == before
    finally:
        subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)


@pytest.mark.parametrize("value", ["relative/priority.conf", "/etc/oma/../shadow", "/etc/oma/p.conf;rm", "/etc/a b"])
def test_a_tls_priority_file_that_is_not_a_plain_absolute_path_is_refused(layout: DevServerLayout, value: str) -> None:
    """The file is handed to the server's environment: only a plain absolute path gets that far."""
    layout.helper_config.write_text(layout.helper_config.read_text() + f"tls_priority_file = {value}\n")
    proc = run_helper(layout, "status")
    assert proc.returncode == 4 and "tls_priority_file" in str(result_of(proc)["message"])


def test_the_program_runs_the_helper_module_from_its_cached_bytecode(layout: DevServerLayout, tmp_path: Path) -> None:
    """The program sudo runs imports the helper from its own folder, so Python reuses the module's
    compiled bytecode (a script is compiled on every start); and nothing the caller controls (the
    current folder, PYTHONPATH) can put another module in its place."""
    cached = HELPER_MODULE.parent / "__pycache__"
    shutil.rmtree(cached, ignore_errors=True)
    planted = tmp_path / "oma_nbd_helper.py"
    planted.write_text('import json\nprint(json.dumps({"ok": True, "planted": True}))\n')
    env = {**os.environ, "OMA_NBD_HELPER_CONFIG": str(layout.helper_config), "PYTHONPATH": str(tmp_path)}
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-IS", str(HELPER), "status"], capture_output=True, text=True, env=env, cwd=tmp_path,
            timeout=60, check=False,
        )  # fmt: skip
        out = result_of(proc)
        assert "planted" not in out and out["verb"] == "status", out
    assert list(cached.glob("oma_nbd_helper.cpython-*.pyc")), "the module was not imported (no bytecode cached)"
    # The module run as a script still answers the same (tests and dev tools call both).
    alone = subprocess.run(
        [sys.executable, "-IS", str(HELPER_MODULE), "status"], capture_output=True, text=True, env=env, timeout=60,
        check=False,
    )  # fmt: skip
    assert result_of(alone).keys() == out.keys()


def digest_of(data: bytes, ranges: list[list[int]]) -> str:
    import hashlib

    hasher = hashlib.sha256()
    for offset, length in ranges:
        hasher.update(data[offset : offset + length])
    return hasher.hexdigest()


def test_digest_hashes_the_ranges_of_the_device_an_export_serves(layout: DevServerLayout) -> None:
    """A sync's read-back: the helper reads the device behind the export's link, locally."""
    data = os.urandom(9 << 20)
    volume = layout.volume_root / "v0.img"
    volume.write_bytes(data)
    run_helper(layout, "link", NAME, str(volume))
    for ranges in ([[0, len(data)]], [[4096, 8192], [5 << 20, (3 << 20) + 17]], [], [[len(data), 0]]):
        proc = run_helper(layout, "digest", NAME, stdin=json.dumps(ranges))
        out = result_of(proc)
        assert proc.returncode == 0 and out["sha256"] == digest_of(data, ranges), out
        assert out["size"] == len(data) and out["bytes"] == sum(length for _, length in ranges)
    volume.write_bytes(data[:4096] + b"\0" + data[4097:])  # one byte differs: the digest says so
    changed = result_of(run_helper(layout, "digest", NAME, stdin=json.dumps([[0, len(data)]])))
    assert changed["sha256"] != digest_of(data, [[0, len(data)]])


def test_digest_reads_several_exports_in_one_call_each_with_its_own_ranges(layout: DevServerLayout) -> None:
    """A job's disks are read back in one helper process: one sha256 per name, in the names' order, each
    equal to what that name alone gives; the first also stands at the top level."""
    names = [NAME, NAME.replace("disk0", "disk1"), NAME.replace("disk0", "disk2")]
    datas = [os.urandom(size) for size in (5 << 20, 3 << 20, 65536)]
    for n, (name, data) in enumerate(zip(names, datas, strict=True)):
        volume = layout.volume_root / f"v{n}.img"
        volume.write_bytes(data)
        run_helper(layout, "link", name, str(volume))
    ranges = [[[0, len(datas[0])]], [[4096, 8192], [1 << 20, 17]], []]
    proc = run_helper(layout, "digest", *names, stdin=json.dumps(ranges))
    out = result_of(proc)
    assert proc.returncode == 0, out
    digests = out["digests"]
    assert isinstance(digests, list) and [d["name"] for d in digests] == names
    for d, data, asked in zip(digests, datas, ranges, strict=True):
        assert d["sha256"] == digest_of(data, asked) and d["size"] == len(data)
        assert d["bytes"] == sum(length for _, length in asked)
        alone = result_of(run_helper(layout, "digest", d["name"], stdin=json.dumps(asked)))
        assert alone["sha256"] == d["sha256"]
    assert out["sha256"] == digests[0]["sha256"] and out["name"] == names[0]


@pytest.mark.parametrize(
    ("count", "given", "error"),
    [
        (2, "[[[0, 1]]]", "invalid_ranges"),  # one list for two names
        (2, "[[0, 1], [0, 1]]", "invalid_ranges"),  # pairs, not one list of pairs per name
        (2, "[[[0, 1]], [[0, 8193]]]", "invalid_ranges"),  # the second past its device's end
        (2, '{"a": []}', "invalid_ranges"),
        (0, "[]", "usage"),
        (65, "[]", "usage"),
    ],
)
def test_digest_of_several_names_refuses_the_whole_call(
    layout: DevServerLayout, count: int, given: str, error: str
) -> None:
    names = [NAME.replace("disk0", f"disk{n}") for n in range(count)]
    for n, name in enumerate(names[:2]):
        volume = layout.volume_root / f"v{n}.img"
        volume.write_bytes(b"y" * 8192)
        run_helper(layout, "link", name, str(volume))
    before = snapshot(layout)
    proc = run_helper(layout, "digest", *names, stdin=given)
    out = result_of(proc)
    assert out["ok"] is False and out["error"] == error, out
    assert "sha256" not in proc.stdout and snapshot(layout) == before


def test_digest_of_several_names_says_which_one_it_refused(layout: DevServerLayout) -> None:
    volume = layout.volume_root / "v0.img"
    volume.write_bytes(b"y" * 8192)
    run_helper(layout, "link", NAME, str(volume))
    missing = NAME.replace("disk0", "disk1")
    proc = run_helper(layout, "digest", NAME, missing, stdin="[[], []]")
    out = result_of(proc)
    assert proc.returncode == 3 and out["error"] == "no_export" and missing in str(out["message"]), out
    twice = result_of(run_helper(layout, "digest", NAME, NAME, stdin="[[], []]"))
    assert twice["error"] == "duplicate_name", twice


@pytest.mark.parametrize(
    "given",
    [
        "",
        "{}",
        "[[0]]",
        "[[0, 1, 2]]",
        "[[-1, 10]]",
        "[[0, 1.5]]",
        "[[true, 1]]",
        '[["0", "1"]]',
        "[[0, 8193]]",  # past the device's end
        "[[8192, 1]]",
        "[" + ",".join(["[0,1]"] * ((1 << 20) + 1)) + "]",
        "\xff",
    ],
)
def test_digest_refuses_malformed_ranges(layout: DevServerLayout, given: str) -> None:
    volume = layout.volume_root / "v0.img"
    volume.write_bytes(b"y" * 8192)
    run_helper(layout, "link", NAME, str(volume))
    before = snapshot(layout)
    proc = run_helper(layout, "digest", NAME, stdin=given)
    out = result_of(proc)
    assert proc.returncode == 3 and out["error"] == "invalid_ranges", out
    assert snapshot(layout) == before and volume.read_bytes() == b"y" * 8192


def test_digest_reads_only_a_device_an_export_serves(layout: DevServerLayout, tmp_path: Path) -> None:
    proc = run_helper(layout, "digest", NAME, stdin="[]")
    assert proc.returncode == 3 and result_of(proc)["error"] == "no_export"
    for name in HOSTILE_NAMES:
        refused = run_helper(layout, "digest", name, stdin="[]")
        assert refused.returncode in (2, 3) and result_of(refused)["ok"] is False
    # A link someone pointed outside the volume root (only root could): refused, nothing read.
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not a volume")
    (layout.export_root / NAME).symlink_to(secret)
    outside = run_helper(layout, "digest", NAME, stdin="[[0, 12]]")
    assert outside.returncode == 3 and result_of(outside)["error"] == "device_not_allowed"
    assert "sha256" not in outside.stdout
