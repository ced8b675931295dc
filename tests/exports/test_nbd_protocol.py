"""The stdlib NBD client against real nbdkit and nbd-server processes."""

from __future__ import annotations

import os
import subprocess

import pytest

from exports.nbd_protocol import NbdError, NbdUnavailable, export_info, list_exports
from exports.nbd_servers import HEALTH_EXPORT
from tests.support.nbd import RunningServer

NAME = "migration-vm-4210aaaa-bbbb-4ccc-8ddd-eeeeffff0000-disk0"


def publish(server: RunningServer, size: int = 8 << 20) -> str:
    volume = server.volume("v.img", size)
    assert server.helper("link", NAME, volume).returncode == 0
    if server.backend == "nbd-server":
        assert server.helper("reload").returncode == 0
    return volume


def wait_listed(server: RunningServer, name: str) -> list[str]:
    import time

    deadline = time.monotonic() + 5
    names: list[str] = []
    while time.monotonic() < deadline:
        names = server.list_exports()
        if name in names:
            break
        time.sleep(0.05)
    return names


def test_list_returns_names_only_including_new_export(nbd_server: RunningServer) -> None:
    publish(nbd_server)
    names = wait_listed(nbd_server, NAME)
    assert NAME in names
    if nbd_server.backend == "nbd-server":
        assert HEALTH_EXPORT in names


def test_open_reports_the_real_size(nbd_server: RunningServer) -> None:
    publish(nbd_server, size=24 << 20)
    wait_listed(nbd_server, NAME)
    info = export_info("127.0.0.1", nbd_server.layout.port, NAME, tls=nbd_server.tls())
    assert info.size == 24 << 20 and not info.read_only


def test_write_then_read_back_reaches_the_volume(nbd_server: RunningServer) -> None:
    volume = publish(nbd_server)
    wait_listed(nbd_server, NAME)
    payload = os.urandom(64 * 1024)
    with nbd_server.connect() as conn:
        conn.open(NAME)
        conn.pwrite(1 << 20, payload)
        conn.flush()
        assert conn.pread(1 << 20, len(payload)) == payload
    with open(volume, "rb") as fh:
        fh.seek(1 << 20)
        assert fh.read(len(payload)) == payload


def test_data_written_by_nbdcopy_reads_back_identically(nbd_server: RunningServer, tmp_path: object) -> None:
    publish(nbd_server, size=4 << 20)
    wait_listed(nbd_server, NAME)
    source = nbd_server.layout.root / "source.bin"
    source.write_bytes(os.urandom(4 << 20))
    url = nbd_server.url(NAME)
    subprocess.run(["nbdcopy", str(source), url], check=True, timeout=60)
    with nbd_server.connect() as conn:
        conn.open(NAME)
        assert conn.pread(0, 4 << 20) == source.read_bytes()


def test_opening_an_unknown_export_is_an_error(nbd_server: RunningServer) -> None:
    with pytest.raises(NbdError):
        export_info("127.0.0.1", nbd_server.layout.port, "migration-vm-nope", tls=nbd_server.tls())


def test_nothing_listening_is_unavailable() -> None:
    from devtools.devserver import free_port

    with pytest.raises(NbdUnavailable):
        list_exports("127.0.0.1", free_port(), timeout=1)
