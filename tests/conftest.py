"""Fixtures shared by every test folder: real NBD servers, VMA simulators and users in each role.
The code behind them is in tests/support/."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import Group, User

from devtools.vma_sim import Faults
from omaportal.web.roles import setup_roles
from tests.support.factories import PASSWORD, UserFactory
from tests.support.nbd import BACKENDS, RunningServer, serve_nbd
from tests.support.vma import Sim, SimFactory


@pytest.fixture(params=BACKENDS)
def nbd_server(request: pytest.FixtureRequest, tmp_path: Path, settings: object) -> Iterator[RunningServer]:
    """A real NBD server of each backend; settings.OMA_NBD points the portal at it."""
    yield from serve_nbd(tmp_path, settings, request.param)


@pytest.fixture
def nbdkit_server(tmp_path: Path, settings: object) -> Iterator[RunningServer]:
    yield from serve_nbd(tmp_path, settings, "nbdkit")


@pytest.fixture
def nbdserver_server(tmp_path: Path, settings: object) -> Iterator[RunningServer]:
    yield from serve_nbd(tmp_path, settings, "nbd-server")


@pytest.fixture
def make_sim(tmp_path: Path) -> Iterator[SimFactory]:
    """make_sim(faults=None, size_mib=16) -> a served simulator; every one made is closed at teardown."""
    made: list[Sim] = []

    def make(faults: Faults | None = None, size_mib: int = 16) -> Sim:
        sim = Sim(tmp_path / f"sim{len(made)}", faults, size_mib)
        made.append(sim)
        return sim

    yield make
    for sim in made:
        sim.close()


@pytest.fixture
def make_user(db: None) -> UserFactory:
    setup_roles()

    def make(role: str) -> User:
        user = User.objects.create_user(f"{role}-{uuid.uuid4().hex[:6]}", password=PASSWORD)
        if role in ("viewer", "operator", "admin"):
            user.groups.add(Group.objects.get(name=role))
        return user

    return make
