"""VMA simulators for the migration tests, closed when the test ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtools.vma_sim import Faults
from tests.migrations_app.test_vma_sim import Sim

SimFactory = Callable[..., Sim]


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
def sim(make_sim: SimFactory) -> Sim:
    return make_sim()
