"""A small NBD protocol client (fixed newstyle handshake, simple replies), standard library only.

No PyPI package wraps libnbd, and ``nbdinfo --list`` opens every export (22 s for 500 exports on
nbd-server here), so the portal speaks the protocol itself for what it needs: a names-only export
list (NBD_OPT_LIST), opening an export for its real size (NBD_OPT_GO; nbd-server answers
NBD_OPT_INFO with size 0), and plain reads and writes for verification.

With a ``TlsPsk`` the connection upgrades with NBD_OPT_STARTTLS before any other option and then
speaks TLS with a pre-shared key (what nbdkit ``--tls=require --tls-psk=FILE`` asks for; Python
3.13's ``SSLContext.set_psk_client_callback``). With a ``TlsX509`` it presents a client certificate
and checks the server's (what nbd-server ``force_tls`` with a ``cacertfile`` asks for).
Reference: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
"""

from __future__ import annotations

import errno
import os
import re
import socket
import ssl
import struct
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_GO = 7

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
REP_ERR_TLS_REQD = 5
REP_ERRORS = {
    1: "unsupported option",
    2: "forbidden by policy",
    3: "invalid",
    4: "not supported on this platform",
    REP_ERR_TLS_REQD: "the server requires TLS",
    6: "unknown export",
    7: "server shutting down",
    8: "block size negotiation required",
}
INFO_EXPORT = 0

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3

TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2

MAX_NAME = 4096
MAX_REPLY = 1 << 20


class NbdError(Exception):
    """The server refused, or spoke something this client does not understand."""


class NbdUnavailable(NbdError):
    """Nothing answered the NBD handshake at that address."""


class NbdConnectionLost(NbdError):
    """The server went away in the middle of a reply (it stopped, or was restarted)."""


class NbdTlsRefused(NbdError):
    """The server answered but the TLS upgrade failed: no TLS, or it does not accept this key."""


# A PSK identity as psktool and nbdkit accept it, and as the helper writes it (a test checks they agree).
IDENTITY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PSK_LINE_RE = re.compile(r"(?P<identity>[A-Za-z0-9][A-Za-z0-9._-]{0,63}):(?P<key>(?:[0-9a-fA-F]{2}){16,64})")


@dataclass(frozen=True)
class TlsPsk:
    """A TLS pre-shared key: the identity this client presents and its key."""

    identity: str
    key: bytes = field(repr=False)

    @classmethod
    def from_file(cls, path: str | Path, identity: str | None = None) -> TlsPsk:
        """Read a psktool-format file (``identity:hexkey`` per line): the named identity, or the only one."""
        try:
            text = Path(path).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise NbdError(f"cannot read the NBD TLS key file {path}: {exc}") from exc
        found: dict[str, bytes] = {}
        for line in text.splitlines():
            match = PSK_LINE_RE.fullmatch(line.strip())
            if match:
                found[match["identity"]] = bytes.fromhex(match["key"])
        if identity is None and len(found) == 1:
            identity = next(iter(found))
        if identity is None or identity not in found:
            wanted = f"identity {identity!r}" if identity else "exactly one identity"
            raise NbdError(f"the NBD TLS key file {path} holds no key for {wanted}")
        return cls(identity, found[identity])

    def wrap(self, sock: socket.socket, host: str) -> ssl.SSLSocket:
        return self.context().wrap_socket(sock)

    def context(self) -> ssl.SSLContext:
        if not hasattr(ssl.SSLContext, "set_psk_client_callback"):
            raise NbdError("NBD over TLS with a pre-shared key needs Python 3.13 or newer")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # PSK authenticates both sides; there is no certificate
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("PSK")
        ctx.set_psk_client_callback(lambda hint: (self.identity, self.key))
        return ctx


