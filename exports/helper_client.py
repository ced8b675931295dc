"""Calls the privileged helper (deploy/oma_nbd_helper.py) and turns its JSON line into results."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from typing import Any, Protocol, TypedDict, cast

HELPER_TIMEOUT = 90.0


# The helper's replies (docs/helper.md): one JSON object per call, always with "ok" and "verb".
class HelperReply(TypedDict):
    ok: bool
    verb: str


class LinkResult(TypedDict):
    name: str
    device: str
    previous_device: str | None
    link_changed: bool
    conf_changed: bool
    needs_reload: bool
    conf_mtime: float | None  # nbd-server: when its conf file was written (a reload since covers it)


class LinkReply(HelperReply, LinkResult):
    links: list[LinkResult]  # one per NAME DEVICE pair, in order (the first is also at the top level)


class UnlinkReply(HelperReply):
    name: str
    link_removed: bool
    conf_removed: bool


class StatusReply(HelperReply):
    backend: str
    export_root: str
    confd: str | None
    address: str
    port: int
    pid: int | None  # the verified main process, or None
    started_at: float | None
    verified: bool
    why: str  # why no main process could be verified
    listening: bool
    links: dict[str, str]  # export name -> link target
    confs: list[str]  # export names with a conf.d file
    tls: bool  # the server requires TLS with pre-shared keys


class PskReply(HelperReply, total=False):
    """psk-add, psk-rotate (identity, key, rotated), psk-import (identity, replaced, changed), psk-remove
    (identity, removed), psk-list; and the cert-* verbs (key, certificate and server_certificate: PEM)."""

    identity: str
    key: str  # hex (a PSK) or PEM (a certificate's key), shown once
    certificate: str
    server_certificate: str
    rotated: bool
    replaced: bool
    changed: bool
    removed: bool
    identities: list[str]
    tls: bool


class ServerReply(HelperReply, total=False):
    """start, restart and stop."""

    started: bool
    restarted: bool
    stopped: bool
    pid: int
    started_at: float
    previous: str
    previous_pid: int | None
    why: str


class ReloadReply(HelperReply, total=False):
    reloaded: bool
    pid: int
    started_at: float
    reason: str


class HelperFailed(Exception):
    """The helper refused or failed; ``kind`` is its machine-readable error, ``exit_code`` its status."""

    def __init__(self, verb: str, kind: str, message: str, exit_code: int) -> None:
        super().__init__(f"oma-nbd-helper {verb}: {message}")
        self.verb = verb
        self.kind = kind
        self.message = message
        self.exit_code = exit_code

    @property
    def refused(self) -> bool:
        return self.exit_code == 3


class HelperRunner(Protocol):
    def run(self, verb: str, *args: str, stdin: bytes = b"") -> dict[str, Any]: ...


def link(helper: HelperRunner, *pairs: str) -> LinkReply:
    return cast(LinkReply, helper.run("link", *pairs))


def unlink(helper: HelperRunner, name: str) -> UnlinkReply:
    return cast(UnlinkReply, helper.run("unlink", name))


def status(helper: HelperRunner) -> StatusReply:
    return cast(StatusReply, helper.run("status"))


def control(helper: HelperRunner, verb: str) -> ServerReply:
    """start, restart or stop."""
    return cast(ServerReply, helper.run(verb))


def psk(helper: HelperRunner, verb: str, *identity: str) -> PskReply:
    """psk-add ID, psk-rotate ID, psk-remove ID or psk-list."""
    return cast(PskReply, helper.run(verb, *identity))


def psk_import(helper: HelperRunner, identity: str, key: str) -> PskReply:
    """psk-import ID: the key goes on the helper's stdin, never on its command line."""
    return cast(PskReply, helper.run("psk-import", identity, stdin=f"{identity}:{key}\n".encode("ascii")))


class DigestResult(TypedDict):
    """One export's read-back: the device it serves, its size, and the sha256 of the asked ranges."""

    name: str
    device: str
    size: int
    bytes: int
    sha256: str


class DigestReply(HelperReply, DigestResult):
    digests: list[DigestResult]  # one per NAME, in order (the first is also at the top level)


# Names one digest call reads at most (the helper's MAX_DIGEST_NAMES).
MAX_DIGEST_NAMES = 64


def digest(helper: HelperRunner, ranges_by_name: dict[str, list[list[int]]]) -> list[DigestResult]:
    """digest NAME [NAME ...]: every named export's device read back in one helper call (one process
    instead of one per disk), side by side; the ranges go on stdin (a whole disk's changed blocks can be
    long). The results in the names' order."""
    names = list(ranges_by_name)
    results: list[DigestResult] = []
    for start in range(0, len(names), MAX_DIGEST_NAMES):
        batch = names[start : start + MAX_DIGEST_NAMES]
        given = ranges_by_name[batch[0]] if len(batch) == 1 else [ranges_by_name[name] for name in batch]
        reply = cast(DigestReply, helper.run("digest", *batch, stdin=json.dumps(given).encode("ascii")))
        results += reply["digests"]
    return results


def reload(helper: HelperRunner) -> ReloadReply:
    return cast(ReloadReply, helper.run("reload"))


class SubprocessHelper:
    """Runs the helper as a separate program: through ``sudo -n`` in production, directly in dev."""

    def __init__(self, command: Sequence[str], config_path: str | None = None) -> None:
        self.command = list(command)
        self.config_path = config_path

    def run(self, verb: str, *args: str, stdin: bytes = b"") -> dict[str, Any]:
        env = dict(os.environ)
        if self.config_path:
            env["OMA_NBD_HELPER_CONFIG"] = self.config_path
        try:
            proc = subprocess.run(  # noqa: S603 - a fixed program with validated arguments, no shell
                [*self.command, verb, *args],
                capture_output=True,
                timeout=HELPER_TIMEOUT,
                env=env,
                check=False,
                input=stdin,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HelperFailed(verb, "helper_unavailable", f"could not run the helper: {exc}", -1) from exc
        lines = proc.stdout.decode("utf-8", errors="replace").strip().splitlines()
        try:
            payload = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            stderr = proc.stderr.decode("utf-8", errors="replace").strip()[-400:]
            raise HelperFailed(
                verb, "bad_helper_output", f"exit {proc.returncode}, no JSON result: {stderr}", proc.returncode
            )
        if proc.returncode != 0 or not payload.get("ok"):
            raise HelperFailed(verb, str(payload.get("error")), str(payload.get("message")), proc.returncode)
        return payload
