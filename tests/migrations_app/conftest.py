"""A VMA simulator and a fake CloudStack for the migration tests, closed when the test ends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fake_cloudstack import FakeCloudStack
from tests.support.nbd import RunningServer
from tests.support.vma import Sim, SimFactory


@pytest.fixture
def sim(make_sim: SimFactory) -> Sim:
    return make_sim()


@pytest.fixture
def cloud(nbdkit_server: RunningServer) -> Iterator[FakeCloudStack]:
    """A fake CloudStack whose volumes are files under the NBD helper's dev volume root."""
    root = nbdkit_server.layout.volume_root
    (root / "by-id").mkdir(exist_ok=True)
    fake = FakeCloudStack(root / "by-id", data_dir=root / "cloudstack").start()
    yield fake
    fake.stop()
