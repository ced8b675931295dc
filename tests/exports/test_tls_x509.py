"""NBD over TLS on the nbd-server backend: nbd-server has no pre-shared keys, so each identity (the
portal, each VMA) holds its own self-signed client certificate and the server trusts exactly those
(force_tls, cacertfile). Nobody without a trusted certificate lists, reads or writes an export."""

from __future__ import annotations

import json
import os
import subprocess
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from devtools.devserver import PORTAL_IDENTITY, VMA_IDENTITY, free_port, write_layout
from exports import actions
from exports.models import ExportEvent
from exports.nbd_protocol import NbdConnection, NbdError, NbdTlsRefused, TlsX509, list_exports
from tests.support.nbd import RunningServer, as_nobody, run_helper

pytestmark = pytest.mark.django_db(transaction=True)

VM = "4210aaaa-bbbb-4ccc-8ddd-eeeeffff0001"
NAME = f"migration-vm-{VM}-disk0"
SECRET = b"only-a-trusted-certificate-reads-this"


def exported(server: RunningServer) -> str:
    device = server.volume("v0.img", size=1 << 20, fill=SECRET)
    actions.ensure_export(vm_id=VM, vm_name="vm", disk_unit=0, device=device)
    return device


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def self_signed(folder: Path, common_name: str) -> Path:
    """A client certificate folder a stranger could make: self-signed, trusting the real server."""
    folder.mkdir(mode=0o700)
    info = folder / "cert.info"
    info.write_text(f'cn = "{common_name}"\ntls_www_client\nsigning_key\nexpiration_days = 30\n')
    key, cert = folder / "client-key.pem", folder / "client-cert.pem"
    subprocess.run(["certtool", "--generate-privkey", "--key-type=ecdsa", "--no-text", "--outfile", str(key)],
                   check=True, capture_output=True)  # fmt: skip
    subprocess.run(["certtool", "--generate-self-signed", "--load-privkey", str(key), "--template", str(info),
                    "--outfile", str(cert)], check=True, capture_output=True)  # fmt: skip
    return folder


def test_the_default_nbd_server_layout_requires_tls(nbdserver_server: RunningServer) -> None:
    layout = nbdserver_server.layout
    assert layout.tls
    config = layout.server_config.read_text()
    assert "force_tls = true" in config and f"cacertfile = {layout.x509_dir / 'clients.pem'}" in config
    for secret in (layout.x509_dir / "server-key.pem", layout.portal_tls / "client-key.pem"):
        assert secret.stat().st_mode & 0o077 == 0, f"{secret} is readable by others"
    assert layout.portal_tls.stat().st_mode & 0o777 == 0o700
    status = json.loads(run_helper(layout, "status").stdout)
    assert status["tls"] is True and status["verified"]


def test_a_plain_client_or_one_without_a_trusted_certificate_is_refused(
    nbdserver_server: RunningServer, tmp_path: Path
) -> None:
    exported(nbdserver_server)
    port = nbdserver_server.layout.port
    with pytest.raises(NbdError):
        list_exports("127.0.0.1", port)
    with pytest.raises(NbdError):
        NbdConnection("127.0.0.1", port).open(NAME)
    stranger = self_signed(tmp_path / "stranger", PORTAL_IDENTITY)  # the right name is not enough
    (stranger / "ca-cert.pem").write_bytes((nbdserver_server.layout.portal_tls / "ca-cert.pem").read_bytes())
    with pytest.raises(NbdTlsRefused):
        list_exports("127.0.0.1", port, tls=TlsX509.from_dir(stranger))
    no_cert = subprocess.run(["nbdinfo", "--list", f"nbds://127.0.0.1:{port}/?tls-certificates={stranger}"],
                             capture_output=True, timeout=30)  # fmt: skip
    assert no_cert.returncode != 0
    assert NAME in list_exports("127.0.0.1", port, tls=TlsX509.from_dir(nbdserver_server.layout.portal_tls))


