"""The portal under daphne for browser tests, and logging in through its form."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import Page

from devtools.devserver import free_port
from tests.support.factories import PASSWORD, UserFactory
from tests.support.nbd import REPO

CHROMIUM = Path("/usr/bin/chromium")


ARTIFACTS = REPO / "test-artifacts"


class Portal:
    """daphne on a free loopback port, configured like the cluster (same database, NBD, VMA)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # As in production (no debug pages), but daphne serves the static files: there is no proxy here.
        self.env = {**env, "OMA_SERVE_STATIC": "1"}
        self.log = log
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(self.port), "omaportal.asgi:application"],
            cwd=REPO,
            env=self.env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"daphne did not start:\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


def log_in(page: Page, portal: Portal, users: UserFactory, role: str) -> str:
    user = users(role)
    page.goto(f"{portal.url}/login/")
    page.fill("input[name=username]", user.username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{portal.url}/")
    return user.username
