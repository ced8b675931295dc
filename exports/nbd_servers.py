"""The shared NBD server, behind one interface: ``nbdkit`` (default) and ``nbd-server``.

Adapters only: no ORM here. They write through the privileged helper, read the server through the
NBD protocol, and return plain reports that ``exports.actions`` records.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import helper_client
from .helper_client import HelperFailed, HelperRunner, LinkResult, ServerReply, StatusReply, UnlinkReply
from .nbd_protocol import NbdConnection, NbdError, NbdUnavailable, Tls, list_exports

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.02
# nbd-server applies a SIGHUP from its main loop; this is how long a reload may take to show.
RELOAD_SETTLE = 1.0
# nbd-server 3.24 corrupts its memory on SIGHUP (fixed in 3.25).
RELOAD_UNSAFE_VERSIONS = ("3.24",)
# nbd-server will not start without an export, so its main config carries this read-only probe.
HEALTH_EXPORT = "oma-health"


@dataclass
class ServeReport:
    """What happened while making exports served: reloads, incidents found, repairs made."""

    reloads: int = 0
    shared_reload: bool = False
    crashes: int = 0
    restarts: int = 0
    lost: list[str] = field(default_factory=list)
    repairs: int = 0
    notes: list[str] = field(default_factory=list)
    # (event kind, message) for each incident, so the caller can audit them.
    incidents: list[tuple[str, str]] = field(default_factory=list)

    def incident(self, kind: str, message: str) -> None:
        self.notes.append(message)
        self.incidents.append((kind, message))


def device_present(path: str | Path) -> bool:
    """Whether an export's device is there now (a link followed to its end). A detached volume's by-id
    device is absent: its export is parked, neither served nor lost."""
    return os.path.exists(path)


class ExportNotServed(Exception):
    def __init__(self, names: set[str], detail: str) -> None:
        super().__init__(f"not served: {', '.join(sorted(names))}: {detail}")
        self.names = names
        self.detail = detail


class NbdBackend(Protocol):
    name: str
    needs_reload: bool
    host: str
    port: int

    def publish(self, export_name: str, device: str) -> LinkResult: ...
    def publish_many(self, pairs: list[tuple[str, str]]) -> list[LinkResult]: ...
    def withdraw(self, export_name: str) -> UnlinkReply: ...
    def link_target(self, export_name: str) -> str | None: ...
    def served_names(self) -> set[str]: ...
    def export_size(self, export_name: str) -> int: ...
    def make_served(self, names: set[str], written_at: float, timeout: float) -> ServeReport: ...
    def unopenable(self, names: set[str], settle: float = 0.0) -> set[str]: ...
    def helper_status(self) -> StatusReply: ...
    def start(self) -> ServerReply: ...
    def restart(self) -> ServerReply: ...
    def stop(self) -> ServerReply: ...
    def ensure_running(self, report: ServeReport) -> None: ...
    def version(self) -> str: ...
    def warnings(self) -> list[str]: ...


class _BaseBackend:
    name = ""
    needs_reload = False
    server_exe = ""

    def __init__(
        self,
        helper: HelperRunner,
        host: str,
        port: int,
        export_root: str,
        state_dir: str,
        tls: Callable[[], Tls | None] = lambda: None,
        encrypted: bool = False,
    ) -> None:
        self.helper = helper
        self.encrypted = encrypted  # the server requires TLS (nbdkit: pre-shared keys; nbd-server: certificates)
        self.host = host
        self.port = port
        self.tls = tls  # reads the portal's own key (when the server requires TLS) at each connection
        self.export_root = Path(export_root)
        self.state_dir = Path(state_dir)

    def publish(self, export_name: str, device: str) -> LinkResult:
        return self.publish_many([(export_name, device)])[0]

    def publish_many(self, pairs: list[tuple[str, str]]) -> list[LinkResult]:
        """Link several (name, device) pairs in one helper call: all validated before any is written."""
        return helper_client.link(self.helper, *(part for pair in pairs for part in pair))["links"]

    def withdraw(self, export_name: str) -> UnlinkReply:
        return helper_client.unlink(self.helper, export_name)

    def link_target(self, export_name: str) -> str | None:
        try:
            return os.readlink(self.export_root / export_name)
        except OSError:
            return None

    def served_names(self) -> set[str]:
        return set(list_exports(self.host, self.port, tls=self.tls())) - {HEALTH_EXPORT}

    def export_size(self, export_name: str) -> int:
        with NbdConnection(self.host, self.port, tls=self.tls()) as conn:
            return conn.open(export_name).size

    def unopenable(self, names: set[str], settle: float = 0.0) -> set[str]:
        """The names that do not open (NBD_OPT_GO) with a size above zero. With ``settle``, a name
        that fails is tried again until it opens or that many seconds pass: on a loaded machine one
        connection can fail (another worker's repair restarting the main process, a slow handshake)
        without the export being lost."""
        deadline = time.monotonic() + settle
        bad: set[str] = set(names)
        while True:
            still: set[str] = set()
            for name in sorted(bad):
                try:
                    if self.export_size(name) <= 0:
                        still.add(name)
                except NbdError:
                    still.add(name)
            bad = still
            if not bad or time.monotonic() >= deadline:
                return bad
            time.sleep(POLL_INTERVAL * 5)

    def helper_status(self) -> StatusReply:
        return helper_client.status(self.helper)

    def start(self) -> ServerReply:
        return helper_client.control(self.helper, "start")

    def restart(self) -> ServerReply:
        return helper_client.control(self.helper, "restart")

    def stop(self) -> ServerReply:
        return helper_client.control(self.helper, "stop")

    def version(self) -> str:
        try:
            out = subprocess.run(  # noqa: S603 - fixed program, fixed argument
                [self.server_exe, "--version" if self.name == "nbdkit" else "-V"],
                capture_output=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        text = (out.stdout + out.stderr).decode(errors="replace")
        for line in text.splitlines():
            words = line.replace("version", "").split()
            if words and words[0].startswith(("nbdkit", "This")):
                return words[-1]
        return "unknown"

    def warnings(self) -> list[str]:
        if self.encrypted:
            return []
        return [
            "The NBD data path is plain: without TLS any local account can list, read and write every export. "
            "Serve over TLS: nbdkit with pre-shared keys (OMA_NBD_TLS_PSK_FILE) or nbd-server with certificates "
            "(OMA_NBD_TLS_CERT_DIR); manage.py nbd_keys makes both."
        ]

    def _wait_listed(self, names: set[str], timeout: float) -> set[str]:
        """Poll the names-only list until every name shows; return the ones still missing."""
        deadline = time.monotonic() + timeout
        missing = set(names)
        while True:
            with contextlib.suppress(NbdError):
                missing = names - self.served_names()
            if not missing or time.monotonic() >= deadline:
                return missing
            time.sleep(POLL_INTERVAL)

    def ensure_running(self, report: ServeReport) -> None:
        """If the server is down (crashed), start it and record the crash."""
        status = self.helper_status()
        if status.get("verified") and status.get("listening"):
            return
        report.crashes += 1
        report.incident("server.crash", f"server not running ({status.get('why')}); starting it")
        self.start()
        report.restarts += 1
        report.repairs += 1

    def make_served(self, names: set[str], written_at: float, timeout: float) -> ServeReport:
        report = ServeReport()
        try:
            missing = names - self.served_names()
        except NbdUnavailable:
            missing = set(names)
            self.ensure_running(report)
        if missing:
            missing = self._wait_listed(missing, timeout)
        if missing:
            raise ExportNotServed(missing, "the NBD server does not list them")
        unopenable = self.unopenable(names)
        if unopenable:
            raise ExportNotServed(unopenable, "listed, but opening them fails or shows size 0")
        return report


class NbdkitBackend(_BaseBackend):
    """nbdkit ``file dir=<export root>``: a new link is served at the next connection, no reload."""

    name = "nbdkit"
    server_exe = "nbdkit"


class NbdServerBackend(_BaseBackend):
    """nbd-server with ``includedir = conf.d``: new names need a SIGHUP, coalesced and verified."""

    name = "nbd-server"
    needs_reload = True
    server_exe = "nbd-server"

    def __init__(self, *args: Any, min_spacing: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.min_spacing = min_spacing

    def warnings(self) -> list[str]:
        found = super().warnings()
        version = self.version()
        if version in RELOAD_UNSAFE_VERSIONS:
            found.append(
                f"nbd-server {version} corrupts its memory on reload (fixed in 3.25): new exports can crash it "
                "or drop existing ones. The portal spaces, verifies and repairs reloads, but the nbdkit backend "
                "needs none: set OMA_NBD_BACKEND=nbdkit."
            )
        return found

    @contextlib.contextmanager
    def _reload_lock(self) -> Iterator[dict[str, Any]]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state_path = self.state_dir / "reload-state.json"
        fd = os.open(self.state_dir / "reload.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                state = json.loads(state_path.read_text())
            except (OSError, ValueError):
                state = {"last_started": 0.0, "count": 0}
            yield state
            tmp = state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, state_path)
        finally:
            os.close(fd)

    def make_served(self, names: set[str], written_at: float, timeout: float) -> ServeReport:
        """Serve ``names``, whose conf files were written at ``written_at`` (epoch seconds).

        Single flight: whoever holds the reload lock reloads for everyone whose file was written
        before that reload started; the others share it. Checks run under the lock too, so they
        never race a reload in flight, and a name that is listed but does not open counts as lost.
        """
        report = ServeReport()
        with contextlib.suppress(NbdError):
            if not (names - self.served_names()) and not self.unopenable(names):
                return report
        with self._reload_lock() as state:
            if state["last_started"] > written_at:
                report.shared_reload = True
                missing = self._wait_listed(names, RELOAD_SETTLE) or self.unopenable(names)
                if missing:
                    self._repair(missing, report)
            else:
                # Spacing counts from the end of the last reload's checks and repairs too: the server
                # gets quiet time, and writers released by that reload gather into the next one.
                last = max(state["last_started"], state.get("last_finished", 0.0))
                wait = last + self.min_spacing - time.time()
                if wait > 0:
                    time.sleep(wait)
                try:
                    self._reload_and_verify(state, report)
                finally:
                    state["last_finished"] = time.time()
            missing = self._served_or_repaired(names, timeout, report)
        if missing:
            raise ExportNotServed(missing, "not served after a verified reload and repair")
        return report

    def _served_or_repaired(self, names: set[str], timeout: float, report: ServeReport) -> set[str]:
        """The last check, under the reload lock: every name listed and opening; the ones that are not.

        3.24's corruption can show after a reload's own checks passed: the export storm caught a main
        process that still listed every name while the children it forked dropped every open. So a
        failing check restarts the main process once and checks again. A main process that died since
        is started at once and counted as a crash, not waited for until ``timeout``.
        """
        missing = self._wait_listed(names, RELOAD_SETTLE) or self.unopenable(names, settle=RELOAD_SETTLE)
        if not missing:
            return missing
        self.ensure_running(report)
        missing = self._wait_listed(missing, timeout) or self.unopenable(missing, settle=RELOAD_SETTLE)
        if missing:
            missing = self._repair(missing, report)
        return missing

    def _repair(self, missing: set[str], report: ServeReport) -> set[str]:
        """Restart the main process: a fresh one reads every conf file. Children keep their transfers."""
        report.lost += sorted(missing)
        report.incident(
            "server.lost_exports",
            f"nbd-server dropped or blanked {len(missing)} export(s); restarting the main process (transfers kept)",
        )
        self.restart()
        report.restarts += 1
        report.repairs += 1
        return self._wait_listed(missing, RELOAD_SETTLE) or self.unopenable(missing, settle=RELOAD_SETTLE)

    def _reload_and_verify(self, state: dict[str, Any], report: ServeReport) -> None:
        before = self.helper_status()
        if not before["verified"] or before["pid"] is None:
            # Down already: a fresh start reads every conf file, no reload needed.
            self.ensure_running(report)
            state["last_started"] = time.time()
            return
        # Parked exports (their device detached) cannot open: only the others must survive the reload.
        expected = {n for n in set(before["confs"]) & set(before["links"]) if device_present(self.export_root / n)}
        state["last_started"] = time.time()
        try:
            helper_client.reload(self.helper)
        except HelperFailed as exc:
            if exc.kind != "server_not_running":
                raise
        state["count"] += 1
        report.reloads += 1
        missing = self._settle(expected, before["pid"])
        if not missing:
            # 3.24 sometimes keeps a name listed but serves it blank after a reload: open each one.
            missing = self.unopenable(expected, settle=RELOAD_SETTLE)
        after = self.helper_status()
        if not after.get("verified") or after.get("pid") != before["pid"]:
            report.crashes += 1
            report.incident(
                "server.crash", f"nbd-server main {before['pid']} died on reload ({after.get('why')}); restarting"
            )
            self.start()
            report.restarts += 1
            report.repairs += 1
            missing = self._wait_listed(expected, RELOAD_SETTLE) or self.unopenable(expected)
        elif missing:
            missing = self._repair(missing, report)
        if missing:
            raise ExportNotServed(missing, "lost after a reload and not restored by a restart")

    def _settle(self, expected: set[str], pid: int) -> set[str]:
        """Wait for a reload to show every expected name, or for the main process to die."""
        deadline = time.monotonic() + RELOAD_SETTLE
        missing = set(expected)
        while time.monotonic() < deadline:
            try:
                missing = expected - self.served_names()
            except NbdError:
                missing = set(expected)
            if not missing:
                return missing
            if not _pid_alive(pid):
                return missing
            time.sleep(POLL_INTERVAL)
        return missing


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            raw = fh.read()
    except OSError:
        return False
    return raw[raw.rindex(")") + 2] not in "ZX"