def test_the_portal_checks_the_servers_certificate_and_name(nbdserver_server: RunningServer, tmp_path: Path) -> None:
    """The client authenticates the server too: a certificate for another name, or another server's
    certificate, is refused (no one in the middle reads what a VMA writes)."""
    exported(nbdserver_server)
    port = nbdserver_server.layout.port
    portal = TlsX509.from_dir(nbdserver_server.layout.portal_tls)
    with pytest.raises(NbdTlsRefused, match="certificate"):
        list_exports("localhost", port, tls=portal)  # the certificate names 127.0.0.1 only
    wrong_ca = tmp_path / "wrong-ca"
    wrong_ca.mkdir(mode=0o700)
    for name in ("client-cert.pem", "client-key.pem"):
        (wrong_ca / name).write_bytes((nbdserver_server.layout.portal_tls / name).read_bytes())
    (wrong_ca / "ca-cert.pem").write_bytes((self_signed(tmp_path / "other", "x") / "client-cert.pem").read_bytes())
    with pytest.raises(NbdTlsRefused):
        list_exports("127.0.0.1", port, tls=TlsX509.from_dir(wrong_ca))


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to 'nobody' needs root")
def test_a_local_user_without_a_certificate_cannot_list_read_or_write(
    nbdserver_server: RunningServer, tmp_path: Path
) -> None:
    device = exported(nbdserver_server)
    before = Path(device).read_bytes()
    layout = nbdserver_server.layout
    port = layout.port
    for secret in (layout.x509_dir / "server-key.pem", layout.portal_tls / "client-key.pem",
                   layout.vma_tls / "client-key.pem"):  # fmt: skip
        assert as_nobody("cat", str(secret)).returncode != 0
    stranger = self_signed(tmp_path / "nobody-cert", VMA_IDENTITY)
    (stranger / "ca-cert.pem").write_bytes((layout.portal_tls / "ca-cert.pem").read_bytes())
    os.chown(tmp_path, 65534, -1)
    for path in (stranger, *stranger.iterdir()):
        os.chown(path, 65534, -1)
    assert as_nobody("nbdinfo", "--list", f"nbd://127.0.0.1:{port}").returncode != 0
    assert as_nobody("nbdinfo", "--list", f"nbds://127.0.0.1:{port}/?tls-certificates={stranger}").returncode != 0
    for url in (f"nbd://127.0.0.1:{port}/{NAME}", f"nbds://127.0.0.1:{port}/{NAME}?tls-certificates={stranger}"):
        read = as_nobody("nbdcopy", url, "/dev/null")
        assert read.returncode != 0, f"{url} was readable"
        write = as_nobody("nbdcopy", "/dev/zero", url, "--length=4096")
        assert write.returncode != 0, f"{url} was writable"
    assert Path(device).read_bytes() == before
    # The VMA's own certificate folder opens it (what the simulator uses).
    listed = subprocess.run(["nbdinfo", "--list", f"nbds://127.0.0.1:{port}/?tls-certificates={layout.vma_tls}"],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert listed.returncode == 0 and NAME in listed.stdout, listed.stderr


def test_rotation_keeps_open_transfers_and_refuses_the_old_certificate(
    nbdserver_server: RunningServer, tmp_path: Path
) -> None:
    exported(nbdserver_server)
    port = nbdserver_server.layout.port
    old_copy = tmp_path / "old-portal"
    old_copy.mkdir(mode=0o700)
    for path in nbdserver_server.layout.portal_tls.iterdir():
        (old_copy / path.name).write_bytes(path.read_bytes())
    old = TlsX509.from_dir(old_copy)
    with NbdConnection("127.0.0.1", port, tls=old) as conn:
        conn.open(NAME)
        call_command("nbd_keys", "portal", stdout=StringIO())  # rotates the portal's certificate mid-transfer
        conn.pwrite(4096, b"written after the rotation")  # the open transfer goes on
        conn.flush()
        assert conn.pread(0, len(SECRET)) == SECRET
    with pytest.raises(NbdTlsRefused):
        list_exports("127.0.0.1", port, tls=old)
    new = TlsX509.from_dir(nbdserver_server.layout.portal_tls)
    assert (old_copy / "client-cert.pem").read_bytes() != (new.directory / "client-cert.pem").read_bytes()
    assert NAME in list_exports("127.0.0.1", port, tls=new)  # no restart, no reload
    assert ExportEvent.objects.filter(kind="tls.key_rotated", data__identity=PORTAL_IDENTITY).exists()


def test_a_vma_certificate_added_by_command_works_at_once_and_stops_working_when_removed(
    nbdserver_server: RunningServer, tmp_path: Path
) -> None:
    exported(nbdserver_server)
    port = nbdserver_server.layout.port
    folder = tmp_path / "vma-02"
    with pytest.raises(CommandError, match="--out"):
        call_command("nbd_keys", "add", "vma-02", stdout=StringIO())
    call_command("nbd_keys", "add", "vma-02", "--out", str(folder), stdout=StringIO())
    assert folder.stat().st_mode & 0o777 == 0o700 and (folder / "client-key.pem").stat().st_mode & 0o777 == 0o600
    vma = TlsX509.from_dir(folder)
    with NbdConnection("127.0.0.1", port, tls=vma) as conn:
        assert conn.open(NAME).size == 1 << 20
    # libnbd takes the same folder (what a real VMA runs)
    copied = subprocess.run(["nbdcopy", f"nbds://127.0.0.1:{port}/{NAME}?tls-certificates={folder}", "-"],
                            capture_output=True, timeout=60)  # fmt: skip
    assert copied.returncode == 0 and copied.stdout.startswith(SECRET), copied.stderr
    listed = StringIO()
    call_command("nbd_keys", "list", stdout=listed)
    assert listed.getvalue().split() == sorted([PORTAL_IDENTITY, VMA_IDENTITY, "vma-02"])
    with pytest.raises(CommandError, match="exists"):
        call_command("nbd_keys", "add", "vma-02", "--out", str(folder), stdout=StringIO())
    with pytest.raises(CommandError, match="pre-shared keys"):
        call_command("nbd_keys", "import", "vma-02", "--key-file", str(folder / "client-cert.pem"))
    call_command("nbd_keys", "remove", "vma-02", stdout=StringIO())
    with pytest.raises(NbdTlsRefused):
        list_exports("127.0.0.1", port, tls=vma)
    assert ExportEvent.objects.filter(kind="tls.key_removed", data__identity="vma-02").exists()


@pytest.mark.parametrize(
    "identity",
    ["", "-lead", "a:b", "a b", "a\nb", "a/b", "../x", "x" * 65, "a=b", "a[b]", "ünï", "a..b", 'a"b', "a\\b"],
)
def test_hostile_identities_are_refused_and_change_nothing(tmp_path: Path, identity: str) -> None:
    layout = write_layout(tmp_path / "nbd", "nbd-server", "127.0.0.1", free_port())
    before = snapshot(layout.x509_dir)
    for verb in ("cert-add", "cert-rotate", "cert-remove"):
        proc = run_helper(layout, verb, identity)
        reply = json.loads(proc.stdout.strip().splitlines()[-1])
        assert proc.returncode in (2, 3) and reply["ok"] is False, reply
        assert snapshot(layout.x509_dir) == before


def test_a_client_file_the_helper_did_not_write_is_never_trusted(tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "nbd", "nbd-server", "127.0.0.1", free_port())
    planted = layout.x509_dir / "clients" / "intruder.pem"
    planted.write_text("-----BEGIN CERTIFICATE-----\nnot base64 !\n-----END CERTIFICATE-----\n")
    before = snapshot(layout.x509_dir)
    for args in (("cert-add", "vma-03"), ("cert-list",), ("start",)):
        proc = run_helper(layout, *args)
        assert proc.returncode == 4 and "bad_client_cert" in proc.stdout, proc.stdout
    assert snapshot(layout.x509_dir) == before
    assert "not base64" not in (layout.x509_dir / "clients.pem").read_text()


@pytest.mark.parametrize(
    ("edit", "wrong"),
    [
        (lambda text: text.replace("    force_tls = true\n", ""), "force_tls"),
        (lambda text: text.replace("force_tls = true", "force_tls = false"), "force_tls"),
        (lambda text: text.replace("clients.pem", "other.pem"), "cacertfile"),
        (lambda text: text.replace("    cacertfile", "#    cacertfile"), "cacertfile"),
    ],
)
def test_a_server_config_that_would_not_require_tls_is_refused_before_it_starts(
    tmp_path: Path, edit: object, wrong: str
) -> None:
    layout = write_layout(tmp_path / "nbd", "nbd-server", "127.0.0.1", free_port())
    layout.server_config.write_text(edit(layout.server_config.read_text()))  # type: ignore[operator]
    proc = run_helper(layout, "start")
    reply = json.loads(proc.stdout)
    assert proc.returncode == 4 and reply["error"] == "tls_not_required" and wrong in reply["message"], reply
    assert not layout.pidfile.exists()


def test_certificates_need_nbd_server(tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "nbd", "nbdkit", "127.0.0.1", free_port())
    layout.helper_config.write_text(layout.helper_config.read_text() + f"tls_x509_dir = {layout.root / 'x'}\n")
    proc = run_helper(layout, "cert-list")
    assert proc.returncode == 4 and "needs backend nbd-server" in proc.stdout


@pytest.mark.parametrize("name", ["a,b", "a;b", "-x", "a\\nb", "a/b", "x" * 300])
def test_hostile_server_names_in_the_config_are_refused(tmp_path: Path, name: str) -> None:
    layout = write_layout(tmp_path / "nbd", "nbd-server", "127.0.0.1", free_port())
    before = snapshot(layout.x509_dir)
    layout.helper_config.write_text(layout.helper_config.read_text() + f"tls_server_names = 127.0.0.1 {name}\n")
    proc = run_helper(layout, "cert-add", "vma-04")
    assert proc.returncode == 4 and "tls_server_names" in proc.stdout, proc.stdout
    assert snapshot(layout.x509_dir) == before
