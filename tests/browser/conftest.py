"""The whole stack for browser tests: daphne serving the portal, a django-q2 cluster, nbdkit and the
VMA simulator (its copies rate-limited so progress is visible), and Debian's Chromium via Playwright."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from devtools.vma_sim import Faults
from tests.support.browser import ARTIFACTS, CHROMIUM, Portal
from tests.support.flows import Cluster, wire
from tests.support.nbd import RunningServer
from tests.support.vma import Sim, SimFactory

# Playwright's sync API runs an event loop in this thread; the test's own ORM calls are still plain
# synchronous calls between browser steps, so Django's async-safety guard does not apply to them.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make system-packages)")
# What a page must show is waited for up to 10 s (Playwright's default is 5 s): on a loaded 2-core CI
# machine a live update behind a reconnect or a worker step can take longer, without anything being wrong.
expect.set_options(timeout=10_000)


@pytest.fixture
def stack(
    nbdkit_server: RunningServer,
    make_sim: SimFactory,
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


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Module-scoped: Playwright's sync API keeps an event loop running in this thread while it is open,
    and a later test in the same worker that calls asyncio.run() (the websocket tests) would fail."""
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
