"""NBD over TLS with pre-shared keys: nobody without a key reads or writes an export; keys are made,
rotated and removed by the helper without dropping a transfer."""

from __future__ import annotations

import json
import os
import re
import subprocess
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from devtools.devserver import PORTAL_IDENTITY, TLS_PRIORITY_FILE, VMA_IDENTITY, cpu_has_aes, free_port, write_layout
from exports import actions
from exports.models import ExportEvent
from exports.nbd_protocol import IDENTITY_RE, NbdConnection, NbdError, NbdTlsRefused, TlsPsk, list_exports
from tests.support.nbd import RunningServer, as_nobody, load_helper_module, run_helper

pytestmark = pytest.mark.django_db(transaction=True)

VM = "4210aaaa-bbbb-4ccc-8ddd-eeeeffff0000"
NAME = f"migration-vm-{VM}-disk0"
SECRET = b"only-the-key-holder-reads-this"


def exported(server: RunningServer) -> str:
    device = server.volume("v0.img", size=1 << 20, fill=SECRET)
    actions.ensure_export(vm_id=VM, vm_name="vm", disk_unit=0, device=device)
    return device


def test_the_default_nbdkit_layout_requires_tls(nbdkit_server: RunningServer) -> None:
    assert nbdkit_server.layout.tls
    cmdline = Path(f"/proc/{nbdkit_server.main_pid()}/cmdline").read_bytes().split(b"\0")
    assert b"--tls=require" in cmdline and f"--tls-psk={nbdkit_server.layout.psk_file}".encode() in cmdline
    for key_file in (nbdkit_server.layout.psk_file, nbdkit_server.layout.portal_psk_file):
        assert key_file.stat().st_mode & 0o077 == 0, f"{key_file} is readable by others"


def test_a_plain_client_is_refused(nbdkit_server: RunningServer) -> None:
    exported(nbdkit_server)
    with pytest.raises(NbdTlsRefused, match="requires TLS"):
        list_exports("127.0.0.1", nbdkit_server.layout.port)
    with pytest.raises(NbdError):
        NbdConnection("127.0.0.1", nbdkit_server.layout.port).open(NAME)
    # libnbd's own tools, as the portal's user would try them
    plain = subprocess.run(
        ["nbdinfo", "--list", f"nbd://127.0.0.1:{nbdkit_server.layout.port}"], capture_output=True, timeout=30
    )
    assert plain.returncode != 0


def test_a_wrong_key_or_unknown_identity_is_refused(nbdkit_server: RunningServer) -> None:
    exported(nbdkit_server)
    good = TlsPsk.from_file(nbdkit_server.layout.portal_psk_file)
    for bad in (TlsPsk(good.identity, bytes(32)), TlsPsk("intruder", good.key)):
        with pytest.raises(NbdTlsRefused):
            list_exports("127.0.0.1", nbdkit_server.layout.port, tls=bad)
    assert NAME in list_exports("127.0.0.1", nbdkit_server.layout.port, tls=good)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to 'nobody' needs root")
