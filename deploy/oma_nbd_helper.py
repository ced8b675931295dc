#!/usr/bin/python3 -IS
"""oma-nbd-helper: the only OMA code that runs as root.

Installed as /usr/local/libexec/oma/oma_nbd_helper.py (compiled) and run by the program beside it,
oma-nbd-helper (deploy/oma-nbd-helper), which the portal calls through
``sudo -n /usr/local/libexec/oma/oma-nbd-helper VERB ARGS``. Standard library only.

It reads every path it touches from a root-owned config file (default /etc/oma/nbd-helper.conf),
never from its caller. Dev and tests run the same program directly (not through sudo); only then may
OMA_NBD_HELPER_CONFIG name another config file, which must be owned by the caller's uid or root and
writable by nobody else.

Verbs (one JSON line on stdout, always with "ok"):
  link NAME DEVICE   point export NAME at DEVICE (atomic link; for nbd-server also conf.d/NAME.conf)
  unlink NAME        remove export NAME's link (and conf file); idempotent
  digest NAME [NAME ...]
                     sha256 of the byte ranges (JSON [[offset, length], ...] on stdin; for several
                     names a JSON list of such lists, one per NAME in order) of the device each export
                     serves, read locally, the devices side by side: a sync's read-back without NBD
                     or TLS
  reload             SIGHUP the verified nbd-server main process (nbdkit never needs one)
  status             verified main PID, start time, listening, links and conf files
  start              start the server unless a verified main process already runs
  restart            nbd-server: SIGKILL the verified main only (its children keep serving their
                     transfers; SIGTERM would end them), then start; nbdkit: SIGTERM, then start
  stop               SIGTERM the verified main process (ends nbd-server transfers)
  psk-add ID         create a TLS pre-shared key for client identity ID (a VMA, or the portal itself)
                     in the server's key file (tls_psk_file); prints the key once
  psk-rotate ID      replace ID's key; connections already open keep going, new ones need the new key
  psk-import ID      give ID the key read from stdin (64 hex digits, or the client file's ID:KEY line):
                     the same VMA key on every OMA node; replaces ID's key as psk-rotate does
  psk-remove ID      remove ID's key; idempotent
  psk-list           the identities (never the keys)
  cert-add ID        nbd-server: a TLS client certificate for identity ID (self-signed, trusted by the
                     server through its client bundle), plus the server's certificate; prints the key once
  cert-rotate ID     replace ID's certificate; open transfers keep going, new ones need the new one
  cert-remove ID     stop trusting ID's certificate; idempotent
  cert-list          the identities and the server's certificate (public)

Exit codes:
  0 done   2 usage   3 input refused (nothing changed)   4 bad helper config
  5 server not running or not verifiable   6 system error   7 lock timeout
"""

from __future__ import annotations

import configparser
import contextlib
import errno
import fcntl
import json
import os
import re
import signal
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_CONFIG = 4
EXIT_SERVER = 5
EXIT_SYSTEM = 6
EXIT_LOCK = 7

DEFAULT_CONFIG = "/etc/oma/nbd-helper.conf"
UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
NAME_RE = re.compile(rf"migration-vm-{UUID_RE}-disk(?:[0-9]|[1-5][0-9]|6[0-3])")
SAFE_PATH_RE = re.compile(r"/[A-Za-z0-9._/+:@-]*")
MAX_PATH = 255
# The portal's rule too (exports/models.py DEVICE_RE; a test checks they agree).
DEVICE_RE = re.compile(r"/[A-Za-z0-9._/+:@-]{1,254}")
LOCK_TIMEOUT = 30.0
START_TIMEOUT = 10.0
PORT_WAIT = 5.0
# /proc start times count from an integer boot time: allow that much before calling a PID reused.
START_SLACK = 1.0
BACKENDS = ("nbdkit", "nbd-server")
# The portal's rule too (exports/nbd_protocol.py IDENTITY_RE; a test checks they agree).
IDENTITY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PSK_LINE_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,63}):((?:[0-9a-f]{2}){32})")
PSK_BYTES = 32
MAX_IDENTITIES = 1024
# A DNS name or an IPv4/IPv6 address, as a certificate template line takes it.
SERVER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:-]{0,252}")


