"""A VMA simulator for the migration tests, closed when the test ends."""

from __future__ import annotations

import pytest

from tests.support.vma import Sim, SimFactory


@pytest.fixture
def sim(make_sim: SimFactory) -> Sim:
    return make_sim()
