"""The VMA client against a hostile VMA: answers too large or too slow, answers that break the contract,
and plain http to another host. Each is a clear VmaError, and a bad inventory stores nothing."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from django.core.checks import registry

from migrations_app.actions import sync_inventory
from migrations_app.checks import vma_url_is_safe
from migrations_app.models import SourceVM
from migrations_app.vma_client import MAX_RESPONSE_BYTES, VmaClient, VmaError, VmaUnavailable, check_url

VM_ID = "4210aaaa-bbbb-4ccc-8ddd-eeeeffff0000"
GOOD_VM = {"id": VM_ID, "name": "web-01", "disks": [{"unit_number": 0, "key": 2000, "capacity_bytes": 1 << 20}]}

Answer = Callable[[BaseHTTPRequestHandler], None]


@pytest.fixture
def vma() -> Iterator[Callable[[Answer], str]]:
    servers: list[ThreadingHTTPServer] = []

    def serve(answer: Answer) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                answer(self)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def json_answer(body: Any, status: int = 200) -> Answer:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        raw = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(raw)))
        handler.end_headers()
        handler.wfile.write(raw)

    return answer


def test_an_answer_larger_than_the_cap_is_refused(vma: Callable[[Answer], str]) -> None:
    def huge(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.end_headers()  # no length: streamed until the client gives up
        chunk = b" " * (1 << 20)
        for _ in range(MAX_RESPONSE_BYTES // len(chunk) + 2):
            handler.wfile.write(chunk)

    with pytest.raises(VmaError, match="more than") as exc:
        VmaClient(vma(huge), "t", retries=0).health()
    assert exc.value.code == "too_large"


def test_a_vma_that_drips_bytes_hits_the_overall_deadline(vma: Callable[[Answer], str]) -> None:
    def drip(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.end_headers()
        for _ in range(100):
            handler.wfile.write(b" ")
            handler.wfile.flush()
            time.sleep(0.1)

    started = time.monotonic()
    with pytest.raises(VmaUnavailable) as exc:
        VmaClient(vma(drip), "t", retries=0, timeout=5, deadline=1.0).health()
    assert exc.value.code == "deadline" and time.monotonic() - started < 4


@pytest.mark.parametrize(
    ("vms", "why"),
    [
        ({"vms": "all of them"}, "vms is not a list"),
        ({"vms": [{**GOOD_VM, "id": "not-a-uuid"}]}, "is not a UUID"),
        ({"vms": [{**GOOD_VM, "name": "evil\x1b[2J"}]}, "name"),
        ({"vms": [{**GOOD_VM, "name": "x" * 300}]}, "name"),
        ({"vms": [{**GOOD_VM, "disks": [{"unit_number": 64, "key": 1, "capacity_bytes": 1}]}]}, "unit_number"),
        ({"vms": [{**GOOD_VM, "disks": [{"unit_number": True, "key": 1, "capacity_bytes": 1}]}]}, "unit_number"),
        ({"vms": [{**GOOD_VM, "disks": [{"unit_number": 0, "key": 1, "capacity_bytes": "1"}]}]}, "capacity_bytes"),
        ({"vms": [{**GOOD_VM, "disks": [{"unit_number": 0, "key": 1, "capacity_bytes": 0}]}]}, "capacity_bytes"),
        ({"vms": [{**GOOD_VM, "disks": [GOOD_VM["disks"][0], GOOD_VM["disks"][0]]}]}, "each once"),
        ({"vms": [{**GOOD_VM, "path": ["a"]}]}, "path"),
        ({"vms": [{**GOOD_VM, "cpus": 0}]}, "cpus"),
        ({"vms": [{**GOOD_VM, "memory_mib": "4096"}]}, "memory_mib"),
        ({"vms": [{**GOOD_VM, "firmware": "coreboot"}]}, "firmware"),
        ({"vms": [{**GOOD_VM, "power_state": "on"}]}, "power_state"),
        ({"vms": [{**GOOD_VM, "disk_controller": "../x"}]}, "disk_controller"),
        ({"vms": [{**GOOD_VM, "nics": [{"network": "VM Network", "mac": "00:50:56:zz:00:01"}]}]}, "mac"),
        ({"vms": [{**GOOD_VM, "nics": [{"network": "", "mac": "00:50:56:00:00:01"}]}]}, "network"),
        ({"vms": [{**GOOD_VM, "nics": [{"network": "a\nb", "mac": "00:50:56:00:00:01"}]}]}, "network"),
        ({"vms": [{**GOOD_VM, "nics": "VM Network"}]}, "nics"),
    ],
)
@pytest.mark.django_db
def test_a_malformed_inventory_is_refused_and_stores_nothing(
    vma: Callable[[Answer], str], vms: dict[str, Any], why: str
) -> None:
    good_then_bad = {"vms": [{**GOOD_VM, "id": "4210aaaa-bbbb-4ccc-8ddd-eeeeffff0001"}, *vms["vms"]]}
    body = good_then_bad if isinstance(vms["vms"], list) else vms
    with pytest.raises(VmaError, match=why) as exc:
        sync_inventory(VmaClient(vma(json_answer(body)), "t", retries=0).inventory())
    assert exc.value.code == "malformed"
    assert not SourceVM.objects.exists()


def test_an_error_answer_is_bounded_printable_text(vma: Callable[[Answer], str]) -> None:
    answer = json_answer({"error": {"code": "x\n" * 100, "message": "\x00\x1b" + "m" * 1000}}, status=500)
    with pytest.raises(VmaError) as exc:
        VmaClient(vma(answer), "t", retries=0).health()
    assert exc.value.code.isprintable() and len(exc.value.code) <= 64
    assert exc.value.message.isprintable() and len(exc.value.message) <= 300


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("http://127.0.0.1:9780", True),
        ("http://localhost:9780", True),
        ("http://[::1]:9780", True),
        ("https://vma.example:9780", True),
        ("http://vma.example:9780", False),
        ("http://10.0.0.5:9780", False),
        ("ftp://127.0.0.1", False),
        ("vma.example", False),
    ],
)
def test_plain_http_only_to_this_host(url: str, ok: bool) -> None:
    if ok:
        check_url(url)
    else:
        with pytest.raises(VmaError):
            check_url(url)


def test_an_insecure_vma_url_is_a_system_check_error(settings: Any) -> None:
    settings.OMA_VMA = {**settings.OMA_VMA, "URL": "http://vma.example:9780"}
    assert [message.id for message in vma_url_is_safe()] == ["oma.E001"]
    settings.OMA_VMA = {**settings.OMA_VMA, "URL": "https://vma.example:9780"}
    assert vma_url_is_safe() == []
    assert vma_url_is_safe in registry.registry.get_checks()  # registered: every manage.py command runs it


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A key and a self-signed certificate for 127.0.0.1, made by openssl."""
    key, cert = folder / f"{name}-key.pem", folder / f"{name}-cert.pem"
    command = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    command += ["-days", "2", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run([*command, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return key, cert


@pytest.fixture
def https_vma(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A VMA answering health over https with a self-signed certificate: its URL and that certificate."""
    key, cert = self_signed(tmp_path, "vma")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            json_answer({"status": "ok", "version": "1"})(self)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}", cert
    server.shutdown()
    server.server_close()


def test_clients_of_an_https_vma_share_one_tls_context_per_ca_file(
    https_vma: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers make a VMA client for each step that talks to the VMA; each new TLS context loads a CA
    bundle (about 20 ms of CPU), so clients share one per CA file. A CA file rewritten in place (a new
    CA) is read again by the next client; a client never trusts a VMA its CA file does not vouch for."""
    from migrations_app import vma_client

    url, cert = https_vma
    ca_file = tmp_path / "vma-ca.pem"
    ca_file.write_bytes(cert.read_bytes())
    made: list[object] = []
    create = ssl.create_default_context

    def counting(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        made.append(kwargs.get("cafile"))
        return create(*args, **kwargs)

    monkeypatch.setattr(vma_client.ssl, "create_default_context", counting)
    vma_client.tls_context.cache_clear()
    for _ in range(5):
        client = VmaClient(url, "token", retries=0, ca_file=str(ca_file))
        assert client.health()["status"] == "ok"
        client.close()
    assert made == [str(ca_file)], "one TLS context for five clients"

    _, other = self_signed(tmp_path, "other")
    ca_file.write_bytes(other.read_bytes())
    os.utime(ca_file, ns=(time.time_ns(), time.time_ns() + 1_000_000))  # a new mtime, however coarse
    client = VmaClient(url, "token", retries=0, ca_file=str(ca_file))
    with pytest.raises(VmaUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        client.health()
    client.close()
    assert len(made) == 2, "the rewritten CA file was read again"
    untrusted = VmaClient(url, "token", retries=0)  # the system's CAs do not know this VMA
    with pytest.raises(VmaUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        untrusted.health()
    untrusted.close()
