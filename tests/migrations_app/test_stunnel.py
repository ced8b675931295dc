"""The stunnel pair for VMAs whose NBD client cannot speak TLS, with Debian's stunnel4 on loopback and
the shipped configs: a migration copies through it end to end, and a VMA with the wrong key gets
nothing. The OMA side hands the stream to a plain nbdkit on a Unix socket, never to a TCP port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.devserver import free_port
from migrations_app.models import JobState
from tests.support.flows import assert_copied, migrate, wire
from tests.support.nbd import REPO, RunningServer
from tests.support.vma import Sim

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not shutil.which("stunnel4"), reason="stunnel4 is not installed (Debian package stunnel4)"),
]
STUNNEL = REPO / "deploy" / "stunnel"


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


class Pair:
    """The plain nbdkit on a Unix socket, the OMA-side stunnel and a VMA-side stunnel, from deploy/."""

    def __init__(self, server: RunningServer, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []
        sock = tmp_path / "plain" / "nbd.sock"
        sock.parent.mkdir(mode=0o700)
        self.procs.append(
            subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "file", f"dir={server.layout.export_root}"])
        )
        self.oma_port = free_port()
        oma = (STUNNEL / "oma-nbd.conf").read_text()
        oma = oma.replace("accept = 10810", f"accept = 127.0.0.1:{self.oma_port}")
        oma = oma.replace("/run/oma-nbd-plain/nbd.sock", str(sock)).replace(
            "/etc/oma/nbd.psk", str(server.layout.psk_file)
        )
        self.start("oma.conf", oma)
        wait_port(self.oma_port)
        self.server = server

    def start(self, name: str, text: str) -> None:
        conf = self.tmp / name
        conf.write_text(text)
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - kept open for the process's life
        self.procs.append(subprocess.Popen(["stunnel4", str(conf)], stdout=log, stderr=subprocess.STDOUT))

    def vma_side(self, key_file: Path, identity: str = "vma") -> int:
        port = free_port()
        vma = (STUNNEL / "vma-nbd.conf").read_text()
        vma = vma.replace("accept = 127.0.0.1:10808", f"accept = 127.0.0.1:{port}")
        vma = vma.replace("oma.example.internal:10810", f"127.0.0.1:{self.oma_port}")
        vma = vma.replace("/etc/vma/nbd.psk", str(key_file)).replace(
            "PSKidentity = vma-01", f"PSKidentity = {identity}"
        )
        self.start(f"vma-{port}.conf", vma)
        wait_port(port)
        return port

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=10)


@pytest.fixture
def pair(nbdkit_server: RunningServer, tmp_path: Path) -> Iterator[Pair]:
    tunnel = Pair(nbdkit_server, tmp_path)
    yield tunnel
    tunnel.close()


def test_a_vma_without_nbd_tls_migrates_through_the_pair(
    nbdkit_server: RunningServer, pair: Pair, sim: Sim, settings: object
) -> None:
    vma_port = pair.vma_side(nbdkit_server.layout.vma_psk_file)
    wire(settings, nbdkit_server, sim)
    # The VMA's view: plain NBD to its own end of the tunnel.
    settings.OMA_VMA = {**settings.OMA_VMA, "NBD_TLS": False, "NBD_HOST": "127.0.0.1", "NBD_PORT": vma_port}  # type: ignore[attr-defined]
    job = migrate("db-01", sim)
    assert job.state == JobState.COMPLETED, job.error
    assert_copied(job, sim)
    urls = [copy.nbd_url for r in sim.sim.replications.values() for copy in r.copies]
    assert urls and all(url.startswith(f"nbd://127.0.0.1:{vma_port}/") for url in urls)


def test_a_wrong_key_gets_nothing_through_the_pair(nbdkit_server: RunningServer, pair: Pair, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.psk"
    wrong.write_text("vma:" + os.urandom(32).hex() + "\n")
    wrong.chmod(0o600)
    port = pair.vma_side(wrong)
    listed = subprocess.run(
        ["nbdinfo", "--list", f"nbd://127.0.0.1:{port}"], capture_output=True, text=True, timeout=30, check=False
    )
    assert listed.returncode != 0
    # The right key through the same OMA side lists the exports: the refusal was the key.
    good = pair.vma_side(nbdkit_server.layout.vma_psk_file)
    ok = subprocess.run(
        ["nbdinfo", "--list", f"nbd://127.0.0.1:{good}"], capture_output=True, text=True, timeout=30, check=False
    )
    assert ok.returncode == 0, ok.stderr


def test_the_oma_side_speaks_no_plain_nbd(pair: Pair) -> None:
    """A plain client at the OMA's tunnel port gets no NBD greeting (stunnel waits for a TLS hello)."""
    with socket.create_connection(("127.0.0.1", pair.oma_port), timeout=5) as sock:
        sock.settimeout(1.5)
        try:
            greeting = sock.recv(18)
        except TimeoutError:
            greeting = b""
    assert b"NBDMAGIC" not in greeting