def test_a_local_user_without_the_key_cannot_list_read_or_write(nbdkit_server: RunningServer, tmp_path: Path) -> None:
    device = exported(nbdkit_server)
    before = Path(device).read_bytes()
    port = nbdkit_server.layout.port
    # The key files are the owner's alone: nobody cannot read them to borrow a key ...
    for key_file in (nbdkit_server.layout.psk_file, nbdkit_server.layout.portal_psk_file):
        assert as_nobody("cat", str(key_file)).returncode != 0
    # ... and without one it can neither list, nor read, nor write, in plain or over TLS.
    assert as_nobody("nbdinfo", "--list", f"nbd://127.0.0.1:{port}").returncode != 0
    assert as_nobody("nbdinfo", "--list", f"nbds://127.0.0.1:{port}").returncode != 0
    read = as_nobody("nbdcopy", f"nbd://127.0.0.1:{port}/{NAME}", "-")
    assert read.returncode != 0 and SECRET.decode() not in read.stdout
    tls_read = as_nobody("nbdcopy", f"nbds://127.0.0.1:{port}/{NAME}", "-")
    assert tls_read.returncode != 0 and SECRET.decode() not in tls_read.stdout
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(1 << 20))
    zeros.chmod(0o644)
    tmp_path.chmod(0o755)
    for scheme in ("nbd", "nbds"):
        assert as_nobody("nbdcopy", str(zeros), f"{scheme}://127.0.0.1:{port}/{NAME}").returncode != 0
    assert Path(device).read_bytes() == before
    # The key holder gets through, with libnbd's tools as with the portal's own client.
    listed = subprocess.run(["nbdinfo", "--list", nbdkit_server.url("")], capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0 and NAME in listed.stdout, listed.stderr


def test_rotation_keeps_open_transfers_and_refuses_the_old_key(nbdkit_server: RunningServer) -> None:
    exported(nbdkit_server)
    old = TlsPsk.from_file(nbdkit_server.layout.portal_psk_file)
    with NbdConnection("127.0.0.1", nbdkit_server.layout.port, tls=old) as conn:
        conn.open(NAME)
        out = StringIO()
        call_command("nbd_keys", "portal", stdout=out)  # rotates the portal's identity mid-transfer
        new = TlsPsk.from_file(nbdkit_server.layout.portal_psk_file)
        assert new.key != old.key and new.identity == PORTAL_IDENTITY
        conn.pwrite(4096, b"written after the rotation")  # the open transfer goes on
        conn.flush()
        assert conn.pread(0, len(SECRET)) == SECRET
    with pytest.raises(NbdTlsRefused):
        list_exports("127.0.0.1", nbdkit_server.layout.port, tls=old)
    assert NAME in list_exports("127.0.0.1", nbdkit_server.layout.port, tls=new)
    assert ExportEvent.objects.filter(kind="tls.key_rotated", data__identity=PORTAL_IDENTITY).exists()


def test_a_vma_key_added_by_command_works_at_once_and_stops_working_when_removed(
    nbdkit_server: RunningServer, tmp_path: Path
) -> None:
    exported(nbdkit_server)
    key_file = tmp_path / "vma-02.psk"
    call_command("nbd_keys", "add", "vma-02", "--out", str(key_file), stdout=StringIO())
    assert key_file.stat().st_mode & 0o777 == 0o600
    vma = TlsPsk.from_file(key_file)
    assert vma.identity == "vma-02"
    with NbdConnection("127.0.0.1", nbdkit_server.layout.port, tls=vma) as conn:
        assert conn.open(NAME).size == 1 << 20  # no server restart was needed
    listed = StringIO()
    call_command("nbd_keys", "list", stdout=listed)
    assert listed.getvalue().split() == sorted([PORTAL_IDENTITY, VMA_IDENTITY, "vma-02"])
    assert vma.key.hex() not in listed.getvalue()
    with pytest.raises(CommandError, match="exists"):
        call_command("nbd_keys", "add", "vma-02", "--out", str(key_file), stdout=StringIO())
    call_command("nbd_keys", "remove", "vma-02", stdout=StringIO())
    with pytest.raises(NbdTlsRefused):
        list_exports("127.0.0.1", nbdkit_server.layout.port, tls=vma)


def test_a_vma_key_made_on_one_node_is_imported_on_another_and_opens_both(
    nbdkit_server: RunningServer, tmp_path: Path, settings: object
) -> None:
    """Several OMA nodes, one VMA: its key, made on one node, is imported on the next (from the client
    file, through stdin), so the VMA reaches whichever node its disks are placed on."""
    exported(nbdkit_server)
    key_file = tmp_path / "vma-07.psk"
    call_command("nbd_keys", "add", "vma-07", "--out", str(key_file), stdout=StringIO())
    other = write_layout(tmp_path / "node-b", "nbdkit", "127.0.0.1", free_port())
    conf = settings.OMA_NBD  # type: ignore[attr-defined]
    settings.OMA_NBD = {**conf, "HELPER_CONFIG": str(other.helper_config)}  # type: ignore[attr-defined]
    out = StringIO()
    call_command("nbd_keys", "import", "vma-07", "--key-file", str(key_file), stdout=out)
    assert out.getvalue().strip() == "vma-07: key added on this node"
    vma = TlsPsk.from_file(key_file)
    assert f"vma-07:{vma.key.hex()}\n" in other.psk_file.read_text()
    assert ExportEvent.objects.filter(kind="tls.key_imported", data__identity="vma-07").exists()
    again = StringIO()
    call_command("nbd_keys", "import", "vma-07", "--key-file", str(key_file), stdout=again)
    assert again.getvalue().strip() == "vma-07: key already held on this node"
    assert run_helper(other, "start").returncode == 0
    try:
        assert list_exports("127.0.0.1", other.port, tls=vma) == []  # the other node lets the VMA in
        assert NAME in list_exports("127.0.0.1", nbdkit_server.layout.port, tls=vma)
    finally:
        run_helper(other, "stop")
    with pytest.raises(CommandError, match="not a key file for vma-08"):
        call_command("nbd_keys", "import", "vma-08", "--key-file", str(key_file), stdout=StringIO())


@pytest.mark.parametrize(
    "given",
    [
        "",
        "ab" * 31,  # too short
        "ab" * 33,  # too long
        "AB" * 32,  # not how keys are written
        "zz" * 32,
        "vma-09:" + "ab" * 32,  # another identity's line
        "vma-07:" + "ab" * 32 + "\nvma-07:" + "cd" * 32,  # two lines
        "ab" * 32 + "\r\n",
        "ab" * 32 + "\x00",
        "ab" * 200,
    ],
)
def test_a_malformed_imported_key_is_refused_and_changes_nothing(tmp_path: Path, given: str) -> None:
    layout = write_layout(tmp_path / "nbd", "nbdkit", "127.0.0.1", free_port())
    before = layout.psk_file.read_bytes()
    proc = run_helper(layout, "psk-import", "vma-07", stdin=given)
    reply = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 3 and reply["error"] == "invalid_key", reply
    assert "ab" * 16 not in proc.stdout, "a key is never echoed"
    assert layout.psk_file.read_bytes() == before


def test_a_copy_over_tls_with_nbdcopy_reads_back(nbdkit_server: RunningServer) -> None:
    device = exported(nbdkit_server)
    source = nbdkit_server.layout.root / "src.bin"
    source.write_bytes(os.urandom(1 << 20))
    subprocess.run(["nbdcopy", "--flush", str(source), nbdkit_server.url(NAME)], check=True, timeout=60)
    assert Path(device).read_bytes() == source.read_bytes()


@pytest.mark.parametrize(
    "identity",
    ["", "-lead", "a:b", "a b", "a\nb", "a/b", "x" * 65, "a=b", "a[b]", "ünï", "a..b"],
)
def test_hostile_identities_are_refused_and_change_nothing(tmp_path: Path, identity: str) -> None:
    layout = write_layout(tmp_path / "nbd", "nbdkit", "127.0.0.1", free_port())
    before = layout.psk_file.read_bytes()
    for verb in ("psk-add", "psk-rotate", "psk-import", "psk-remove"):
        proc = run_helper(layout, verb, identity)
        reply = json.loads(proc.stdout.strip().splitlines()[-1])
        assert proc.returncode in (2, 3) and reply["ok"] is False, reply
        assert layout.psk_file.read_bytes() == before


def test_a_key_file_the_helper_did_not_write_is_not_rewritten(tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "nbd", "nbdkit", "127.0.0.1", free_port())
    tampered = layout.psk_file.read_bytes() + b"# a comment someone added\n"
    layout.psk_file.write_bytes(tampered)
    proc = run_helper(layout, "psk-add", "vma-03")
    assert proc.returncode == 4 and "bad_psk_file" in proc.stdout
    assert layout.psk_file.read_bytes() == tampered


def test_tls_needs_nbdkit(tmp_path: Path) -> None:
    layout = write_layout(tmp_path / "nbd", "nbd-server", "127.0.0.1", free_port())
    helper_config = layout.helper_config.read_text()
    layout.helper_config.write_text(helper_config + f"tls_psk_file = {layout.root / 'nbd.psk'}\n")
    proc = run_helper(layout, "psk-list")
    assert proc.returncode == 4 and "needs backend nbdkit" in proc.stdout


def test_the_portal_and_the_helper_agree_on_identities() -> None:
    helper = load_helper_module()
    for identity in ["vma", "vma-01", "a.b_c", "x" * 64, "x" * 65, "-a", "a:b", "", "a b"]:
        assert bool(IDENTITY_RE.fullmatch(identity)) == bool(helper.IDENTITY_RE.fullmatch(identity)), identity


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another group needs root")
def test_the_key_file_is_readable_by_the_servers_group_only(tmp_path: Path) -> None:
    import grp

    layout = write_layout(tmp_path / "nbd", "nbdkit", "127.0.0.1", free_port())
    layout.helper_config.write_text(layout.helper_config.read_text() + "tls_group = nogroup\n")
    proc = run_helper(layout, "psk-add", "vma-04")
    assert proc.returncode == 0, proc.stdout
    st = layout.psk_file.stat()
    assert st.st_mode & 0o777 == 0o640 and st.st_gid == grp.getgrnam("nogroup").gr_gid
    layout.helper_config.write_text(layout.helper_config.read_text().replace("nogroup", "no-such-group"))
    before = layout.psk_file.read_bytes()
    refused = run_helper(layout, "psk-add", "vma-05")
    assert refused.returncode == 4 and "does not exist" in refused.stdout
    assert layout.psk_file.read_bytes() == before


def _libnbd_cipher(url: str) -> str:
    proc = subprocess.run(
        ["nbdinfo", url], capture_output=True, text=True, timeout=30, env={**os.environ, "LIBNBD_DEBUG": "1"}
    )
    found = re.search(r"connection is using TLS: cipher (\S+)", proc.stderr)
    assert found, proc.stderr[-2000:]
    return found.group(1)


@pytest.mark.skipif(not cpu_has_aes(), reason="the priority file is installed only where the CPU has AES")
def test_the_server_settles_on_aes_gcm_where_the_cpu_has_aes(nbdkit_server: RunningServer, tmp_path: Path) -> None:
    """ChaCha20 costs about three times as much per byte as AES-GCM on a CPU with AES instructions; the
    server's GnuTLS priority file takes it off, for libnbd's clients (the VMA) and the portal alike."""
    layout = nbdkit_server.layout
    exported(nbdkit_server)
    environ = Path(f"/proc/{nbdkit_server.main_pid()}/environ").read_bytes().split(b"\0")
    assert f"GNUTLS_SYSTEM_PRIORITY_FILE={TLS_PRIORITY_FILE}".encode() in environ
    assert _libnbd_cipher(nbdkit_server.url(NAME, identity=PORTAL_IDENTITY)) == "AES-128-GCM"
    tls = TlsPsk.from_file(layout.portal_psk_file, PORTAL_IDENTITY)
    with NbdConnection("127.0.0.1", layout.port, tls=tls) as conn:
        assert conn.sock.cipher()[0] == "TLS_AES_128_GCM_SHA256"  # type: ignore[attr-defined]

    # Without the file (as on a CPU without AES), GnuTLS's own order picks ChaCha20 again.
    config = layout.helper_config.read_text()
    layout.helper_config.write_text(config.replace("tls_priority_file = ", "# tls_priority_file = "))
    assert run_helper(layout, "restart").returncode == 0
    environ = Path(f"/proc/{nbdkit_server.main_pid()}/environ").read_bytes().split(b"\0")
    assert not any(line.startswith(b"GNUTLS_") for line in environ)
    assert _libnbd_cipher(nbdkit_server.url(NAME, identity=PORTAL_IDENTITY)) == "CHACHA20-POLY1305"