class HelperError(Exception):
    def __init__(self, code: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.kind = kind
        self.message = message


def refuse(kind: str, message: str) -> HelperError:
    return HelperError(EXIT_REFUSED, kind, message)


# --- input validation ----------------------------------------------------------------------


def check_text(what: str, value: str) -> None:
    """Refuse anything that could break out of a file name, a link or a config line."""
    if "\x00" in value:
        raise refuse("forbidden_character", f"{what} contains a NUL byte")
    if "\n" in value or "\r" in value:
        raise refuse("forbidden_character", f"{what} contains a line break")
    if "[" in value or "]" in value:
        raise refuse("forbidden_character", f"{what} contains '[' or ']' (config section syntax)")
    if "=" in value:
        raise refuse("forbidden_character", f"{what} contains '=' (config key syntax)")
    if ".." in value:
        raise refuse("forbidden_character", f"{what} contains '..'")
    if not value.isascii() or not value.isprintable():
        raise refuse("forbidden_character", f"{what} contains non-ASCII or control characters")
    if len(value) > MAX_PATH:
        raise refuse("too_long", f"{what} is {len(value)} characters long; the limit is {MAX_PATH}")


def validate_name(name: str) -> str:
    check_text("export name", name)
    if not NAME_RE.fullmatch(name):
        raise refuse(
            "invalid_name",
            f"export name {name!r} does not match migration-vm-<vmware instance uuid>-disk<0-63>",
        )
    return name


class Config(NamedTuple):
    backend: str
    export_root: Path
    pidfile: Path
    lock_file: Path
    listen_address: str
    port: int
    server_exe: Path
    server_config: Path | None
    confd: Path | None
    device_prefixes: tuple[str, ...]
    dev_volume_root: Path | None
    service: str
    tls_psk_file: Path | None  # nbdkit only: --tls=require --tls-psk=FILE
    tls_group: str | None  # the server's group, which may read the key file (it does not run as root)
    # A GnuTLS priority file for the server (GNUTLS_SYSTEM_PRIORITY_FILE): where the CPU has AES
    # instructions, it takes ChaCha20 off so TLS 1.3 with a SHA-256 key settles on AES-128-GCM, about
    # three times cheaper per byte here. A missing file leaves GnuTLS on its defaults.
    tls_priority_file: Path | None = None
    # nbd-server only: X.509 (nbd-server has no pre-shared keys). The folder holds the server's key and
    # self-signed certificate, and one self-signed certificate per client identity; the server trusts
    # exactly those (cacertfile = the folder's clients.pem), so each identity is added, rotated or
    # removed on its own, and no CA key exists that could mint more.
    tls_x509_dir: Path | None = None
    tls_server_names: tuple[str, ...] = ()  # what the server's certificate names: the address VMAs dial
    certtool: Path = Path("/usr/bin/certtool")


def _config_path(value: str, key: str) -> Path:
    if not SAFE_PATH_RE.fullmatch(value) or ".." in value:
        raise HelperError(EXIT_CONFIG, "bad_config", f"config key {key} must be a plain absolute path, got {value!r}")
    return Path(value)


def config_file_path() -> Path:
    override = os.environ.get("OMA_NBD_HELPER_CONFIG")
    via_sudo = any(k in os.environ for k in ("SUDO_UID", "SUDO_USER", "SUDO_COMMAND"))
    if override and not via_sudo:
        return Path(override)
    return Path(DEFAULT_CONFIG)


def check_dev_root(root: Path) -> None:
    """Dev mode serves files: run as root, only from a folder nobody else can write (or swap a file in)."""
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(root)
    except OSError as exc:
        raise HelperError(EXIT_CONFIG, "bad_config", f"dev_volume_root {root}: {exc.strerror}") from exc
    if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise HelperError(
            EXIT_CONFIG,
            "unsafe_dev_root",
            f"dev mode runs as root here: its volume root {root} must be owned by root and writable by root only",
        )


def load_config() -> Config:
    path = config_file_path()
    try:
        st = os.stat(path)
    except OSError as exc:
        raise HelperError(EXIT_CONFIG, "bad_config", f"cannot read helper config {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise HelperError(EXIT_CONFIG, "bad_config", f"helper config {path} is not a regular file")
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise HelperError(
            EXIT_CONFIG, "bad_config", f"helper config {path} must be owned by root and writable only by its owner"
        )
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path, encoding="utf-8")
        section = parser["helper"]
        backend = section.get("backend", "nbdkit")
        if backend not in BACKENDS:
            raise HelperError(EXIT_CONFIG, "bad_config", f"backend must be one of {BACKENDS}, got {backend!r}")
        confd = section.get("confd")
        server_config = section.get("server_config")
        if backend == "nbd-server" and not (confd and server_config):
            raise HelperError(EXIT_CONFIG, "bad_config", "backend nbd-server needs confd and server_config")
        dev_root = section.get("dev_volume_root", "").strip()
        default_exe = "/usr/bin/nbdkit" if backend == "nbdkit" else "/usr/bin/nbd-server"
        prefixes = tuple(section.get("device_prefixes", "/dev/disk/by-id/virtio- /dev/vd /dev/loop").split())
        for prefix in prefixes:
            _config_path(prefix, "device_prefixes")
        import socket

        address = section.get("listen_address", "127.0.0.1")
        socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
        psk = section.get("tls_psk_file", "").strip()
        if psk and backend != "nbdkit":
            raise HelperError(EXIT_CONFIG, "bad_config", "tls_psk_file needs backend nbdkit (nbd-server has no PSK)")
        tls_group = section.get("tls_group", "").strip() or None
        priority = section.get("tls_priority_file", "").strip()
        if tls_group is not None and not IDENTITY_RE.fullmatch(tls_group):
            raise HelperError(EXIT_CONFIG, "bad_config", f"tls_group {tls_group!r} is not a group name")
        x509 = section.get("tls_x509_dir", "").strip()
        if x509 and backend != "nbd-server":
            raise HelperError(EXIT_CONFIG, "bad_config", "tls_x509_dir needs backend nbd-server (nbdkit uses PSK)")
        names = tuple(section.get("tls_server_names", "").split()) or (address,)
        for name in names:
            if not SERVER_NAME_RE.fullmatch(name):
                raise HelperError(EXIT_CONFIG, "bad_config", f"tls_server_names: {name!r} is not a host name or IP")
        return Config(
            backend=backend,
            export_root=_config_path(section["export_root"], "export_root"),
            pidfile=_config_path(section["pidfile"], "pidfile"),
            lock_file=_config_path(section["lock_file"], "lock_file"),
            listen_address=address,
            port=section.getint("port", 10809),
            server_exe=_config_path(section.get("server_exe", default_exe), "server_exe"),
            server_config=_config_path(server_config, "server_config") if server_config else None,
            confd=_config_path(confd, "confd") if confd else None,
            device_prefixes=prefixes,
            dev_volume_root=_dev_root(dev_root) if dev_root else None,
            service=section.get("service", "direct"),
            tls_psk_file=_config_path(psk, "tls_psk_file") if psk else None,
            tls_group=tls_group,
            tls_priority_file=_config_path(priority, "tls_priority_file") if priority else None,
            tls_x509_dir=_config_path(x509, "tls_x509_dir") if x509 else None,
            tls_server_names=names,
            certtool=_config_path(section.get("certtool", "/usr/bin/certtool"), "certtool"),
        )
    except HelperError:
        raise
    except (configparser.Error, KeyError, ValueError, OSError) as exc:
        raise HelperError(EXIT_CONFIG, "bad_config", f"helper config {path} is invalid: {exc}") from exc


def _dev_root(value: str) -> Path:
    root = _config_path(value, "dev_volume_root")
    check_dev_root(root)
    return root


def _dev_numbers(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def _mounted_devices() -> set[str]:
    """major:minor of every mounted filesystem, plus active swap devices."""
    found: set[str] = set()
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) > 2:
                found.add(fields[2])
    with contextlib.suppress(OSError), open("/proc/swaps", encoding="utf-8", errors="replace") as fh:
        for line in list(fh)[1:]:
            with contextlib.suppress(OSError):
                st = os.stat(line.split()[0])
                if stat.S_ISBLK(st.st_mode):
                    found.add(_dev_numbers(st.st_rdev))
    return found


def _sys_block(numbers: str) -> Path:
    return Path("/sys/dev/block") / numbers


def _whole_disk(numbers: str) -> str:
    """The whole-disk major:minor for a partition (or the device itself)."""
    node = _sys_block(numbers).resolve()
    if (node / "partition").exists():
        with contextlib.suppress(OSError):
            return (node.parent / "dev").read_text().strip()
    return numbers


def _backing_disks(numbers: str, seen: set[str] | None = None) -> set[str]:
    """The whole disks under a device, following device-mapper/md slaves."""
    seen = set() if seen is None else seen
    if numbers in seen:
        return set()
    seen.add(numbers)
    disks = {_whole_disk(numbers)}
    slaves = _sys_block(numbers) / "slaves"
    with contextlib.suppress(OSError):
        for slave in slaves.iterdir():
            with contextlib.suppress(OSError):
                disks |= _backing_disks((slave / "dev").read_text().strip(), seen)
    return disks


def _os_disks() -> set[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) > 4 and fields[4] == "/":
                return _backing_disks(fields[2])
    return set()


def _device_in_use(numbers: str) -> str | None:
    mounted = _mounted_devices()
    if numbers in mounted:
        return "it is mounted or used as swap"
    node = _sys_block(numbers)
    with contextlib.suppress(OSError):
        if any((node / "holders").iterdir()):
            return "it is held by another device (device-mapper, RAID or LVM)"
    with contextlib.suppress(OSError):
        for child in node.resolve().iterdir():
            dev_file = child / "dev"
            if (child / "partition").exists() and dev_file.exists() and dev_file.read_text().strip() in mounted:
                return f"its partition {child.name} is mounted"
    return None


def _stat_existing(device: str, resolved: str) -> os.stat_result:
    try:
        return os.stat(resolved)
    except OSError as exc:
        raise refuse("device_missing", f"device {device!r} does not exist") from exc


def check_device_syntax(device: str) -> None:
    check_text("device", device)
    if not device.startswith("/"):
        raise refuse("invalid_device", f"device {device!r} is not an absolute path")
    if not DEVICE_RE.fullmatch(device):
        raise refuse("invalid_device", f"device {device!r} has characters other than letters, digits and ._/+:@-")
    if not is_canonical(device):
        raise refuse("not_canonical", f"device {device!r} is not written canonically (no '//', '/./' or trailing '/')")


def is_canonical(path: str) -> bool:
    """One spelling per path: the portal's rule too (exports/models.py), so string comparisons hold."""
    return "//" not in path and "/./" not in path and not path.endswith(("/", "/."))


def validate_device(config: Config, device: str) -> str:
    check_device_syntax(device)
    if config.dev_volume_root is not None:
        root = os.path.realpath(config.dev_volume_root)
        resolved = os.path.realpath(device)
        if not (device.startswith(str(config.dev_volume_root) + "/") and resolved.startswith(root + "/")):
            raise refuse("device_not_allowed", f"device {device!r} is outside the volume root {config.dev_volume_root}")
        st = _stat_existing(device, resolved)
        if not stat.S_ISREG(st.st_mode):
            raise refuse("not_a_volume", f"device {device!r} is not a regular volume file (dev mode)")
        # The requested path stays the link target: the local volume backend's by-id links come and go
        # with attach and detach as on a KVM guest, and an export must follow them. Nobody but root can
        # swap anything under the volume root (check_dev_root), so the path keeps meaning this file.
        return device
    if not any(device.startswith(prefix) for prefix in config.device_prefixes):
        allowed = ", ".join(config.device_prefixes)
        raise refuse("device_not_allowed", f"device {device!r} is not under an allowed prefix ({allowed})")
    resolved = os.path.realpath(device)
    if not resolved.startswith("/dev/"):
        raise refuse("device_not_allowed", f"device {device!r} resolves to {resolved}, outside /dev")
    st = _stat_existing(device, resolved)
    if not stat.S_ISBLK(st.st_mode):
        raise refuse("not_a_block_device", f"device {device!r} ({resolved}) is not a block device")
    numbers = _dev_numbers(st.st_rdev)
    if _whole_disk(numbers) in _os_disks() or numbers in _os_disks():
        raise refuse("os_disk", f"device {device!r} ({resolved}) is the OS disk or part of it")
    reason = _device_in_use(numbers)
    if reason:
        raise refuse("device_in_use", f"device {device!r} ({resolved}) is in use: {reason}")
    return device


# --- atomic file operations ----------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_symlink(target: str, link: Path) -> None:
    tmp = link.parent / f".{link.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    os.symlink(target, tmp)
    try:
        os.rename(tmp, link)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(link.parent)


def atomic_write(path: Path, content: str, mode: int = 0o644, gid: int | None = None) -> None:
    """Temp file in the same folder (mode and group set before any byte is written), fsync, rename,
    fsync the folder: a reader sees the old file or the new one, never half of one."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        if gid is not None:
            os.fchown(fd, -1, gid)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def remove_durably(path: Path) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


@contextlib.contextmanager
def locked(config: Config) -> Iterator[None]:
    fd = os.open(config.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise HelperError(
                        EXIT_LOCK, "lock_timeout", f"could not lock {config.lock_file} in {LOCK_TIMEOUT}s"
                    ) from exc
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)


def conf_text(config: Config, name: str) -> str:
    # flush/fua: honour the client's flushes, so a completed copy is on the volume, not in cache.
    return (
        "# Managed by oma-nbd-helper. Do not edit: changes are overwritten.\n"
        f"[{name}]\n"
        f"    exportname = {config.export_root / name}\n"
        "    flush = true\n"
        "    fua = true\n"
    )


# --- the server's main process -------------------------------------------------------------


class MainProcess(NamedTuple):
    pid: int
    start_ticks: int

    @property
    def started_at(self) -> float:
        with open("/proc/stat", encoding="ascii") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
        return boot + self.start_ticks / os.sysconf("SC_CLK_TCK")


def _read_pidfile(config: Config) -> int | None:
    try:
        text = config.pidfile.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    if not text.isdigit() or len(text) > 9:
        return None
    return int(text)


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: [state, ppid, ...]; None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _proc_stat(pid: int) -> tuple[str, int] | None:
    fields = _stat_fields(pid)
    return (fields[0], int(fields[19])) if fields else None


def verified_main(config: Config) -> tuple[MainProcess | None, str]:
    """The server's main process from the pidfile, checked through /proc; never pgrep."""
    pid = _read_pidfile(config)
    if pid is None:
        return None, f"no valid pidfile at {config.pidfile}"
    info = _proc_stat(pid)
    if info is None:
        return None, f"pid {pid} from {config.pidfile} is not running"
    state, start_ticks = info
    if state in ("Z", "X"):
        return None, f"pid {pid} from {config.pidfile} is a zombie (the server died)"
    try:
        exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\x00")
    except OSError as exc:
        return None, f"cannot inspect pid {pid}: {exc.strerror}"
    if os.path.realpath(exe) != os.path.realpath(config.server_exe):
        return None, f"pid {pid} runs {exe}, not {config.server_exe}"
    for flag, value in _identifying_args(config):
        if not _has_option(cmdline, flag, value):
            return None, f"pid {pid} was not started with {flag} {value}"
    try:
        written = os.stat(config.pidfile).st_mtime
    except OSError:
        return None, f"pidfile {config.pidfile} vanished"
    main = MainProcess(pid, start_ticks)
    if main.started_at > written + START_SLACK:
        return None, f"pid {pid} started after {config.pidfile} was written: a reused PID, not the server"
    if config.backend == "nbd-server":
        # Children of nbd-server have the same cmdline; the main one was reparented to nobody else.
        ppid = _ppid(pid)
        if ppid is not None and _proc_stat(ppid) is not None and _exe_of(ppid) == exe:
            return None, f"pid {pid} is a child of {ppid}, not the main server process"
    return main, "verified"


def _identifying_args(config: Config) -> list[tuple[str, str]]:
    """The options the helper starts the server with that no other process has: its own pidfile as its
    pidfile argument (and nbd-server's config)."""
    if config.backend == "nbd-server":
        return [("-C", str(config.server_config)), ("-p", str(config.pidfile))]
    return [("-P", str(config.pidfile))]


def _has_option(cmdline: list[bytes], flag: str, value: str) -> bool:
    """``flag value`` as two adjacent arguments (the way the helper and the units pass it)."""
    args = [arg.decode(errors="replace") for arg in cmdline]
    return any(args[i] == flag and args[i + 1] == value for i in range(len(args) - 1))


def _ppid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def _exe_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        return None


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as fh:
            for line in list(fh)[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(inode)
    return inodes


def is_listening(pid: int, port: int) -> bool:
    inodes = _listening_inodes(port)
    if not inodes:
        return False
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return True
    return False


def require_main(config: Config) -> MainProcess:
    main, why = verified_main(config)
    if main is None:
        raise HelperError(EXIT_SERVER, "server_not_running", why)
    return main


# --- verbs ---------------------------------------------------------------------------------


def verb_link(config: Config, *pairs: str) -> dict[str, object]:
    """Link one or more NAME DEVICE pairs (a VM's disks in one call). Every pair is validated, and
    names and devices checked for repeats, before anything is written: a refusal changes nothing."""
    names, requested = list(pairs[0::2]), list(pairs[1::2])
    devices = []
    for name, device in zip(names, requested, strict=True):
        validate_name(name)
        devices.append(validate_device(config, device))
    if len(set(names)) != len(names) or len(set(devices)) != len(devices):
        raise refuse("duplicate", "a name or a device appears twice in one link request")
    with locked(config):
        for name in names:
            link = config.export_root / name
            if link.exists() and not link.is_symlink():
                raise refuse("not_a_link", f"{link} exists and is not a link")
        refuse_aliases(config, dict(zip(names, devices, strict=True)))
        links = [_link_one(config, name, device) for name, device in zip(names, devices, strict=True)]
    # The first pair's fields stay at the top level, as they were when link took one pair.
    return {**links[0], "links": links}


def device_identity(path: str) -> tuple[str, int, int] | None:
    """What a path really is: a block device by its device number, a file by its filesystem and inode.
    None if it does not exist (a detached volume's link)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISBLK(st.st_mode):
        return ("block device", st.st_rdev, 0)
    return ("file", st.st_dev, st.st_ino)


def refuse_aliases(config: Config, wanted: dict[str, str]) -> None:
    """One device, one export: refuse a device that is, under any spelling (symlink, by-id alias, a
    second path to the same file), the device of another requested name or of another existing link.
    Runs under the lock, so two parallel calls cannot both pass."""
    seen: dict[tuple[str, int, int], str] = {}
    for name, device in wanted.items():
        identity = device_identity(device)
        if identity is None:
            continue  # validate_device found it a moment ago; the link step will fail clearly
        if identity in seen:
            raise refuse("alias", f"{device} and the device for {seen[identity]} are the same {identity[0]}")
        seen[identity] = name
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(config.export_root):
            if not entry.is_symlink() or entry.name.startswith(".") or entry.name in wanted:
                continue
            identity = device_identity(entry.path)
            if identity is not None and identity in seen:
                target = os.readlink(entry.path)
                device = wanted[seen[identity]]
                raise refuse(
                    "alias", f"{device} is the same {identity[0]} as {target}, already exported as {entry.name}"
                )


def _link_one(config: Config, name: str, device: str) -> dict[str, object]:
    link = config.export_root / name
    try:
        current: str | None = os.readlink(link)
    except FileNotFoundError:
        current = None
    except OSError as exc:
        raise refuse("not_a_link", f"{link} exists and is not a link") from exc
    link_changed = current != device
    if link_changed:
        atomic_symlink(device, link)
    conf_changed = False
    conf_mtime = None
    if config.backend == "nbd-server" and config.confd is not None:
        conf = config.confd / f"{name}.conf"
        text = conf_text(config, name)
        try:
            conf_changed = conf.read_text(encoding="ascii") != text
        except FileNotFoundError:
            conf_changed = True
        if conf_changed:
            atomic_write(conf, text)
        conf_mtime = os.stat(conf).st_mtime
    return {
        "conf_mtime": conf_mtime,
        "name": name,
        "device": device,
        "previous_device": current,
        "link_changed": link_changed,
        "conf_changed": conf_changed,
        "needs_reload": conf_changed,
    }


def verb_unlink(config: Config, name: str) -> dict[str, object]:
    validate_name(name)
    with locked(config):
        link = config.export_root / name
        if (link.exists() or link.is_symlink()) and not link.is_symlink():
            raise refuse("not_a_link", f"{link} is not a link; refusing to remove it")
        link_removed = remove_durably(link)
        conf_removed = False
        if config.backend == "nbd-server" and config.confd is not None:
            conf_removed = remove_durably(config.confd / f"{name}.conf")
    return {"name": name, "link_removed": link_removed, "conf_removed": conf_removed}


# A digest request: at most this much JSON on stdin, this many ranges.
MAX_DIGEST_INPUT = 32 << 20
MAX_DIGEST_RANGES = 1 << 20
DIGEST_CHUNK = 4 << 20


def _ranges_of(given: object, size: int) -> list[tuple[int, int]]:
    if not isinstance(given, list) or len(given) > MAX_DIGEST_RANGES:
        raise refuse("invalid_ranges", f"stdin must hold a JSON list of at most {MAX_DIGEST_RANGES} pairs")
    ranges = []
    for item in given:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(type(n) is int and n >= 0 for n in item)
            or item[0] + item[1] > size
        ):
            raise refuse("invalid_ranges", f"range {item!r} is not [offset, length] within the {size}-byte device")
        ranges.append((item[0], item[1]))
    return ranges


def _digest_ranges(sizes: list[int]) -> list[list[tuple[int, int]]]:
    """The ranges to hash, one list per device: stdin holds a JSON list of [offset, length] pairs for
    one device, or a list of such lists (one per device, in order) for several."""
    raw = sys.stdin.buffer.read(MAX_DIGEST_INPUT + 1)
    if len(raw) > MAX_DIGEST_INPUT:
        raise refuse("invalid_ranges", f"more than {MAX_DIGEST_INPUT} bytes of ranges on stdin")
    try:
        given = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise refuse("invalid_ranges", "stdin must hold a JSON list of [offset, length] pairs") from None
    if len(sizes) == 1:
        return [_ranges_of(given, sizes[0])]
    if not isinstance(given, list) or len(given) != len(sizes):
        raise refuse("invalid_ranges", f"stdin must hold a JSON list of {len(sizes)} lists of ranges, one per name")
    per_device = [_ranges_of(item, size) for item, size in zip(given, sizes, strict=True)]
    if sum(len(ranges) for ranges in per_device) > MAX_DIGEST_RANGES:
        raise refuse("invalid_ranges", f"at most {MAX_DIGEST_RANGES} ranges in all")
    return per_device


def _hash_ranges(fd: int, device: str, size: int, ranges: list[tuple[int, int]]) -> tuple[str, int]:
    import hashlib

    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    hasher = hashlib.sha256()
    total = 0
    for offset, length in ranges:
        position, end = offset, offset + length
        while position < end:
            chunk = os.pread(fd, min(DIGEST_CHUNK, end - position), position)
            if not chunk:
                raise HelperError(EXIT_SYSTEM, "short_read", f"{device} ended at {position} of {size} bytes")
            hasher.update(chunk)
            position += len(chunk)
            total += len(chunk)
    return hasher.hexdigest(), total


def verb_digest(config: Config, *names: str) -> dict[str, object]:
    """What the device behind each export NAME holds in the given ranges, as one sha256 each (the VMA's
    digest format). Only devices exports serve, re-validated as link validates them; read-only. Several
    devices are read side by side (pread and sha256 let go of the interpreter lock); the first one's
    fields also stand at the top level."""
    if len(set(names)) != len(names):
        raise refuse("duplicate_name", "each export may be named once")
    for name in names:
        validate_name(name)
    opened: list[tuple[str, str, int]] = []  # name, device, fd
    try:
        with locked(config):  # no link can change between reading it and opening its device
            for name in names:
                try:
                    device = os.readlink(config.export_root / name)
                except FileNotFoundError:
                    raise refuse("no_export", f"there is no export {name}") from None
                except OSError as exc:
                    raise refuse("not_a_link", f"{config.export_root / name} is not a link") from exc
                resolved = validate_device(config, device)
                try:
                    fd = os.open(resolved, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    raise refuse("device_missing", f"{name}: cannot open {device} ({exc.strerror})") from exc
                opened.append((name, device, fd))
        sizes = [os.lseek(fd, 0, os.SEEK_END) for _, _, fd in opened]
        per_device = _digest_ranges(sizes)

        # Plain threads, not concurrent.futures: its import alone costs about 14 ms, and every sync's
        # verification starts this program once.
        results: list[tuple[str, int] | BaseException | None] = [None] * len(opened)

        def hash_one(n: int) -> None:
            _, device, fd = opened[n]
            try:
                results[n] = _hash_ranges(fd, device, sizes[n], per_device[n])
            except BaseException as exc:  # raised again below, in the main thread
                results[n] = exc

        if len(opened) == 1:
            hash_one(0)
        else:
            import threading

            threads = [threading.Thread(target=hash_one, args=(n,)) for n in range(len(opened))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        hashed: list[tuple[str, int]] = []
        for result in results:
            if not isinstance(result, tuple):
                raise result or HelperError(EXIT_SYSTEM, "not_read", "a device was not read")
            hashed.append(result)
    finally:
        for _, _, fd in opened:
            os.close(fd)
    digests: list[dict[str, object]] = [
        {"name": name, "device": device, "size": size, "bytes": total, "sha256": value}
        for (name, device, _), size, (value, total) in zip(opened, sizes, hashed, strict=True)
    ]
    return {**digests[0], "digests": digests}


def check_confd(config: Config) -> None:
    """A stray file in conf.d would block every new export of a reload, or shadow a name."""
    if config.confd is None:
        return
    for path in config.confd.iterdir():
        if path.name.endswith(".conf") and not validate_conf_file(config, path):
            raise HelperError(EXIT_CONFIG, "bad_conf_file", f"{path} is not a file this helper wrote; remove it")


def verb_reload(config: Config) -> dict[str, object]:
    if config.backend != "nbd-server":
        return {"reloaded": False, "reason": "nbdkit serves new links without a reload"}
    with locked(config):
        main = require_main(config)
        check_confd(config)
        os.kill(main.pid, signal.SIGHUP)
    return {"reloaded": True, "pid": main.pid, "started_at": main.started_at}


def verb_status(config: Config) -> dict[str, object]:
    main, why = verified_main(config)
    links: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.scandir(config.export_root), key=lambda e: e.name):
            if entry.is_symlink() and not entry.name.startswith("."):
                links[entry.name] = os.readlink(entry.path)
    confs: list[str] = []
    if config.backend == "nbd-server" and config.confd is not None:
        with contextlib.suppress(FileNotFoundError):
            confs = sorted(p.name[:-5] for p in config.confd.iterdir() if p.name.endswith(".conf"))
    return {
        "backend": config.backend,
        "export_root": str(config.export_root),
        "confd": str(config.confd) if config.confd else None,
        "address": config.listen_address,
        "port": config.port,
        "pid": main.pid if main else None,
        "started_at": main.started_at if main else None,
        "verified": main is not None,
        "why": why,
        "listening": bool(main and is_listening(main.pid, config.port)),
        "tls": config.tls_psk_file is not None or config.tls_x509_dir is not None,
        "links": links,
        "confs": confs,
    }


def _port_taken(config: Config) -> bool:
    import socket

    family = socket.AF_INET6 if ":" in config.listen_address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((config.listen_address, config.port)) == 0


def _server_argv(config: Config) -> list[str]:
    if config.backend == "nbdkit":
        return [
            str(config.server_exe),
            "-i",
            config.listen_address,
            "-p",
            str(config.port),
            "-P",
            str(config.pidfile),
            *(["--tls=require", f"--tls-psk={config.tls_psk_file}"] if config.tls_psk_file else []),
            "file",
            f"dir={config.export_root}",
        ]
    return [str(config.server_exe), "-C", str(config.server_config), "-p", str(config.pidfile)]


def _server_env(config: Config) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GNUTLS_")}
    if config.tls_priority_file is not None:
        env["GNUTLS_SYSTEM_PRIORITY_FILE"] = str(config.tls_priority_file)
    return env


def _wait_ready(config: Config, old_pid: int | None) -> MainProcess:
    deadline = time.monotonic() + START_TIMEOUT
    why = "not started"
    while time.monotonic() < deadline:
        main, why = verified_main(config)
        if main is not None and main.pid != old_pid and is_listening(main.pid, config.port):
            return main
        time.sleep(0.05)
    raise HelperError(EXIT_SERVER, "start_failed", f"server did not become ready in {START_TIMEOUT}s: {why}")


def _start(config: Config, old_pid: int | None) -> MainProcess:
    import subprocess

    if config.tls_x509_dir is not None:
        check_server_tls(config)
        ensure_server_cert(config)  # nbd-server will not start without its key and certificate
    if config.service.startswith("systemd:"):
        unit = config.service.split(":", 1)[1]
        subprocess.run(["/bin/systemctl", "restart" if old_pid else "start", unit], check=True, timeout=60)
        return _wait_ready(config, old_pid)
    # Just after a stop or a kill the port may stay taken for a moment (an nbd-server child forked at
    # that instant still holds the listening socket), so wait a little before calling it taken.
    deadline = time.monotonic() + PORT_WAIT
    while _port_taken(config):
        if time.monotonic() > deadline:
            raise HelperError(
                EXIT_SERVER, "port_taken", f"{config.listen_address}:{config.port} is already taken by another process"
            )
        time.sleep(0.1)
    if config.backend == "nbd-server":
        check_confd(config)
    if config.tls_psk_file is not None and not config.tls_psk_file.exists():
        write_psks(config, {})  # nbdkit will not start without the file; no identity can connect yet
    remove_durably(config.pidfile)
    result = subprocess.run(
        _server_argv(config),
        env=_server_env(config),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip()[-500:]
        raise HelperError(EXIT_SERVER, "start_failed", f"server exited {result.returncode}: {message}")
    return _wait_ready(config, old_pid)


def validate_conf_file(config: Config, path: Path) -> bool:
    name = path.name[:-5]
    try:
        return bool(NAME_RE.fullmatch(name)) and path.read_text(encoding="ascii") == conf_text(config, name)
    except (OSError, UnicodeDecodeError):
        return False


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _proc_stat(pid)
        if info is None or info[0] in ("Z", "X"):
            return
        time.sleep(0.02)
    raise HelperError(EXIT_SERVER, "stop_failed", f"pid {pid} did not exit within {timeout}s")


def verb_start(config: Config) -> dict[str, object]:
    with locked(config):
        main, why = verified_main(config)
        if main is not None:
            return {"started": False, "pid": main.pid, "started_at": main.started_at}
        new = _start(config, None)
    return {"started": True, "pid": new.pid, "started_at": new.started_at, "previous": why}


def verb_restart(config: Config) -> dict[str, object]:
    with locked(config):
        main, _ = verified_main(config)
        old_pid = None
        if main is not None and config.service.startswith("systemd:") and config.backend == "nbd-server":
            import subprocess

            # systemctl restart would SIGTERM the main, which ends every transfer; kill only the
            # main process and let Restart=always bring up a fresh one.
            unit = config.service.split(":", 1)[1]
            subprocess.run(
                ["/bin/systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", unit], check=True, timeout=60
            )
            return {"restarted": True, "previous_pid": main.pid, **_ready_fields(_wait_ready(config, main.pid))}
        if main is not None and not config.service.startswith("systemd:"):
            old_pid = main.pid
            # nbd-server: SIGKILL reaches only the main process, so transfers in its children go on.
            os.kill(main.pid, signal.SIGKILL if config.backend == "nbd-server" else signal.SIGTERM)
            _wait_gone(main.pid)
        new = _start(config, old_pid)
    return {"restarted": True, "previous_pid": old_pid, "pid": new.pid, "started_at": new.started_at}


def _ready_fields(main: MainProcess) -> dict[str, object]:
    return {"pid": main.pid, "started_at": main.started_at}


def verb_stop(config: Config) -> dict[str, object]:
    with locked(config):
        main, why = verified_main(config)
        if main is None:
            return {"stopped": False, "why": why}
        os.kill(main.pid, signal.SIGTERM)
        _wait_gone(main.pid)
        remove_durably(config.pidfile)
    return {"stopped": True, "pid": main.pid}


# --- TLS pre-shared keys ------------------------------------------------------------------


def validate_identity(identity: str) -> str:
    check_text("identity", identity)
    if not IDENTITY_RE.fullmatch(identity):
        raise refuse("invalid_identity", f"identity {identity!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return identity


def _psk_file(config: Config) -> Path:
    if config.tls_psk_file is None:
        raise refuse("tls_off", "this server has no tls_psk_file in the helper config: TLS is off")
    return config.tls_psk_file


def read_psks(config: Config) -> dict[str, str]:
    """The key file as identity -> hex key. Anything this helper did not write is an error, not ignored."""
    path = _psk_file(config)
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise HelperError(EXIT_CONFIG, "bad_psk_file", f"cannot read {path}: {exc}") from exc
    keys: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = PSK_LINE_RE.fullmatch(line)
        if not match or match[1] in keys:
            raise HelperError(EXIT_CONFIG, "bad_psk_file", f"{path} line {number} is not a key this helper wrote")
        keys[match[1]] = match[2]
    return keys


def write_psks(config: Config, keys: dict[str, str]) -> None:
    """Atomically: nbdkit reads the file at every handshake, so it never sees half a file."""
    path = _psk_file(config)
    text = "".join(f"{identity}:{key}\n" for identity, key in sorted(keys.items()))
    gid = _tls_gid(config)
    # The server (its group) reads it; nobody else.
    atomic_write(path, text, mode=0o600 if gid is None else 0o640, gid=gid)


def verb_psk_add(config: Config, identity: str, replace: bool = False) -> dict[str, object]:
    validate_identity(identity)
    with locked(config):
        keys = read_psks(config)
        if identity in keys and not replace:
            raise refuse("exists", f"identity {identity!r} already has a key; use psk-rotate to replace it")
        if identity not in keys and replace:
            raise refuse("unknown_identity", f"identity {identity!r} has no key to rotate")
        if identity not in keys and len(keys) >= MAX_IDENTITIES:
            raise refuse("too_many", f"the key file already holds {MAX_IDENTITIES} identities")
        keys[identity] = os.urandom(PSK_BYTES).hex()
        write_psks(config, keys)
    return {"identity": identity, "key": keys[identity], "rotated": replace}


def verb_psk_rotate(config: Config, identity: str) -> dict[str, object]:
    return verb_psk_add(config, identity, replace=True)


# One line of a psktool client file at most ("ID:KEY\n"), read from stdin: a key never goes on the
# command line, which every local user can read in /proc.
MAX_IMPORT_BYTES = 64 + 1 + 2 * PSK_BYTES + 2


def verb_psk_import(config: Config, identity: str) -> dict[str, object]:
    """Give ``identity`` a key made elsewhere (by another OMA node's psk-add): one VMA, one key, every
    node. The key comes on stdin; it is never echoed back."""
    validate_identity(identity)
    raw = sys.stdin.buffer.read(MAX_IMPORT_BYTES + 1)
    if len(raw) > MAX_IMPORT_BYTES:
        raise refuse("invalid_key", "stdin holds more than one key line")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise refuse("invalid_key", "the key must be ASCII hex digits") from None
    line = text[:-1] if text.endswith("\n") else text
    given, _, key = line.rpartition(":")
    if given and given != identity:
        raise refuse("invalid_key", f"the key line is for identity {given!r}, not {identity!r}")
    if not re.fullmatch(f"(?:[0-9a-f]{{2}}){{{PSK_BYTES}}}", key):
        raise refuse("invalid_key", f"the key must be {2 * PSK_BYTES} lowercase hex digits ({8 * PSK_BYTES} bits)")
    with locked(config):
        keys = read_psks(config)
        if identity not in keys and len(keys) >= MAX_IDENTITIES:
            raise refuse("too_many", f"the key file already holds {MAX_IDENTITIES} identities")
        replaced, changed = identity in keys, keys.get(identity) != key
        if changed:
            keys[identity] = key
            write_psks(config, keys)
    return {"identity": identity, "replaced": replaced and changed, "changed": changed}


def verb_psk_remove(config: Config, identity: str) -> dict[str, object]:
    validate_identity(identity)
    with locked(config):
        keys = read_psks(config)
        removed = keys.pop(identity, None) is not None
        if removed:
            write_psks(config, keys)
    return {"identity": identity, "removed": removed}


def verb_psk_list(config: Config) -> dict[str, object]:
    return {"identities": sorted(read_psks(config)), "tls": config.tls_psk_file is not None}


# --- TLS certificates (nbd-server) ---------------------------------------------------------

X509_SERVER_CERT = "server-cert.pem"
X509_SERVER_KEY = "server-key.pem"
X509_CLIENT_BUNDLE = "clients.pem"  # the server's cacertfile: the only certificates it accepts
X509_CLIENT_DIR = "clients"  # one ID.pem per identity, the bundle's source
X509_DAYS = 3650
PEM_CERT_RE = re.compile(r"-----BEGIN CERTIFICATE-----\n[A-Za-z0-9+/=\n]{1,8192}-----END CERTIFICATE-----\n")
PEM_KEY_RE = re.compile(r"-----BEGIN (EC )?PRIVATE KEY-----\n[A-Za-z0-9+/=\n]{1,8192}-----END (EC )?PRIVATE KEY-----\n")


def _x509_dir(config: Config) -> Path:
    if config.tls_x509_dir is None:
        raise refuse("tls_off", "this server has no tls_x509_dir in the helper config: TLS is off")
    return config.tls_x509_dir


def _tls_gid(config: Config) -> int | None:
    if config.tls_group is None:
        return None
    import grp

    try:
        return grp.getgrnam(config.tls_group).gr_gid
    except KeyError as exc:
        raise HelperError(EXIT_CONFIG, "bad_config", f"tls_group {config.tls_group} does not exist") from exc


def _self_signed(config: Config, folder: Path, template: str) -> tuple[str, str]:
    """A fresh ECDSA P-256 key and a self-signed certificate for it, made by certtool in a private
    temporary folder (0700) that is gone afterwards: (key PEM, certificate PEM)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(dir=folder, prefix=".certtool-") as tmp:
        key, cert, info = Path(tmp, "key.pem"), Path(tmp, "cert.pem"), Path(tmp, "cert.info")
        info.write_text(template, encoding="ascii")
        make_key = ["--generate-privkey", "--key-type=ecdsa", "--curve=secp256r1", "--outfile", str(key)]
        self_sign = ["--generate-self-signed", "--load-privkey", str(key), "--template", str(info), "--outfile"]
        steps = ([*make_key, "--no-text"], [*self_sign, str(cert), "--no-text"])
        for step in steps:
            done = subprocess.run(
                [str(config.certtool), *step],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
                timeout=60,
                check=False,
            )
            if done.returncode != 0:
                message = done.stderr.decode(errors="replace").strip()[-300:]
                raise HelperError(
                    EXIT_SYSTEM, "certtool_failed", f"{config.certtool} exited {done.returncode}: {message}"
                )
        key_pem, cert_pem = key.read_text(encoding="ascii"), cert.read_text(encoding="ascii")
    if not PEM_KEY_RE.fullmatch(key_pem) or not PEM_CERT_RE.fullmatch(cert_pem):
        raise HelperError(
            EXIT_SYSTEM, "certtool_failed", f"{config.certtool} did not write one PEM key and certificate"
        )
    return key_pem, cert_pem


def _template(common_name: str, purpose: str, names: tuple[str, ...] = ()) -> str:
    """A certtool template. Every value was checked against IDENTITY_RE or SERVER_NAME_RE first."""
    import ipaddress

    lines = [f'cn = "{common_name}"', purpose, "signing_key", "encryption_key", f"expiration_days = {X509_DAYS}"]
    for name in names:
        try:
            ipaddress.ip_address(name)
            lines.append(f"ip_address = {name}")
        except ValueError:
            lines.append(f"dns_name = {name}")
    return "\n".join(lines) + "\n"


def read_client_certs(config: Config) -> dict[str, str]:
    """identity -> certificate. A file this helper did not write is an error, never silently trusted."""
    folder = _x509_dir(config) / X509_CLIENT_DIR
    certs: dict[str, str] = {}
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        return {}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        identity = entry.name[:-4] if entry.name.endswith(".pem") else ""
        try:
            text = Path(entry.path).read_text(encoding="ascii") if entry.is_file(follow_symlinks=False) else ""
        except (OSError, UnicodeDecodeError):
            text = ""
        if not IDENTITY_RE.fullmatch(identity) or not PEM_CERT_RE.fullmatch(text):
            raise HelperError(EXIT_CONFIG, "bad_client_cert", f"{entry.path} is not a certificate this helper wrote")
        certs[identity] = text
    return certs


def ensure_server_cert(config: Config) -> str:
    """The server's key and certificate (made once), and its client bundle rebuilt from the client
    folder. Call under the lock. Returns the server's certificate (public: VMAs trust it)."""
    folder = _x509_dir(config)
    os.makedirs(folder, mode=0o755, exist_ok=True)
    os.makedirs(folder / X509_CLIENT_DIR, mode=0o755, exist_ok=True)
    cert_path, key_path = folder / X509_SERVER_CERT, folder / X509_SERVER_KEY
    if not (cert_path.exists() and key_path.exists()):
        key_pem, cert_pem = _self_signed(
            config, folder, _template("oma-nbd-server", "tls_www_server", config.tls_server_names)
        )
        gid = _tls_gid(config)
        # The server (its group) reads its key; nobody else does.
        atomic_write(key_path, key_pem, mode=0o600 if gid is None else 0o640, gid=gid)
        atomic_write(cert_path, cert_pem, mode=0o644)
    server_cert = cert_path.read_text(encoding="ascii")
    write_client_bundle(config, read_client_certs(config), server_cert)
    return server_cert


def write_client_bundle(config: Config, certs: dict[str, str], server_cert: str) -> None:
    """nbd-server reads its cacertfile at every handshake: an added, rotated or removed identity counts
    at once, open transfers keep going. The server's own certificate leads the bundle so that it is
    never empty (only the server holds that key)."""
    text = server_cert + "".join(certs[identity] for identity in sorted(certs))
    path = _x509_dir(config) / X509_CLIENT_BUNDLE
    with contextlib.suppress(FileNotFoundError):
        if path.read_text(encoding="ascii") == text:
            return
    atomic_write(path, text, mode=0o644)


def verb_cert_add(config: Config, identity: str, replace: bool = False) -> dict[str, object]:
    validate_identity(identity)
    folder = _x509_dir(config)
    with locked(config):
        server_cert = ensure_server_cert(config)
        certs = read_client_certs(config)
        if identity in certs and not replace:
            raise refuse("exists", f"identity {identity!r} already has a certificate; use cert-rotate to replace it")
        if identity not in certs and replace:
            raise refuse("unknown_identity", f"identity {identity!r} has no certificate to rotate")
        if identity not in certs and len(certs) >= MAX_IDENTITIES:
            raise refuse("too_many", f"the server already trusts {MAX_IDENTITIES} identities")
        key_pem, cert_pem = _self_signed(config, folder, _template(identity, "tls_www_client"))
        atomic_write(folder / X509_CLIENT_DIR / f"{identity}.pem", cert_pem, mode=0o644)
        certs[identity] = cert_pem
        write_client_bundle(config, certs, server_cert)
    return {
        "identity": identity,
        "certificate": cert_pem,
        "key": key_pem,
        "server_certificate": server_cert,
        "rotated": replace,
    }


def verb_cert_rotate(config: Config, identity: str) -> dict[str, object]:
    return verb_cert_add(config, identity, replace=True)


def verb_cert_remove(config: Config, identity: str) -> dict[str, object]:
    validate_identity(identity)
    with locked(config):
        server_cert = ensure_server_cert(config)
        certs = read_client_certs(config)
        removed = certs.pop(identity, None) is not None
        if removed:
            write_client_bundle(config, certs, server_cert)  # first: the server stops trusting it ...
            remove_durably(_x509_dir(config) / X509_CLIENT_DIR / f"{identity}.pem")  # ... then its source
    return {"identity": identity, "removed": removed}


def verb_cert_list(config: Config) -> dict[str, object]:
    with locked(config):
        server_cert = ensure_server_cert(config)
        certs = read_client_certs(config)
    return {"identities": sorted(certs), "tls": True, "server_certificate": server_cert}


def _generic_settings(path: Path) -> dict[str, str]:
    """The [generic] keys of an nbd-server config (its own ini dialect: indented keys, no continuations)."""
    found: dict[str, str] = {}
    section = ""
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif section == "generic" and "=" in line:
            key, _, value = line.partition("=")
            found[key.strip()] = value.strip()
    return found


def check_server_tls(config: Config) -> None:
    """With tls_x509_dir set, nbd-server must be configured to require TLS with exactly the helper's
    files: a config that would serve plain NBD, or trust other clients, is refused before it starts."""
    if config.tls_x509_dir is None or config.server_config is None:
        return
    folder = config.tls_x509_dir
    wanted = {
        "certfile": str(folder / X509_SERVER_CERT),
        "keyfile": str(folder / X509_SERVER_KEY),
        "cacertfile": str(folder / X509_CLIENT_BUNDLE),
        "force_tls": "true",
    }
    try:
        found = _generic_settings(config.server_config)
    except OSError as exc:
        raise HelperError(EXIT_CONFIG, "bad_config", f"cannot read {config.server_config}: {exc.strerror}") from exc
    wrong = [f"{key} = {value}" for key, value in wanted.items() if found.get(key, "").lower() != value.lower()]
    if wrong:
        raise HelperError(
            EXIT_CONFIG,
            "tls_not_required",
            f"{config.server_config} [generic] must say {'; '.join(wrong)} (tls_x509_dir is set: no plain NBD)",
        )


MAX_LINK_PAIRS = 64
MAX_DIGEST_NAMES = 64
USAGE = (
    "usage: oma-nbd-helper {link NAME DEVICE [NAME DEVICE ...] | unlink NAME | digest NAME [NAME ...] "
    "| reload | status | start | restart | stop | psk-add ID | psk-rotate ID | psk-import ID | psk-remove ID "
    "| psk-list | cert-add ID | cert-rotate ID | cert-remove ID | cert-list}"
)
VERBS = {
    "link": (2, verb_link),
    "unlink": (1, verb_unlink),
    "digest": (1, verb_digest),
    "reload": (0, verb_reload),
    "status": (0, verb_status),
    "start": (0, verb_start),
    "restart": (0, verb_restart),
    "stop": (0, verb_stop),
    "psk-add": (1, verb_psk_add),
    "psk-rotate": (1, verb_psk_rotate),
    "psk-import": (1, verb_psk_import),
    "psk-remove": (1, verb_psk_remove),
    "psk-list": (0, verb_psk_list),
    "cert-add": (1, verb_cert_add),
    "cert-rotate": (1, verb_cert_rotate),
    "cert-remove": (1, verb_cert_remove),
    "cert-list": (0, verb_cert_list),
}


def emit(payload: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(payload, sort_keys=True) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    verb = argv[0] if argv else ""
    try:
        arity = VERBS[verb][0] if verb in VERBS else -1
        count = len(argv) - 1
        # link takes one or more NAME DEVICE pairs (at most MAX_LINK_PAIRS), digest one or more names (at
        # most MAX_DIGEST_NAMES); every other verb a fixed count.
        if verb == "link":
            wrong = count < 2 or count % 2 or count > 2 * MAX_LINK_PAIRS
        elif verb == "digest":
            wrong = count < 1 or count > MAX_DIGEST_NAMES
        else:
            wrong = count != arity
        if arity < 0 or wrong:
            raise HelperError(EXIT_USAGE, "usage", USAGE)
        config = load_config()
        result = VERBS[verb][1](config, *argv[1:])  # type: ignore[operator]
    except HelperError as exc:
        emit({"ok": False, "verb": verb, "error": exc.kind, "message": exc.message})
        return exc.code
    except (OSError, ValueError) as exc:
        emit({"ok": False, "verb": verb, "error": "system_error", "message": str(exc)})
        return EXIT_SYSTEM
    emit({"ok": True, "verb": verb, **result})
    return EXIT_OK


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main(sys.argv[1:]))