@dataclass(frozen=True)
class TlsX509:
    """A client certificate folder as libnbd's ``tls-certificates`` takes it: ``ca-cert.pem`` (the
    server's certificate, the only one trusted), ``client-cert.pem`` and ``client-key.pem``."""

    directory: Path
    identity: str = "client certificate"

    @classmethod
    def from_dir(cls, path: str | Path, identity: str | None = None) -> TlsX509:
        folder = Path(path)
        missing = [name for name in X509_FILES if not (folder / name).is_file()]
        if missing:
            raise NbdError(f"the NBD TLS certificate folder {folder} lacks {', '.join(missing)}")
        return cls(folder, identity or "client certificate")

    @classmethod
    def save(cls, folder: Path, certificate: str, key: str, server_certificate: str) -> None:
        """Write such a folder (0700, the key 0600), each file atomically: the server's certificate as the
        one to trust, the client's certificate and its key."""
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)
        for name, text, mode in (
            ("client-key.pem", key, 0o600),
            ("client-cert.pem", certificate, 0o644),
            ("ca-cert.pem", server_certificate, 0o644),
        ):
            tmp = folder / f".{name}.tmp-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, folder / name)

    def wrap(self, sock: socket.socket, host: str) -> ssl.SSLSocket:
        return self.context().wrap_socket(sock, server_hostname=host.strip("[]"))

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server's certificate and name
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_verify_locations(self.directory / "ca-cert.pem")
            ctx.load_cert_chain(self.directory / "client-cert.pem", self.directory / "client-key.pem")
        except (OSError, ssl.SSLError) as exc:
            raise NbdError(f"cannot load the NBD TLS certificates in {self.directory}: {exc}") from exc
        return ctx


X509_FILES = ("ca-cert.pem", "client-cert.pem", "client-key.pem")
Tls = TlsPsk | TlsX509


def tls_from_path(path: str | Path, identity: str | None = None) -> Tls:
    """A client's NBD TLS credentials: a key file (nbdkit) or a certificate folder (nbd-server)."""
    return TlsX509.from_dir(path, identity) if Path(path).is_dir() else TlsPsk.from_file(path, identity)


@dataclass(frozen=True)
class ExportInfo:
    name: str
    size: int
    read_only: bool
    can_flush: bool


def _recv_exact(sock: socket.socket, count: int) -> bytearray:
    """Exactly ``count`` bytes, received into one buffer (a verification reads whole disks this way)."""
    buf = bytearray(count)
    view = memoryview(buf)
    got = 0
    while got < count:
        n = sock.recv_into(view[got:], count - got)
        if not n:
            raise NbdConnectionLost(f"connection closed after {got} of {count} bytes")
        got += n
    return buf


