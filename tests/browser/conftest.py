"""The whole stack for browser tests: daphne serving the portal, a django-q2 cluster, nbdkit and the
VMA simulator (its copies rate-limited so progress is visible), and Debian's Chromium via Playwright."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from devtools.devserver import free_port
from devtools.vma_sim import Faults
from tests.conftest import REPO, RunningServer
from tests.migrations_app.conftest import SimFactory, make_sim  # noqa: F401 - fixture used here
from tests.migrations_app.test_qcluster import Cluster
from tests.migrations_app.test_vma_sim import Sim
from tests.migrations_app.test_workflow import wire
from tests.web.conftest import PASSWORD, UserFactory, make_user  # noqa: F401 - fixture used by the tests

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
# Playwright's sync API runs an event loop in this thread; the test's own ORM calls are still plain
# synchronous calls between browser steps, so Django's async-safety guard does not apply to them.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make system-packages)")


class Portal:
    """daphne on a free loopback port, configured like the cluster (same database, NBD, VMA)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**env, "DJANGO_DEBUG": "1"}
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


@pytest.fixture
def stack(
    nbdkit_server: RunningServer,
    make_sim: SimFactory,  # noqa: F811 - the fixture imported above
    settings: object,
    tmp_path: Path,
) -> Iterator[tuple[Portal, Sim]]:
    # 32 MiB at 32 Mbit/s: about 8 s per disk, slow enough to watch the bar move, quick enough for CI.
    sim = make_sim(Faults(rate_bits_per_second=32_000_000), size_mib=32)
    wire(settings, nbdkit_server, sim)
    cluster = Cluster(nbdkit_server, sim, tmp_path / "qcluster.log").start()
    portal = Portal(cluster.env, tmp_path / "daphne.log")
    try:
        yield portal, sim
    finally:
        portal.stop()
        cluster.kill(signal.SIGTERM)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    yield page
    context.close()


def log_in(page: Page, portal: Portal, users: UserFactory, role: str) -> str:
    user = users(role)
    page.goto(f"{portal.url}/login/")
    page.fill("input[name=username]", user.username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{portal.url}/")
    return user.username
