"""A small NBD protocol client (fixed newstyle handshake, simple replies), standard library only.

No PyPI package wraps libnbd, and ``nbdinfo --list`` opens every export (22 s for 500 exports on
nbd-server here), so the portal speaks the protocol itself for what it needs: a names-only export
list (NBD_OPT_LIST), opening an export for its real size (NBD_OPT_GO; nbd-server answers
NBD_OPT_INFO with size 0), and plain reads and writes for verification.
Reference: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass
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
OPT_GO = 7

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
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
            raise NbdError(f"connection closed after {got} of {count} bytes")
        got += n
    return buf


class NbdConnection:
    """One NBD connection: option haggling, then (after ``open``) transmission."""

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise NbdUnavailable(f"cannot connect to nbd://{host}:{port}: {exc}") from exc
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.export: ExportInfo | None = None
        self._handle = 0
        try:
            self._handshake()
        except (OSError, NbdError) as exc:
            self.sock.close()
            raise NbdUnavailable(f"no NBD server at nbd://{host}:{port}: {exc}") from exc

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

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def _read_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, rtype, length = struct.unpack(">QIII", _recv_exact(self.sock, 20))
        if magic != OPT_REPLY_MAGIC or opt != option:
            raise NbdError(f"unexpected option reply (magic {magic:#x}, option {opt})")
        if length > MAX_REPLY:
            raise NbdError(f"option reply of {length} bytes is too large")
        data = _recv_exact(self.sock, length)
        if rtype & REP_FLAG_ERROR:
            message = data.decode("utf-8", errors="replace")
            raise NbdError(f"server refused option {option}: error {rtype & ~REP_FLAG_ERROR} {message}".strip())
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


def list_exports(host: str, port: int, timeout: float = 5.0) -> list[str]:
    with NbdConnection(host, port, timeout) as conn:
        return conn.list_exports()


def export_info(host: str, port: int, name: str, timeout: float = 5.0) -> ExportInfo:
    with NbdConnection(host, port, timeout) as conn:
        return conn.open(name)