class NbdConnection:
    """One NBD connection: option haggling, then (after ``open``) transmission."""

    def __init__(self, host: str, port: int, timeout: float = 5.0, tls: Tls | None = None) -> None:
        scheme = "nbds" if tls else "nbd"
        try:
            self.sock: socket.socket = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise NbdUnavailable(f"cannot connect to {scheme}://{host}:{port}: {exc}") from exc
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.export: ExportInfo | None = None
        self._handle = 0
        # TLS 1.3: a server checks the client's certificate after the client's handshake is done, so a
        # refusal shows up as the connection closing at the first reply after it.
        self._tls_unconfirmed = False
        try:
            self._handshake()
        except (OSError, NbdError) as exc:
            self.sock.close()
            raise NbdUnavailable(f"no NBD server at {scheme}://{host}:{port}: {exc}") from exc
        if tls is not None:
            try:
                self._starttls(tls, host)
            except (OSError, NbdError) as exc:
                self.sock.close()
                raise NbdTlsRefused(f"TLS to {scheme}://{host}:{port} as {tls.identity!r} failed: {exc}") from exc

    def __enter__(self) -> NbdConnection:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _handshake(self) -> None:
        magic, opt_magic, flags = struct.unpack(">QQH", _recv_exact(self.sock, 18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise NbdError("not a newstyle NBD server")
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise NbdError("server does not support fixed newstyle negotiation")
        self.sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))

    def _starttls(self, tls: Tls, host: str) -> None:
        self._send_option(OPT_STARTTLS)
        rtype, _ = self._read_reply(OPT_STARTTLS)
        if rtype != REP_ACK:
            raise NbdError(f"unexpected reply type {rtype} to NBD_OPT_STARTTLS")
        self.sock = tls.wrap(self.sock, host)
        self._tls_unconfirmed = True

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def _read_reply(self, option: int) -> tuple[int, bytes]:
        try:
            header = _recv_exact(self.sock, 20)
        except (NbdConnectionLost, ssl.SSLError) as exc:
            if not self._tls_unconfirmed:
                raise
            raise NbdTlsRefused(f"the server closed the connection after the TLS handshake: {exc}") from exc
        self._tls_unconfirmed = False
        magic, opt, rtype, length = struct.unpack(">QIII", header)
        if magic != OPT_REPLY_MAGIC or opt != option:
            raise NbdError(f"unexpected option reply (magic {magic:#x}, option {opt})")
        if length > MAX_REPLY:
            raise NbdError(f"option reply of {length} bytes is too large")
        data = _recv_exact(self.sock, length)
        if rtype & REP_FLAG_ERROR:
            code = rtype & ~REP_FLAG_ERROR
            message = data.decode("utf-8", errors="replace")
            what = REP_ERRORS.get(code, f"error {code}")
            error = NbdTlsRefused if code == REP_ERR_TLS_REQD else NbdError
            raise error(f"server refused option {option} ({what}) {message}".strip())
        return rtype, bytes(data)

    def list_exports(self) -> list[str]:
        """Names only: one NBD_OPT_LIST round trip, no export is opened."""
        self._send_option(OPT_LIST)
        names: list[str] = []
        while True:
            rtype, data = self._read_reply(OPT_LIST)
            if rtype == REP_ACK:
                return names
            if rtype != REP_SERVER or len(data) < 4:
                raise NbdError(f"unexpected reply type {rtype} to NBD_OPT_LIST")
            (name_len,) = struct.unpack(">I", data[:4])
            names.append(data[4 : 4 + name_len].decode("utf-8", errors="replace"))

    def open(self, name: str) -> ExportInfo:
        """NBD_OPT_GO: enter transmission on export ``name`` and learn its real size."""
        raw = name.encode()
        if len(raw) > MAX_NAME:
            raise NbdError("export name too long")
        self._send_option(OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        size, tflags = None, 0
        while True:
            rtype, data = self._read_reply(OPT_GO)
            if rtype == REP_INFO and len(data) >= 12 and struct.unpack(">H", data[:2])[0] == INFO_EXPORT:
                size, tflags = struct.unpack(">QH", data[2:12])
            elif rtype == REP_ACK:
                break
        if size is None:
            raise NbdError(f"server sent no size for export {name!r}")
        self.export = ExportInfo(name, size, bool(tflags & TFLAG_READ_ONLY), bool(tflags & TFLAG_SEND_FLUSH))
        return self.export

    def _command(self, cmd: int, offset: int, length: int, payload: bytes = b"") -> bytearray:
        if self.export is None:
            raise NbdError("no export is open")
        self._handle += 1
        header = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, self._handle, offset, length)
        self.sock.sendall(header + payload)
        magic, error, handle = struct.unpack(">IIQ", _recv_exact(self.sock, 16))
        if magic != SIMPLE_REPLY_MAGIC or handle != self._handle:
            raise NbdError("unexpected transmission reply")
        if error:
            # NBD errors are errno values: say which ("No space left on device [ENOSPC]", not "error 28").
            name = errno.errorcode.get(error, str(error))
            raise NbdError(f"server returned {os.strerror(error)} [{name}] for command {cmd} at offset {offset}")
        return _recv_exact(self.sock, length) if cmd == CMD_READ else bytearray()

    def pread(self, offset: int, length: int) -> bytearray:
        return self._command(CMD_READ, offset, length)

    def pwrite(self, offset: int, data: bytes) -> None:
        self._command(CMD_WRITE, offset, len(data), data)

    def flush(self) -> None:
        if self.export is not None and self.export.can_flush:
            self._command(CMD_FLUSH, 0, 0)

    def close(self) -> None:
        try:
            if self.export is not None:
                header = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, self._handle + 1, 0, 0)
                self.sock.sendall(header)
            else:
                self._send_option(OPT_ABORT)
        except OSError:
            pass
        finally:
            self.sock.close()


def list_exports(host: str, port: int, timeout: float = 5.0, tls: Tls | None = None) -> list[str]:
    with NbdConnection(host, port, timeout, tls) as conn:
        return conn.list_exports()


def export_info(host: str, port: int, name: str, timeout: float = 5.0, tls: Tls | None = None) -> ExportInfo:
    with NbdConnection(host, port, timeout, tls) as conn:
        return conn.open(name)
