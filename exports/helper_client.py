"""Calls the privileged helper (deploy/oma_nbd_helper.py) and turns its JSON line into results."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from typing import Any, Protocol

HELPER_TIMEOUT = 90.0


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
    def run(self, verb: str, *args: str) -> dict[str, Any]: ...


class SubprocessHelper:
    """Runs the helper as a separate program: through ``sudo -n`` in production, directly in dev."""

    def __init__(self, command: Sequence[str], config_path: str | None = None) -> None:
        self.command = list(command)
        self.config_path = config_path

    def run(self, verb: str, *args: str) -> dict[str, Any]:
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
                stdin=subprocess.DEVNULL,
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
